-- Documents (PDFs) attached to a person's message, as a JSON array of
-- {name, data} with the bytes as a data: URL (Discord's links expire).
ALTER TABLE messages ADD COLUMN files TEXT;
