-- Billing (api/billing): the shop's accepted touchpoints per calendar month, without a hot row.
-- Each ingest transaction that stores touchpoints appends one row to usage_log, in the statement
-- that stores them, so it never waits for another transaction and the count commits or rolls back
-- with the touchpoints. Readers fold the log into usage_totals (one row per month) now and then;
-- a month's usage is its total plus whatever is still in the log.

-- No key and no index: rows are only ever appended, summed and folded away.
CREATE TABLE usage_log (
    period_start date NOT NULL,
    touchpoints integer NOT NULL CHECK (touchpoints > 0)
);

CREATE TABLE usage_totals (
    period_start date PRIMARY KEY,
    touchpoints bigint NOT NULL CHECK (touchpoints >= 0),
    folded_at timestamptz NOT NULL DEFAULT now()
);

-- The quota alerts already raised, so each is raised once per month and quota.
CREATE TABLE usage_alerts (
    period_start date NOT NULL,
    quota bigint NOT NULL,
    percent smallint NOT NULL CHECK (percent IN (80, 100)),
    -- The month's count when the alert was raised.
    touchpoints bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (period_start, quota, percent)
);
