-- Answers a person stopped midway: the text shown until then is kept, and
-- marked so that surfaces can say it is partial.
ALTER TABLE messages ADD COLUMN stopped INTEGER NOT NULL DEFAULT 0;
