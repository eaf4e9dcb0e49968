-- Replies whose usage never arrived (their stream was cut, stopped or
-- failed), kept until the endpoint says what they cost. Once billed they
-- count in /usage like any answer.
CREATE TABLE unbilled (
    generation_id      TEXT PRIMARY KEY NOT NULL,
    conversation       TEXT NOT NULL,
    model              TEXT NOT NULL,
    created_at         INTEGER NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    -- NULL once billed or given up.
    next_try_at        INTEGER,
    prompt_tokens      INTEGER,
    completion_tokens  INTEGER,
    cost               REAL,
    cached_tokens      INTEGER,
    cache_write_tokens INTEGER
);
CREATE INDEX unbilled_due ON unbilled (next_try_at) WHERE next_try_at IS NOT NULL;
CREATE INDEX unbilled_conversation ON unbilled (conversation);

-- Everything billed: answers, and replies billed after the fact.
CREATE VIEW billed AS
    SELECT conversation, created_at, prompt_tokens, completion_tokens, cost,
           cached_tokens, cache_write_tokens
      FROM messages
    UNION ALL
    SELECT conversation, created_at, prompt_tokens, completion_tokens, cost,
           cached_tokens, cache_write_tokens
      FROM unbilled WHERE prompt_tokens IS NOT NULL;
