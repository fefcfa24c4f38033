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

-- sink_phones: the unique key leads with the phone (it serves a phone's rows,
-- so the phone index goes) and event_id loses its foreign key (see the
-- PostgreSQL migration). SQLite cannot alter a constraint: the table is
-- rebuilt (nothing references it), ids kept.
CREATE TABLE sink_phones_new (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    sink              TEXT    NOT NULL,
    phone             TEXT    NOT NULL,
    status            TEXT    NOT NULL
                      CONSTRAINT sink_phones_status_check CHECK (status IN ('pending', 'done', 'dead')),
    generation        INTEGER NOT NULL DEFAULT 1,
    event_id          INTEGER,
    next_attempt_at   INTEGER NOT NULL,
    recheck_at        INTEGER,
    locked_until      INTEGER,
    locked_by         TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0 CONSTRAINT sink_phones_attempts_check CHECK (attempts >= 0),
    written_opted_out INTEGER,
    written_since     INTEGER,
    written_at        INTEGER,
    uncertain         INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT,
    result            TEXT,
    queued_at         INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    CONSTRAINT sink_phones_phone_sink_key UNIQUE (phone, sink),
    CONSTRAINT sink_phones_lease_check CHECK ((locked_until IS NULL) = (locked_by IS NULL)),
    CONSTRAINT sink_phones_lease_open_check CHECK (status = 'pending' OR locked_until IS NULL),
    CONSTRAINT sink_phones_written_check CHECK ((written_opted_out IS NULL) = (written_at IS NULL))
);
INSERT INTO sink_phones_new
SELECT id, sink, phone, status, generation, event_id, next_attempt_at, recheck_at, locked_until, locked_by, attempts,
       written_opted_out, written_since, written_at, uncertain, last_error, result, queued_at, created_at, updated_at
  FROM sink_phones;
DROP TABLE sink_phones;
ALTER TABLE sink_phones_new RENAME TO sink_phones;
CREATE INDEX sink_phones_due_idx ON sink_phones (sink, next_attempt_at, id, queued_at) WHERE status = 'pending';
CREATE INDEX sink_phones_dead_idx ON sink_phones (sink, queued_at) WHERE status = 'dead';
