-- Fan-out off the webhook path (issue #8's ingest figure): see the
-- PostgreSQL migration of the same name for why.
CREATE TABLE changes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    scope       TEXT    NOT NULL,
    phone       TEXT    NOT NULL,
    event_id    INTEGER NOT NULL,
    -- Milliseconds since the Unix epoch, as every instant on SQLite.
    recorded_at INTEGER NOT NULL
);
