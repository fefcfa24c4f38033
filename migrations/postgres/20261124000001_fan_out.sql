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

-- Each pending row costs the fan-out its index entries; two of them bought
-- nothing. The unique key leads with the phone, so it also serves a phone's
-- rows in every sink (admin, notifications) and the separate phone index
-- goes. `event_id` only says which event made a row pending (events are
-- never deleted), so its foreign key's per-row check goes too.
ALTER TABLE sink_phones DROP CONSTRAINT sink_phones_event_id_fkey;
ALTER TABLE sink_phones DROP CONSTRAINT sink_phones_sink_phone_key;
ALTER TABLE sink_phones ADD CONSTRAINT sink_phones_phone_sink_key UNIQUE (phone, sink);
DROP INDEX sink_phones_phone_idx;
