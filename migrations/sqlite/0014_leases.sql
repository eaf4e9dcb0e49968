-- Which process serves each conversation, while it has work: a process
-- claims a conversation before its turns run, renews the claim while it
-- lives, and lets go when the conversation is idle. A claim that was not
-- renewed by `expires_at` (Unix seconds) belongs to a process that died,
-- and another one takes the conversation's waiting messages over.
CREATE TABLE leases (
    conversation TEXT PRIMARY KEY NOT NULL,
    owner        TEXT NOT NULL,
    expires_at   INTEGER NOT NULL
);
CREATE INDEX leases_by_owner ON leases (owner);
