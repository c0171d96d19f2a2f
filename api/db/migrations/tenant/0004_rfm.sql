-- Customer value: RFM (recency, frequency, monetary), scored 1 to 5 within the shop, and the named
-- segment on top. A computation (api/journey/rfm.py) scores every unmerged profile with at least
-- one purchase in one statement and records the run; other profiles carry no scores.

ALTER TABLE customers
    -- Quintile scores within the shop, 5 the best (most recent, most frequent, highest spend).
    ADD COLUMN rfm_recency smallint CHECK (rfm_recency BETWEEN 1 AND 5),
    ADD COLUMN rfm_frequency smallint CHECK (rfm_frequency BETWEEN 1 AND 5),
    ADD COLUMN rfm_monetary smallint CHECK (rfm_monetary BETWEEN 1 AND 5),
    ADD COLUMN rfm_segment text CHECK (rfm_segment IN ('champions', 'loyal',
        'potential_loyalists', 'new', 'promising', 'need_attention', 'at_risk', 'hibernating',
        'lost')),
    -- When the run that last *changed* this customer's scores ran: a run writes only the
    -- profiles whose scores change, so the latest run (rfm_runs) says when they were confirmed.
    ADD COLUMN rfm_computed_at timestamptz;
-- Sizes per segment, targeting by segment, and the change check (scored profiles are counted).
CREATE INDEX customers_by_rfm_segment ON customers (rfm_segment) WHERE merged_into IS NULL;
-- Buyers a run has not scored yet (first purchase, or a merge made them a buyer): the change check
-- looks for any, so this index stays nearly empty.
CREATE INDEX customers_rfm_unscored ON customers (id)
    WHERE merged_into IS NULL AND last_purchase_at IS NOT NULL AND rfm_segment IS NULL;
-- Profiles that still carry scores but are no buyers any more (merged away since the last run):
-- the next run clears them, so this index is nearly empty too.
CREATE INDEX customers_rfm_stale ON customers (id)
    WHERE rfm_segment IS NOT NULL AND (merged_into IS NOT NULL OR last_purchase_at IS NULL);

-- Purchases and refunds by when they occurred (the window a run aggregates, read from the index
-- alone) and by when they were received (the change check between runs).
CREATE INDEX touchpoints_orders_by_time ON touchpoints (occurred_at)
    INCLUDE (type, customer_ref, amount, currency)
    WHERE type IN ('purchase', 'refund');
CREATE INDEX touchpoints_orders_by_receipt ON touchpoints (received_at)
    WHERE type IN ('purchase', 'refund');

-- The shop's RFM settings: one row at most (none: the defaults).
CREATE TABLE rfm_settings (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    window_days integer NOT NULL CHECK (window_days BETWEEN 1 AND 3650),
    -- ISO 4217; NULL: the currency with the most revenue in the shop at each run (EUR if none).
    currency text CHECK (currency ~ '^[A-Z]{3}$'),
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL
);

-- Every computation that changed or confirmed something; the newest is the one in force.
CREATE TABLE rfm_runs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    computed_at timestamptz NOT NULL DEFAULT now(),
    -- The UTC day the scores are as of: recency counts days to it, the window ends with it.
    as_of date NOT NULL,
    window_days integer NOT NULL,
    currency text NOT NULL,
    -- The configured currency the run found (NULL: none, `currency` was the automatic choice).
    currency_setting text,
    -- Profiles scored.
    customers integer NOT NULL,
    -- {segment: {"customers": n, "revenue": minor units in `currency` within the window}}
    segments jsonb NOT NULL,
    -- {from_segment: {to_segment: n}} against the previous run; "" stands for no segment (scored
    -- for the first time, or no longer scored).
    movement jsonb NOT NULL,
    -- Profiles whose scores this run wrote.
    changed integer NOT NULL,
    -- Purchases and refunds received since shortly before the run that it saw (the change check
    -- counts them again: more means something arrived after it).
    orders_recent integer NOT NULL,
    -- 'schedule' (the worker) or 'request' (the API).
    trigger text NOT NULL CHECK (trigger IN ('schedule', 'request'))
);
