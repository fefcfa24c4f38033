-- Fan-out off the webhook path (issue #8's ingest figure).
--
-- Ingest used to upsert one sink_phones row per sink in the webhook's own
-- transaction, so every sink added cost every webhook. Now ingest appends one
-- row here per consent change, whatever the number of sinks, and the relay's
-- fan-out task moves batches of them into sink_phones (one statement that
-- deletes what it took and upserts the rows of every sink that follows the
-- change's scope). A change is deleted in the same transaction that makes its
-- sinks' rows pending, so none is lost or fanned out twice.
CREATE TABLE changes (
    id          BIGSERIAL   PRIMARY KEY,
    scope       TEXT        NOT NULL,
    phone       TEXT        NOT NULL,
    -- The event that made the change (no foreign key: ingest inserts both in
    -- one statement, and an FK check per row is cost on the hot path).
    event_id    BIGINT      NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL
);
