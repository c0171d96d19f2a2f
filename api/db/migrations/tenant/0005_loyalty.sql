-- The customer's loyalty tier, copied from their account when it changes, so journey rules can
-- use it from the profile like any other aggregate.
ALTER TABLE customers ADD COLUMN loyalty_tier text;

-- Loyalty: the programme's versions, one account per customer, lots of points, the ledger, and
-- redemptions; plus the outbox that domain events are written to for webhooks to deliver.

-- The programme in force is the highest version; none means no programme (nothing is earned).
CREATE TABLE loyalty_programs (
    version integer PRIMARY KEY CHECK (version > 0),
    config jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL
);

-- A customer's balances as the entries sum them, kept up to date in the entry's transaction. The
-- row is also the lock that serialises every ledger write of one customer.
CREATE TABLE loyalty_accounts (
    customer_ref bigint PRIMARY KEY REFERENCES customers (id),
    available bigint NOT NULL DEFAULT 0,
    pending bigint NOT NULL DEFAULT 0,
    lifetime_earned bigint NOT NULL DEFAULT 0,
    -- Points owed after a reversal the programme let go below zero: paid from the next points
    -- that become available, so available = sum of active lots' remaining - debt.
    debt bigint NOT NULL DEFAULT 0 CHECK (debt >= 0),
    tier text,
    tier_since timestamptz,
    -- When the tier is next reviewed (the only time it can go down).
    tier_review_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX loyalty_accounts_review ON loyalty_accounts (tier_review_at)
    WHERE tier_review_at IS NOT NULL;

-- Points held together: what one earning (or give-back) brought, with its own activation and
-- expiry. Spending takes from the earliest-expiring active lots first.
CREATE TABLE loyalty_lots (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_ref bigint NOT NULL REFERENCES customers (id),
    points bigint NOT NULL CHECK (points > 0),
    remaining bigint NOT NULL CHECK (remaining >= 0 AND remaining <= points),
    state text NOT NULL CHECK (state IN ('pending', 'active')),
    order_id text,
    earned_at timestamptz NOT NULL,
    activates_at timestamptz NOT NULL,
    expires_at timestamptz,
    expiry_notified boolean NOT NULL DEFAULT false,
    -- The entry that made the lot (earn:order:<id>, …): ties an earning to its lot.
    source text
);
CREATE INDEX loyalty_lots_spendable ON loyalty_lots (customer_ref, expires_at, id)
    WHERE state = 'active' AND remaining > 0;
CREATE INDEX loyalty_lots_by_order ON loyalty_lots (order_id, customer_ref)
    WHERE order_id IS NOT NULL;
CREATE INDEX loyalty_lots_due_activation ON loyalty_lots (activates_at)
    WHERE state = 'pending' AND remaining > 0;
CREATE INDEX loyalty_lots_due_expiry ON loyalty_lots (expires_at)
    WHERE state = 'active' AND remaining > 0 AND expires_at IS NOT NULL;

-- Points spent by the customer. `restored` counts what refunds of the referenced order gave back.
CREATE TABLE loyalty_redemptions (
    id text PRIMARY KEY,
    customer_ref bigint NOT NULL REFERENCES customers (id),
    points bigint NOT NULL CHECK (points > 0),
    restored bigint NOT NULL DEFAULT 0 CHECK (restored >= 0 AND restored <= points),
    reason text NOT NULL,
    reference text,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL
);
CREATE INDEX loyalty_redemptions_by_reference ON loyalty_redemptions (reference, customer_ref)
    WHERE reference IS NOT NULL;

-- The ledger: append-only. Each entry carries its effect on each balance and the balances after
-- it, so the balances always equal the sums of the deltas.
CREATE TABLE loyalty_entries (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_ref bigint NOT NULL REFERENCES customers (id),
    kind text NOT NULL
        CHECK (kind IN ('earn', 'activate', 'redeem', 'expire', 'reverse', 'adjust')),
    available_delta bigint NOT NULL,
    pending_delta bigint NOT NULL,
    lifetime_delta bigint NOT NULL,
    available_after bigint NOT NULL,
    pending_after bigint NOT NULL,
    lifetime_after bigint NOT NULL,
    reason text NOT NULL,
    event_id text,
    order_id text,
    redemption_id text,
    actor text,
    lot_id bigint,
    -- The business time: the touchpoint's time for earnings and refunds, else when it happened.
    occurred_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- What makes a write happen once whatever is re-sent: earn:order:<id>, earn:event:<id> …
    dedupe_key text UNIQUE
);
CREATE INDEX loyalty_entries_by_customer ON loyalty_entries (customer_ref, id DESC);
CREATE INDEX loyalty_entries_earned ON loyalty_entries (customer_ref, occurred_at)
    WHERE kind IN ('earn', 'reverse');
CREATE INDEX loyalty_entries_by_time ON loyalty_entries (occurred_at);

CREATE TABLE loyalty_tier_changes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_ref bigint NOT NULL REFERENCES customers (id),
    from_tier text,
    to_tier text,
    reason text NOT NULL,
    occurred_at timestamptz NOT NULL
);
CREATE INDEX loyalty_tier_changes_by_customer ON loyalty_tier_changes (customer_ref, id);

-- Domain events written in the transaction that caused them; the webhooks worker delivers them.
CREATE TABLE outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type text NOT NULL,
    customer_ref bigint,
    payload jsonb NOT NULL,
    occurred_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz
);
CREATE INDEX outbox_undelivered ON outbox (id) WHERE delivered_at IS NULL;

-- Each refund of an order, once: its share of the order's points and what was taken back and
-- given back, so later partial refunds of the same order never take or give twice.
CREATE TABLE loyalty_refunds (
    event_id text PRIMARY KEY,
    customer_ref bigint NOT NULL REFERENCES customers (id),
    order_id text NOT NULL,
    amount bigint NOT NULL,
    share bigint NOT NULL,
    reversed bigint NOT NULL,
    restored bigint NOT NULL,
    occurred_at timestamptz NOT NULL
);
CREATE INDEX loyalty_refunds_by_order ON loyalty_refunds (order_id, customer_ref);

-- A refund finds its order's purchase (the amount its share is measured against).
CREATE INDEX touchpoints_by_order ON touchpoints (order_id) WHERE order_id IS NOT NULL;
