-- What each answer read from and wrote to the provider's prompt cache, and
-- who wrote each user message (several people share a Discord thread).
ALTER TABLE messages ADD COLUMN cached_tokens INTEGER;
ALTER TABLE messages ADD COLUMN cache_write_tokens INTEGER;
ALTER TABLE messages ADD COLUMN author_id INTEGER;
ALTER TABLE messages ADD COLUMN author_name TEXT;

-- Values made once per database (the salt of the pseudonyms sent as `user`).
CREATE TABLE instance (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
