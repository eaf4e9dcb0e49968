-- One row per conversation ("terminal:NAME", "discord:<thread id>").
CREATE TABLE conversations (
    key        TEXT PRIMARY KEY NOT NULL,
    model      TEXT,
    created_at INTEGER NOT NULL
);

-- Messages in order (by id). JSON columns hold lists and provider fields as sent.
CREATE TABLE messages (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation      TEXT NOT NULL REFERENCES conversations(key) ON DELETE CASCADE,
    role              TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'tool')),
    content           TEXT,
    images            TEXT,
    tool_calls        TEXT,
    tool_call_id      TEXT,
    reasoning         TEXT,
    reasoning_details TEXT,
    model             TEXT,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    cost              REAL,
    created_at        INTEGER NOT NULL
);

CREATE INDEX messages_by_conversation ON messages (conversation, id);
