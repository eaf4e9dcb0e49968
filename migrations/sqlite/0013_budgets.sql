-- Spending caps a server's admins set with /budget, in dollars, over the
-- defaults (BUDGET_GUILD_MONTHLY, BUDGET_USER_DAILY); NULL keeps the default.
CREATE TABLE guild_budgets (
    guild_id   INTEGER PRIMARY KEY NOT NULL,
    monthly    REAL,
    daily      REAL,
    updated_at INTEGER NOT NULL
);
-- What was spent since a time (a day, a month), without reading every row.
CREATE INDEX messages_billed_at ON messages (created_at) WHERE cost IS NOT NULL;
CREATE INDEX unbilled_billed_at ON unbilled (created_at) WHERE cost IS NOT NULL;
