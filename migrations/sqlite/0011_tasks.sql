-- Tool calls their MCP servers run as tasks, kept from the moment the
-- server made the task until its result is delivered into the conversation
-- (or it is cancelled), so that a restart follows them again.
CREATE TABLE mcp_tasks (
    server        TEXT NOT NULL,
    task_id       TEXT NOT NULL,
    conversation  TEXT NOT NULL,
    -- The tool's exposed name (server__tool).
    tool          TEXT NOT NULL,
    -- 1: the experimental tasks of 2025-11-25; 0: the tasks extension.
    legacy        INTEGER NOT NULL,
    poll_ms       INTEGER,
    -- Who started the turn that made it, and their name there.
    author        INTEGER,
    author_name   TEXT,
    started_at    INTEGER NOT NULL,
    -- What the server last said about it.
    message       TEXT,
    -- Servers with a session per conversation may give out the same ids.
    PRIMARY KEY (conversation, server, task_id)
);
