-- Personalised offers: campaigns, who is in each campaign's treatment or holdout, the offers
-- issued (each with its coupon code), and the decisions scheduled by triggering touchpoints.

CREATE TABLE campaigns (
    id text PRIMARY KEY,
    name text NOT NULL,
    status text NOT NULL CHECK (status IN ('draft', 'active', 'paused', 'ended')),
    priority integer NOT NULL DEFAULT 0,
    starts_at timestamptz,
    ends_at timestamptz,
    -- Targeting, trigger, reward, limits, holdout, variants, code format (validated by the API).
    definition jsonb NOT NULL,
    -- Budget counters, changed only by a conditional UPDATE so concurrent issues never pass it.
    issued_count bigint NOT NULL DEFAULT 0,
    redeemed_count bigint NOT NULL DEFAULT 0,
    discount_total bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL
);
CREATE INDEX campaigns_active ON campaigns (priority DESC, id) WHERE status = 'active';

-- Deterministic arm per customer and campaign, kept so the holdout can be measured.
CREATE TABLE campaign_assignments (
    campaign_id text NOT NULL REFERENCES campaigns (id),
    customer_ref bigint NOT NULL REFERENCES customers (id),
    arm text NOT NULL CHECK (arm IN ('treatment', 'holdout')),
    variant text,
    assigned_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, customer_ref)
);
CREATE INDEX campaign_assignments_by_customer ON campaign_assignments (customer_ref);

CREATE TABLE offers (
    id text PRIMARY KEY,
    campaign_id text NOT NULL REFERENCES campaigns (id),
    customer_ref bigint NOT NULL REFERENCES customers (id),
    variant text,
    code text NOT NULL UNIQUE,
    reward jsonb NOT NULL,
    stackable boolean NOT NULL,
    issued_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    redeemed_at timestamptz,
    redeemed_order_id text,
    discount bigint,
    -- What caused it: the trigger (automatic) or the request's key; one offer per cause.
    cause text NOT NULL UNIQUE
);
CREATE INDEX offers_by_customer ON offers (customer_ref, issued_at DESC);
CREATE INDEX offers_by_campaign ON offers (campaign_id, customer_ref);
CREATE INDEX offers_by_order ON offers (redeemed_order_id) WHERE redeemed_order_id IS NOT NULL;

-- A touchpoint matched a campaign's trigger: the decision runs when it is due.
CREATE TABLE offer_triggers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    campaign_id text NOT NULL REFERENCES campaigns (id),
    customer_ref bigint NOT NULL REFERENCES customers (id),
    event_id text NOT NULL,
    occurred_at timestamptz NOT NULL,
    due_at timestamptz NOT NULL,
    state text NOT NULL DEFAULT 'scheduled'
        CHECK (state IN ('scheduled', 'issued', 'cancelled', 'ineligible')),
    outcome text,
    decided_at timestamptz,
    UNIQUE (campaign_id, event_id)
);
CREATE INDEX offer_triggers_due ON offer_triggers (due_at) WHERE state = 'scheduled';
