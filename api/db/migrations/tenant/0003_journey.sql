-- Journey stages: where each customer is, how they got there, and the rules that decide it.

ALTER TABLE customers
    -- The current stage: one of the six stages, or a drift state (at_risk, lapsed).
    ADD COLUMN stage text NOT NULL DEFAULT 'awareness',
    ADD COLUMN stage_since timestamptz,
    -- The furthest of the six stages reached; drift never lowers it, a new purchase returns to it.
    ADD COLUMN reached_stage text NOT NULL DEFAULT 'awareness',
    -- Set by a manual move: the stage the rules gave at that moment. Until the rules give more
    -- than this (new evidence), touchpoints keep the hand-set stage.
    ADD COLUMN stage_basis text;
CREATE INDEX customers_by_stage ON customers (stage) WHERE merged_into IS NULL;

-- Every move between stages, with what caused it.
CREATE TABLE stage_transitions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_ref bigint NOT NULL REFERENCES customers (id),
    from_stage text NOT NULL,
    to_stage text NOT NULL,
    occurred_at timestamptz NOT NULL,
    -- 'touchpoint' (ingest), 'drift' (the scheduled job), 'manual' (the API), 'merge'.
    cause text NOT NULL CHECK (cause IN ('touchpoint', 'drift', 'manual', 'merge')),
    touchpoint_event_id text,
    actor text,
    reason text
);
CREATE INDEX stage_transitions_by_customer ON stage_transitions (customer_ref, occurred_at, id);
CREATE INDEX stage_transitions_by_time ON stage_transitions (occurred_at);

-- The shop's journey rules, versioned; the highest version is in force (none: the defaults).
CREATE TABLE journey_rule_versions (
    version integer PRIMARY KEY,
    rules jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL,
    restored_from integer
);
