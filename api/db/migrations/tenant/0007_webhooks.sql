-- Webhooks (api/webhooks): the shop's endpoints; the events sent to them (one per outbox row that
-- had a subscriber, plus test events); one delivery per event and endpoint (and per manual
-- redelivery); and every HTTP attempt of a delivery, as sent and as answered.

CREATE TABLE webhook_endpoints (
    -- we_<32 hex>: random, so an id says nothing about other endpoints or shops.
    id text PRIMARY KEY,
    -- Newest-first paging.
    seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    url text NOT NULL,
    description text NOT NULL DEFAULT '',
    -- Subscribed event types, or {'*'} for all.
    event_types text[] NOT NULL CHECK (cardinality(event_types) > 0),
    enabled boolean NOT NULL DEFAULT true,
    -- The signing secret, encrypted under the service secret. After a rotation the previous
    -- one keeps signing (a second v1 in Sjaak-Signature) until previous_secret_expires_at.
    secret bytea NOT NULL,
    previous_secret bytea,
    previous_secret_expires_at timestamptz,
    -- The current run of failed automatic attempts; a run long enough disables the endpoint.
    failing_since timestamptz,
    consecutive_failures integer NOT NULL DEFAULT 0,
    disabled_reason text CHECK (disabled_reason IN ('sustained_failure')),
    disabled_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_events (
    -- evt_<32 hex>: the id every delivery of the event carries, for receivers to dedupe on.
    id text PRIMARY KEY,
    -- The outbox row it was made from (none for test events); unique, so an outbox row makes
    -- one event however often the dispatcher sees it.
    outbox_id bigint UNIQUE,
    type text NOT NULL,
    -- The profile it is about (no foreign key: erasure removes the profile and its events).
    customer_ref bigint,
    data jsonb NOT NULL,
    occurred_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_events_by_customer ON webhook_events (customer_ref)
    WHERE customer_ref IS NOT NULL;
CREATE INDEX webhook_events_by_time ON webhook_events (created_at);

CREATE TABLE webhook_deliveries (
    -- whd_<32 hex>
    id text PRIMARY KEY,
    seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    endpoint_id text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id text NOT NULL REFERENCES webhook_events (id) ON DELETE CASCADE,
    -- event: from the outbox, retried for up to 3 days; redelivery, test: one attempt, by hand.
    trigger text NOT NULL CHECK (trigger IN ('event', 'redelivery', 'test')),
    redelivery_of text,
    status text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'succeeded', 'failed', 'cancelled')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    -- Set while a worker is sending an attempt, so a duplicate job cannot send it again.
    leased_until timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
-- One automatic delivery per event and endpoint, however often the dispatcher runs.
CREATE UNIQUE INDEX webhook_deliveries_once ON webhook_deliveries (event_id, endpoint_id)
    WHERE trigger = 'event';
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, seq);
-- Pending deliveries by due time: the dispatcher re-queues any whose job was lost.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';

CREATE TABLE webhook_attempts (
    delivery_id text NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    number integer NOT NULL CHECK (number > 0),
    attempted_at timestamptz NOT NULL,
    url text NOT NULL,
    -- The checked address the connection went to (none when the guard refused the URL).
    address text,
    request_headers jsonb NOT NULL,
    request_body text NOT NULL,
    response_status integer,
    -- The first 2 KiB of the answer.
    response_body text,
    duration_ms integer NOT NULL,
    error text,
    PRIMARY KEY (delivery_id, number)
);
