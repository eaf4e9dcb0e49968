-- Messages accepted from people and not yet taken by their turn. A row is
-- removed in the same transaction that adds the message to `messages`, so
-- an accepted message is always in one of the two tables: a restart, a
-- crash or a shutdown with messages waiting loses none of them.
CREATE TABLE inbox (
    conversation TEXT NOT NULL,
    -- The order in which the conversation's inputs are answered (a Discord
    -- message id).
    position     INTEGER NOT NULL,
    author       INTEGER NOT NULL,
    -- JSON: the text and the attachments still to be fetched.
    body         TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    PRIMARY KEY (conversation, position)
);
