-- A conversation's own system prompt (set with /system). A Discord
-- channel's row holds the defaults its new threads start with.
ALTER TABLE conversations ADD COLUMN system_prompt TEXT;
-- Its reasoning effort (set with /reasoning): minimal, low, medium or high.
ALTER TABLE conversations ADD COLUMN reasoning_effort TEXT;
-- The MCP servers switched off in it (set with /tools), as a JSON array.
ALTER TABLE conversations ADD COLUMN servers_off TEXT;
