-- Converge, don't fire: the relay no longer replays each event to each
-- sink. It keeps one row per (sink, phone) saying what was last written
-- there, and brings the sink to the opt-out list's current state whenever
-- that row is pending. `deliveries` (one row per event and sink) goes.

-- When the current value of a (scope, phone) began: a second STOP does not
-- move the opt-out's start, which is what REDCap is stamped with.
ALTER TABLE opt_out_state ADD COLUMN since TIMESTAMPTZ;
UPDATE opt_out_state SET since = changed_at;
ALTER TABLE opt_out_state ALTER COLUMN since SET NOT NULL;

-- Every sink the relay has known, and its health: backoff is per sink (one
-- probe per step), shared by every worker and replica through this row.
CREATE TABLE sinks (
    name          TEXT        PRIMARY KEY,
    created_at    TIMESTAMPTZ NOT NULL,
    health        TEXT        NOT NULL DEFAULT 'ok'
                  CONSTRAINT sinks_health_check CHECK (health IN ('ok', 'backing_off', 'misconfigured')),
    -- When the current run of failures began (NULL while healthy).
    failing_since TIMESTAMPTZ,
    backoff_step  INTEGER     NOT NULL DEFAULT 0 CONSTRAINT sinks_backoff_step_check CHECK (backoff_step >= 0),
    -- Not before this may a worker send anything (the next probe).
    next_probe_at TIMESTAMPTZ,
    last_error    TEXT,
    -- When the "failing for too long" alert went out for this run of failures.
    alerted_at    TIMESTAMPTZ,
    resynced_at   TIMESTAMPTZ,
    updated_at    TIMESTAMPTZ NOT NULL,
    CONSTRAINT sinks_failing_check CHECK ((health = 'ok') = (failing_since IS NULL))
);

-- What one sink holds for one phone. `pending`: the sink must be brought to
-- the phone's current target (or re-read after an uncertain write); `done`:
-- it holds it; `dead`: given up after relay.max_age, until a new change or
-- an operator's replay.
CREATE TABLE sink_phones (
    id                BIGSERIAL   PRIMARY KEY,
    sink              TEXT        NOT NULL,
    phone             TEXT        NOT NULL,
    status            TEXT        NOT NULL
                      CONSTRAINT sink_phones_status_check CHECK (status IN ('pending', 'done', 'dead')),
    -- Bumped by every event that may move the target: a worker that read
    -- the state before the bump does not mark the row done.
    generation        BIGINT      NOT NULL DEFAULT 1,
    -- The newest event that made the row pending: what a notification reports.
    event_id          BIGINT      REFERENCES events (id),
    next_attempt_at   TIMESTAMPTZ NOT NULL,
    -- A later re-read owed after an uncertain write: a request REDCap was
    -- still running may land after a newer write.
    recheck_at        TIMESTAMPTZ,
    locked_until      TIMESTAMPTZ,
    locked_by         TEXT,
    -- Failed passes since the row last became pending (shown, never a limit).
    attempts          INTEGER     NOT NULL DEFAULT 0
                      CONSTRAINT sink_phones_attempts_check CHECK (attempts >= 0),
    -- What we last wrote: NULL = nothing, so an opt-in clears nothing.
    written_opted_out BOOLEAN,
    written_since     TIMESTAMPTZ,
    written_at        TIMESTAMPTZ,
    -- The last write's outcome was unknown (it may or may not have landed).
    uncertain         BOOLEAN     NOT NULL DEFAULT FALSE,
    last_error        TEXT,
    result            JSONB,
    -- When the row last became pending: relay.max_age counts from here.
    queued_at         TIMESTAMPTZ NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL,
    CONSTRAINT sink_phones_sink_phone_key UNIQUE (sink, phone),
    CONSTRAINT sink_phones_lease_check CHECK ((locked_until IS NULL) = (locked_by IS NULL)),
    CONSTRAINT sink_phones_lease_open_check CHECK (status = 'pending' OR locked_until IS NULL),
    CONSTRAINT sink_phones_written_check CHECK ((written_opted_out IS NULL) = (written_at IS NULL))
);
-- Claims: a sink's pending rows by due time; `queued_at` rides along so the
-- queue statistics (count, oldest) read this index alone.
CREATE INDEX sink_phones_due_idx ON sink_phones (sink, next_attempt_at, id, queued_at) WHERE status = 'pending';
CREATE INDEX sink_phones_dead_idx ON sink_phones (sink, queued_at) WHERE status = 'dead';
-- A phone's rows in every sink (admin, notifications).
CREATE INDEX sink_phones_phone_idx ON sink_phones (phone);

-- What the old queue knew carries over: every (sink, phone) it held is
-- checked once more against the current target; what was last delivered is
-- taken as written, so a pending START still clears a delivered STOP.
INSERT INTO sinks (name, created_at, updated_at)
SELECT DISTINCT sink, now(), now() FROM deliveries;

INSERT INTO sink_phones (sink, phone, status, event_id, next_attempt_at, queued_at, created_at, updated_at,
                         written_opted_out, written_since, written_at)
SELECT d.sink, d.phone, 'pending', max(d.event_id), now(), now(), min(d.created_at), now(),
       last.opted_out, last.since, last.at
  FROM deliveries d
  LEFT JOIN LATERAL (
      SELECT x.kind = 'opt_out' AS opted_out,
             CASE WHEN x.kind = 'opt_out' THEN e.received_at END AS since,
             x.completed_at AS at
        FROM deliveries x JOIN events e ON e.id = x.event_id
       WHERE x.sink = d.sink AND x.phone = d.phone AND x.status = 'done'
       ORDER BY x.id DESC LIMIT 1
  ) last ON TRUE
 GROUP BY d.sink, d.phone, last.opted_out, last.since, last.at;

DROP TABLE deliveries;
