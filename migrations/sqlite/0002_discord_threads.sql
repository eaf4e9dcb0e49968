-- Threads the Discord bot started, so that it answers every message in them
-- (also after a restart) and can sum usage per server.
CREATE TABLE discord_threads (
    conversation TEXT PRIMARY KEY NOT NULL,
    guild_id     INTEGER,
    channel_id   INTEGER NOT NULL,
    started_by   INTEGER NOT NULL,
    created_at   INTEGER NOT NULL
);

CREATE INDEX discord_threads_by_guild ON discord_threads (guild_id);
