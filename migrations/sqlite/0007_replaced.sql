-- Retry, edits and /undo replace exchanges: the rows stay (they were
-- billed, and are the thread's record) but the model no longer sees them.
-- `position` marks a person's message (the input of a turn) with its
-- place in the conversation (a Discord message id); the tool-images notes
-- a turn adds have none. Messages from before this migration get a
-- negative stand-in.
ALTER TABLE messages ADD COLUMN position INTEGER;
ALTER TABLE messages ADD COLUMN replaced INTEGER NOT NULL DEFAULT 0;
UPDATE messages SET position = -id
 WHERE role = 'user' AND content IS NOT '(Images returned by the tool calls above.)';
CREATE INDEX messages_inputs ON messages (conversation, id) WHERE position IS NOT NULL;
