-- Free-text revocations for review (issue #10); the PostgreSQL migration
-- of the same name explains the table. Times are INTEGER milliseconds.
CREATE TABLE reviews (
    id                    INTEGER PRIMARY KEY AUTOINCREMENT,
    message_sid           TEXT    NOT NULL UNIQUE,
    account_sid           TEXT,
    messaging_service_sid TEXT,
    scope                 TEXT    NOT NULL,
    phone                 TEXT    NOT NULL,
    from_raw              TEXT    NOT NULL,
    to_number             TEXT,
    body                  TEXT    NOT NULL,
    matched               TEXT    NOT NULL,
    params                TEXT    NOT NULL,
    source                TEXT    NOT NULL,
    said_at               INTEGER NOT NULL,
    created_at            INTEGER NOT NULL,
    status                TEXT    NOT NULL DEFAULT 'pending'
                          CHECK (status IN ('pending', 'opted_out', 'dismissed')),
    decided_at            INTEGER,
    note                  TEXT,
    event_id              INTEGER REFERENCES events (id),
    notified_at           INTEGER,
    CHECK ((status = 'pending') = (decided_at IS NULL)),
    CHECK ((status = 'opted_out') = (event_id IS NOT NULL))
);
CREATE INDEX reviews_pending_idx ON reviews (said_at) WHERE status = 'pending';
CREATE INDEX reviews_unnotified_idx ON reviews (id) WHERE notified_at IS NULL;
