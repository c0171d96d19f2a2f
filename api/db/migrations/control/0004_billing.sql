-- Billing (api/billing): each shop's plan and subscription as Stripe reports it; the inbox of
-- Stripe's webhook events; the outbox of meter events reporting overage to Stripe; and what the
-- reconciliation job found per shop and month. Usage itself is counted in each shop's schema.

-- One row per shop that ever touched billing; a shop without one is on Free.
CREATE TABLE sjaak.billing_accounts (
    tenant_id uuid PRIMARY KEY REFERENCES sjaak.tenants (id),
    -- The plan whose subscription the shop holds (free when none is live).
    plan text NOT NULL DEFAULT 'free' CHECK (plan IN ('free', 'growth', 'scale')),
    status text NOT NULL DEFAULT 'free'
        CHECK (status IN ('free', 'trialing', 'active', 'past_due', 'restricted', 'canceled')),
    status_reason text,
    stripe_customer_id text UNIQUE,
    subscription_id text,
    -- Stripe's own word for the subscription's state, as last fetched.
    subscription_status text,
    subscription_created timestamptz,
    current_period_start timestamptz,
    current_period_end timestamptz,
    cancel_at_period_end boolean NOT NULL DEFAULT false,
    trial_end timestamptz,
    -- When we first saw the subscription past due, and when its grace period ends.
    past_due_since timestamptz,
    grace_until timestamptz,
    synced_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_accounts_in_grace ON sjaak.billing_accounts (grace_until)
    WHERE status = 'past_due';

-- Stripe's webhook events, each stored once however often it is delivered.
CREATE TABLE sjaak.stripe_events (
    event_id text NOT NULL UNIQUE,
    type text NOT NULL,
    livemode boolean NOT NULL,
    -- Stripe's time of the event.
    created timestamptz NOT NULL,
    payload jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    deliveries integer NOT NULL DEFAULT 1,
    tenant_id uuid,
    processed_at timestamptz,
    -- What processing did: 'applied', 'unchanged', 'ignored: …'.
    outcome text,
    attempts integer NOT NULL DEFAULT 0,
    last_error text
);
CREATE INDEX stripe_events_pending ON sjaak.stripe_events (received_at)
    WHERE processed_at IS NULL;

-- Meter events to send to Stripe: overage of a paid plan, as deltas of the month's cumulative
-- billable count. `identifier` (our ids: shop, month, cumulative count) is Stripe's dedupe key and
-- the request's idempotency key, so a resend never bills twice.
CREATE TABLE sjaak.meter_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    identifier text NOT NULL UNIQUE CHECK (length(identifier) <= 100),
    tenant_id uuid NOT NULL REFERENCES sjaak.tenants (id),
    stripe_customer_id text NOT NULL,
    event_name text NOT NULL,
    period_start date NOT NULL,
    value bigint NOT NULL CHECK (value > 0),
    -- The month's billable count once this event is counted.
    billable_through bigint NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- Set while a worker sends it, so no other worker sends it at the same time.
    leased_until timestamptz,
    sent_at timestamptz,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX meter_events_due ON sjaak.meter_events (next_attempt_at) WHERE status = 'pending';
CREATE INDEX meter_events_by_period ON sjaak.meter_events (tenant_id, period_start);

-- The latest comparison of our counts with what was queued, sent and (when a meter id is
-- configured) what Stripe's meter summed, per shop and month.
CREATE TABLE sjaak.usage_reconciliations (
    tenant_id uuid NOT NULL REFERENCES sjaak.tenants (id),
    period_start date NOT NULL,
    checked_at timestamptz NOT NULL,
    counted bigint NOT NULL,
    billable bigint NOT NULL,
    queued bigint NOT NULL,
    sent bigint NOT NULL,
    failed bigint NOT NULL,
    stripe_total bigint,
    status text NOT NULL CHECK (status IN ('ok', 'pending', 'mismatch')),
    PRIMARY KEY (tenant_id, period_start)
);
