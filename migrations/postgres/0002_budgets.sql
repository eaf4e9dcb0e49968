-- As the SQLite migration 0013: the caps set with /budget, and indexes for
-- what was spent since a time.
CREATE TABLE guild_budgets (
    guild_id   BIGINT PRIMARY KEY NOT NULL,
    monthly    DOUBLE PRECISION,
    daily      DOUBLE PRECISION,
    updated_at BIGINT NOT NULL
);
CREATE INDEX messages_billed_at ON messages (created_at) WHERE cost IS NOT NULL;
CREATE INDEX unbilled_billed_at ON unbilled (created_at) WHERE cost IS NOT NULL;
