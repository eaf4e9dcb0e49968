-- OAuth credentials of HTTP MCP servers ("auth": "oauth"), one row per
-- server: the client id, the tokens and the issuer that minted them, as
-- rmcp's stored credentials (JSON). Written by `mcpcord auth SERVER` and by
-- token refreshes; never logged.
CREATE TABLE oauth_credentials (
    server      TEXT PRIMARY KEY,
    credentials TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
);
