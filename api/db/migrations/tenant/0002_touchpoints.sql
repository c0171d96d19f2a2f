-- Touchpoints, the profiles they build, and the ids that lead to a profile.

-- A profile is one person, known (customer_id) or still anonymous. Its aggregates are kept up to
-- date by ingest in the same transaction, so nothing downstream rescans history.
ALTER TABLE customers ALTER COLUMN customer_id DROP NOT NULL;
ALTER TABLE customers
    ADD COLUMN name text,
    -- When each trait was last set (RFC 3339 text, by the event's corrected time): a late event
    -- never overwrites a newer value.
    ADD COLUMN trait_times jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN first_seen_at timestamptz,
    ADD COLUMN last_seen_at timestamptz,
    ADD COLUMN touchpoint_count bigint NOT NULL DEFAULT 0,
    ADD COLUMN counts_by_type jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN counts_by_channel jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN order_count integer NOT NULL DEFAULT 0,
    -- Revenue per ISO 4217 currency, in minor units: {"EUR": 12950}.
    ADD COLUMN revenue jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN last_purchase_at timestamptz,
    -- Set on a profile absorbed by an explicit merge: its ids now lead to the survivor.
    ADD COLUMN merged_into bigint REFERENCES customers (id);
CREATE INDEX customers_by_last_seen ON customers (last_seen_at DESC, id DESC)
    WHERE merged_into IS NULL;
CREATE INDEX customers_by_email ON customers (lower(email)) WHERE merged_into IS NULL;

-- Every id that leads to a profile: the shop's customer ids and the anonymous ids of devices.
CREATE TABLE identities (
    kind text NOT NULL CHECK (kind IN ('customer_id', 'anonymous_id')),
    value text NOT NULL CHECK (length(value) BETWEEN 1 AND 255),
    customer_ref bigint NOT NULL REFERENCES customers (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, value)
);
CREATE INDEX identities_by_customer ON identities (customer_ref);

-- One contact between a person and the shop. `event_id` is the client's id: re-sending is
-- harmless.
CREATE TABLE touchpoints (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id text NOT NULL UNIQUE,
    customer_ref bigint NOT NULL REFERENCES customers (id),
    type text NOT NULL,
    channel text NOT NULL,
    customer_id text,
    anonymous_id text,
    occurred_at timestamptz NOT NULL,
    sent_at timestamptz,
    received_at timestamptz NOT NULL,
    email text,
    order_id text,
    amount bigint,
    currency text,
    order_details jsonb,
    properties jsonb NOT NULL DEFAULT '{}',
    context jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX touchpoints_timeline ON touchpoints (customer_ref, occurred_at DESC, id DESC);

-- Ids of erased people: events naming them are refused, so erasure is not undone by a resend.
-- The hash covers kind and value (sha256 of "kind:value"), so it alone is the key ingest looks up.
CREATE TABLE suppressed_ids (
    value_hash bytea PRIMARY KEY,
    kind text NOT NULL,
    suppressed_at timestamptz NOT NULL DEFAULT now()
);

-- Idempotency-Key replays: the first response, for 24 hours.
CREATE TABLE idempotency_keys (
    key text PRIMARY KEY,
    route text NOT NULL,
    request_hash bytea NOT NULL,
    status integer NOT NULL,
    response bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Adds the counts of map b into map a, key by key ({"key": count} maps): how ingest folds a
-- batch into a profile. Only b's few keys are visited; a's others are kept as they are.
CREATE FUNCTION add_counts(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(a, '{}'::jsonb) || coalesce(
        (SELECT jsonb_object_agg(key, coalesce((a ->> key)::bigint, 0) + value::bigint)
         FROM jsonb_each_text(b)),
        '{}'::jsonb)
$$;
