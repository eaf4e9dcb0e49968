-- As the SQLite migration 0014: which process serves each conversation.
CREATE TABLE leases (
    conversation TEXT PRIMARY KEY NOT NULL,
    owner        TEXT NOT NULL,
    expires_at   BIGINT NOT NULL
);
CREATE INDEX leases_by_owner ON leases (owner);
