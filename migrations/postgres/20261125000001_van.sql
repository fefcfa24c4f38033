-- EveryAction / NGP VAN (issue #9): which VAN person (vanId) holds a phone,
-- in which committee, as the Parsons opt-out script's table has it
-- (phone, vanid, committeeid). Several people may share a phone, and a
-- person may appear under several committees: one row per (phone, vanId,
-- committee). `committee_id` 0 means the file named no committee.
--
-- Imported with `optout-relay import-van-ids FILE.csv`; the relay (not the
-- sink) reads it to hand each everyaction sink the vanIds of a phone.
CREATE TABLE van_ids (
    phone        TEXT        NOT NULL,
    van_id       BIGINT      NOT NULL CONSTRAINT van_ids_van_id_check CHECK (van_id > 0),
    committee_id BIGINT      NOT NULL DEFAULT 0 CONSTRAINT van_ids_committee_id_check CHECK (committee_id >= 0),
    imported_at  TIMESTAMPTZ NOT NULL,
    -- Leads with the phone: it also serves the relay's lookup by phone.
    CONSTRAINT van_ids_phone_van_id_committee_id_key UNIQUE (phone, van_id, committee_id)
);
