-- Free-text revocations for review (issue #10).
--
-- A message that is no whole-message keyword but reads like a revocation
-- ("please stop texting me") becomes one row here, for staff to decide.
-- Unique per MessageSid, so a retried webhook, or the same message by Event
-- Streams or reconciliation, makes no second item. A decision is final: the
-- CHECKs keep a pending row undecided and a decided one stamped, and an
-- opt-out decision names the staff event it recorded.
CREATE TABLE reviews (
    id                    BIGSERIAL   PRIMARY KEY,
    message_sid           TEXT        NOT NULL UNIQUE,
    account_sid           TEXT,
    messaging_service_sid TEXT,
    scope                 TEXT        NOT NULL,
    phone                 TEXT        NOT NULL,
    from_raw              TEXT        NOT NULL,
    to_number             TEXT,
    body                  TEXT        NOT NULL,
    -- The review word or phrase the body matched.
    matched               TEXT        NOT NULL,
    params                JSONB       NOT NULL,
    source                TEXT        NOT NULL,
    -- When the person said it: the FCC's clock runs from here.
    said_at               TIMESTAMPTZ NOT NULL,
    created_at            TIMESTAMPTZ NOT NULL,
    status                TEXT        NOT NULL DEFAULT 'pending'
                          CHECK (status IN ('pending', 'opted_out', 'dismissed')),
    decided_at            TIMESTAMPTZ,
    note                  TEXT,
    event_id              BIGINT      REFERENCES events (id),
    -- Set once the email sink was handed the item (NULL: not yet).
    notified_at           TIMESTAMPTZ,
    CHECK ((status = 'pending') = (decided_at IS NULL)),
    CHECK ((status = 'opted_out') = (event_id IS NOT NULL))
);
CREATE INDEX reviews_pending_idx ON reviews (said_at) WHERE status = 'pending';
CREATE INDEX reviews_unnotified_idx ON reviews (id) WHERE notified_at IS NULL;
