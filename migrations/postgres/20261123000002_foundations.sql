-- Foundations: invariants of the delivery queue in the schema, the max_age
-- clock restartable by an operator, and indexes that keep every relay and
-- operator query proportional to what it returns, not to the history.

-- When the delivery last entered the queue (created, or replayed by an
-- operator): what relay.max_age counts from.
ALTER TABLE deliveries ADD COLUMN queued_at TIMESTAMPTZ;
UPDATE deliveries SET queued_at = created_at;
ALTER TABLE deliveries ALTER COLUMN queued_at SET NOT NULL;

-- Rows written before these rules: finished rows hold no lease; only done
-- rows a result.
UPDATE deliveries SET locked_until = NULL, locked_by = NULL
 WHERE status <> 'pending' OR locked_until IS NULL OR locked_by IS NULL;
UPDATE deliveries SET result = NULL WHERE status <> 'done';
UPDATE deliveries SET attempts = 0 WHERE attempts < 0;

ALTER TABLE deliveries
    ADD CONSTRAINT deliveries_lease_check CHECK ((locked_until IS NULL) = (locked_by IS NULL)),
    ADD CONSTRAINT deliveries_lease_open_check CHECK (status = 'pending' OR locked_until IS NULL),
    ADD CONSTRAINT deliveries_attempts_check CHECK (attempts >= 0),
    ADD CONSTRAINT deliveries_result_check CHECK (result IS NULL OR status = 'done');

-- deliveries_pending_idx (sink, id) duplicated deliveries_status_idx's
-- pending part, and neither let a claim skip rows not yet due.
DROP INDEX deliveries_pending_idx;
DROP INDEX deliveries_status_idx;
-- Claims: a sink's due pending rows, earliest due first. `created_at` rides
-- along so the queue statistics (count, oldest) read this index alone.
CREATE INDEX deliveries_due_idx ON deliveries (sink, next_attempt_at, id, created_at) WHERE status = 'pending';
-- Dead letters by sink (queue statistics, operator lists). Pending rows are
-- found through deliveries_due_idx; no other index leads with the pending
-- status, so a claim's planner has one obvious path.
CREATE INDEX deliveries_dead_idx ON deliveries (sink, created_at) WHERE status = 'dead';
-- A phone's state in every scope (the key leads with the scope).
CREATE INDEX opt_out_state_phone_idx ON opt_out_state (phone);
