-- EveryAction / NGP VAN (issue #9): phone -> vanId per committee. See the
-- PostgreSQL migration of the same name for why.
CREATE TABLE van_ids (
    phone        TEXT    NOT NULL,
    van_id       INTEGER NOT NULL CONSTRAINT van_ids_van_id_check CHECK (van_id > 0),
    committee_id INTEGER NOT NULL DEFAULT 0 CONSTRAINT van_ids_committee_id_check CHECK (committee_id >= 0),
    -- Milliseconds since the Unix epoch, as every instant on SQLite.
    imported_at  INTEGER NOT NULL,
    CONSTRAINT van_ids_phone_van_id_committee_id_key UNIQUE (phone, van_id, committee_id)
);
