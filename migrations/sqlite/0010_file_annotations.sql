-- The documents OpenRouter parsed for an assistant message (its `file`
-- annotations, JSON), sent back so they are not parsed again.
ALTER TABLE messages ADD COLUMN file_annotations TEXT;
