-- A shop's customers, keyed by the shop's own customer id. Later migrations add identities,
-- touchpoints, journey stages and the loyalty ledger beside it.
CREATE TABLE customers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id text NOT NULL UNIQUE CHECK (length(customer_id) BETWEEN 1 AND 255),
    email text,
    traits jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
