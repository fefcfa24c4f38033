-- Same shape as the PostgreSQL schema; times are INTEGER milliseconds since
-- the Unix epoch (UTC), so comparisons are numeric, never textual.
CREATE TABLE events (
    id                    INTEGER PRIMARY KEY AUTOINCREMENT,
    message_sid           TEXT    NOT NULL UNIQUE,
    account_sid           TEXT,
    messaging_service_sid TEXT,
    scope                 TEXT    NOT NULL,
    phone                 TEXT    NOT NULL,
    from_raw              TEXT    NOT NULL,
    to_number             TEXT,
    kind                  TEXT    NOT NULL CHECK (kind IN ('opt_out', 'opt_in', 'help')),
    body                  TEXT    NOT NULL,
    source                TEXT    NOT NULL DEFAULT 'twilio',
    params                TEXT    NOT NULL,
    received_at           INTEGER NOT NULL
);
CREATE INDEX events_phone_idx ON events (phone, id);

CREATE TABLE opt_out_state (
    scope      TEXT    NOT NULL,
    phone      TEXT    NOT NULL,
    opted_out  INTEGER NOT NULL,
    event_id   INTEGER NOT NULL REFERENCES events (id),
    changed_at INTEGER NOT NULL,
    PRIMARY KEY (scope, phone)
);

CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        INTEGER NOT NULL REFERENCES events (id),
    sink            TEXT    NOT NULL,
    phone           TEXT    NOT NULL,
    kind            TEXT    NOT NULL CHECK (kind IN ('opt_out', 'opt_in')),
    status          TEXT    NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    locked_until    INTEGER,
    locked_by       TEXT,
    last_error      TEXT,
    result          TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    completed_at    INTEGER,
    CHECK ((status = 'pending') = (completed_at IS NULL)),
    UNIQUE (event_id, sink)
);
-- Claims walk a sink's pending deliveries in id order; done rows pile up and must not be scanned.
CREATE INDEX deliveries_pending_idx ON deliveries (sink, id) WHERE status = 'pending';
-- Per-phone order (older pending) and superseded checks (newer done) both walk this.
CREATE INDEX deliveries_phone_idx ON deliveries (sink, phone, status, id);
CREATE INDEX deliveries_status_idx ON deliveries (status, sink, id);
