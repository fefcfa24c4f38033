-- Foundations: invariants of the delivery queue in the schema, the max_age
-- clock restartable by an operator, and indexes that keep every relay and
-- operator query proportional to what it returns, not to the history.
-- Same tables, columns, constraints and indexes as the PostgreSQL migration
-- (a test compares them); SQLite cannot add a CHECK to a table, so
-- `deliveries` is rebuilt (nothing references it).

CREATE TABLE deliveries_new (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        INTEGER NOT NULL REFERENCES events (id),
    sink            TEXT    NOT NULL,
    phone           TEXT    NOT NULL,
    kind            TEXT    NOT NULL CONSTRAINT deliveries_kind_check CHECK (kind IN ('opt_out', 'opt_in')),
    status          TEXT    NOT NULL DEFAULT 'pending'
                    CONSTRAINT deliveries_status_check CHECK (status IN ('pending', 'done', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0 CONSTRAINT deliveries_attempts_check CHECK (attempts >= 0),
    next_attempt_at INTEGER NOT NULL,
    locked_until    INTEGER,
    locked_by       TEXT,
    last_error      TEXT,
    result          TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    completed_at    INTEGER,
    queued_at       INTEGER NOT NULL,
    CONSTRAINT deliveries_completion_check CHECK ((status = 'pending') = (completed_at IS NULL)),
    CONSTRAINT deliveries_lease_check CHECK ((locked_until IS NULL) = (locked_by IS NULL)),
    CONSTRAINT deliveries_lease_open_check CHECK (status = 'pending' OR locked_until IS NULL),
    CONSTRAINT deliveries_result_check CHECK (result IS NULL OR status = 'done'),
    CONSTRAINT deliveries_event_sink_key UNIQUE (event_id, sink)
);

INSERT INTO deliveries_new (id, event_id, sink, phone, kind, status, attempts, next_attempt_at, locked_until,
                            locked_by, last_error, result, created_at, updated_at, completed_at, queued_at)
SELECT id, event_id, sink, phone, kind, status, max(attempts, 0),
       next_attempt_at,
       CASE WHEN status = 'pending' AND locked_by IS NOT NULL THEN locked_until END,
       CASE WHEN status = 'pending' AND locked_until IS NOT NULL THEN locked_by END,
       last_error,
       CASE WHEN status = 'done' THEN result END,
       created_at, updated_at, completed_at, created_at
  FROM deliveries;

DROP TABLE deliveries;
ALTER TABLE deliveries_new RENAME TO deliveries;

-- Per-phone order (older pending) and superseded checks (newer done) both walk this.
CREATE INDEX deliveries_phone_idx ON deliveries (sink, phone, status, id);
-- Claims: a sink's due pending rows, earliest due first. `created_at` rides
-- along so the queue statistics (count, oldest) read this index alone.
CREATE INDEX deliveries_due_idx ON deliveries (sink, next_attempt_at, id, created_at) WHERE status = 'pending';
-- Dead letters by sink (queue statistics, operator lists). Pending rows are
-- found through deliveries_due_idx; no other index leads with the pending
-- status, so a claim's planner has one obvious path.
CREATE INDEX deliveries_dead_idx ON deliveries (sink, created_at) WHERE status = 'dead';
-- A phone's state in every scope (the key leads with the scope).
CREATE INDEX opt_out_state_phone_idx ON opt_out_state (phone);
