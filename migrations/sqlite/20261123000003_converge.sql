-- Converge, don't fire: see the PostgreSQL migration of the same name; same
-- tables, columns, constraints and indexes (a test compares them). Times are
-- INTEGER milliseconds.

ALTER TABLE opt_out_state ADD COLUMN since INTEGER NOT NULL DEFAULT 0;
UPDATE opt_out_state SET since = changed_at;

CREATE TABLE sinks (
    name          TEXT    PRIMARY KEY,
    created_at    INTEGER NOT NULL,
    health        TEXT    NOT NULL DEFAULT 'ok'
                  CONSTRAINT sinks_health_check CHECK (health IN ('ok', 'backing_off', 'misconfigured')),
    failing_since INTEGER,
    backoff_step  INTEGER NOT NULL DEFAULT 0 CONSTRAINT sinks_backoff_step_check CHECK (backoff_step >= 0),
    next_probe_at INTEGER,
    last_error    TEXT,
    alerted_at    INTEGER,
    resynced_at   INTEGER,
    updated_at    INTEGER NOT NULL,
    CONSTRAINT sinks_failing_check CHECK ((health = 'ok') = (failing_since IS NULL))
);

CREATE TABLE sink_phones (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    sink              TEXT    NOT NULL,
    phone             TEXT    NOT NULL,
    status            TEXT    NOT NULL
                      CONSTRAINT sink_phones_status_check CHECK (status IN ('pending', 'done', 'dead')),
    generation        INTEGER NOT NULL DEFAULT 1,
    event_id          INTEGER REFERENCES events (id),
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
    CONSTRAINT sink_phones_sink_phone_key UNIQUE (sink, phone),
    CONSTRAINT sink_phones_lease_check CHECK ((locked_until IS NULL) = (locked_by IS NULL)),
    CONSTRAINT sink_phones_lease_open_check CHECK (status = 'pending' OR locked_until IS NULL),
    CONSTRAINT sink_phones_written_check CHECK ((written_opted_out IS NULL) = (written_at IS NULL))
);
CREATE INDEX sink_phones_due_idx ON sink_phones (sink, next_attempt_at, id, queued_at) WHERE status = 'pending';
CREATE INDEX sink_phones_dead_idx ON sink_phones (sink, queued_at) WHERE status = 'dead';
CREATE INDEX sink_phones_phone_idx ON sink_phones (phone);

INSERT INTO sinks (name, created_at, updated_at)
SELECT DISTINCT sink, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
  FROM deliveries;

INSERT INTO sink_phones (sink, phone, status, event_id, next_attempt_at, queued_at, created_at, updated_at,
                         written_opted_out, written_since, written_at)
SELECT d.sink, d.phone, 'pending', max(d.event_id),
       CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER),
       min(d.created_at), CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER),
       (SELECT x.kind = 'opt_out' FROM deliveries x
         WHERE x.sink = d.sink AND x.phone = d.phone AND x.status = 'done' ORDER BY x.id DESC LIMIT 1),
       (SELECT CASE WHEN x.kind = 'opt_out' THEN e.received_at END FROM deliveries x JOIN events e ON e.id = x.event_id
         WHERE x.sink = d.sink AND x.phone = d.phone AND x.status = 'done' ORDER BY x.id DESC LIMIT 1),
       (SELECT x.completed_at FROM deliveries x
         WHERE x.sink = d.sink AND x.phone = d.phone AND x.status = 'done' ORDER BY x.id DESC LIMIT 1)
  FROM deliveries d
 GROUP BY d.sink, d.phone;

DROP TABLE deliveries;
