-- Every consent-relevant message, exactly once per Twilio MessageSid.
CREATE TABLE events (
    id                    BIGSERIAL PRIMARY KEY,
    message_sid           TEXT        NOT NULL,
    account_sid           TEXT,
    messaging_service_sid TEXT,
    scope                 TEXT        NOT NULL,
    phone                 TEXT        NOT NULL,
    from_raw              TEXT        NOT NULL,
    to_number             TEXT,
    kind                  TEXT        NOT NULL CONSTRAINT events_kind_check CHECK (kind IN ('opt_out', 'opt_in', 'help')),
    body                  TEXT        NOT NULL,
    source                TEXT        NOT NULL DEFAULT 'twilio',
    params                JSONB       NOT NULL,
    received_at           TIMESTAMPTZ NOT NULL,
    CONSTRAINT events_message_sid_key UNIQUE (message_sid)
);
CREATE INDEX events_phone_idx ON events (phone, id);

-- The current state per (scope, phone); the newest event wins.
CREATE TABLE opt_out_state (
    scope      TEXT        NOT NULL,
    phone      TEXT        NOT NULL,
    opted_out  BOOLEAN     NOT NULL,
    event_id   BIGINT      NOT NULL REFERENCES events (id),
    changed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (scope, phone)
);

-- One row per (event, sink): the relay's durable queue. Leased, never held
-- in a transaction across a call to the sink.
CREATE TABLE deliveries (
    id              BIGSERIAL PRIMARY KEY,
    event_id        BIGINT      NOT NULL REFERENCES events (id),
    sink            TEXT        NOT NULL,
    phone           TEXT        NOT NULL,
    kind            TEXT        NOT NULL CHECK (kind IN ('opt_out', 'opt_in')),
    status          TEXT        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'dead')),
    attempts        INTEGER     NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    locked_until    TIMESTAMPTZ,
    locked_by       TEXT,
    last_error      TEXT,
    result          JSONB,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    completed_at    TIMESTAMPTZ,
    -- A finished delivery has a completion time; a pending one has none.
    CONSTRAINT deliveries_completion_check CHECK ((status = 'pending') = (completed_at IS NULL)),
    CONSTRAINT deliveries_event_sink_key UNIQUE (event_id, sink)
);
-- Claims walk a sink's pending deliveries in id order; done rows pile up and must not be scanned.
CREATE INDEX deliveries_pending_idx ON deliveries (sink, id) WHERE status = 'pending';
-- Per-phone order (older pending) and superseded checks (newer done) both walk this.
CREATE INDEX deliveries_phone_idx ON deliveries (sink, phone, status, id);
CREATE INDEX deliveries_status_idx ON deliveries (status, sink, id);
