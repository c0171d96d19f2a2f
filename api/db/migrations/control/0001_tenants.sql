-- The registry of shops. Each shop's data lives in its own schema, named by the server.
CREATE TABLE sjaak.tenants (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
    schema_name text NOT NULL UNIQUE CHECK (schema_name ~ '^shop_[a-z0-9]{6,40}$'),
    status text NOT NULL DEFAULT 'active'
        CHECK (status IN ('active', 'suspended', 'deleted')),
    status_reason text,
    -- The last tenant migration applied to this shop's schema.
    schema_version integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz
);
CREATE INDEX tenants_behind ON sjaak.tenants (schema_version) WHERE status <> 'deleted';

-- Who did what to a shop, for operators and the shop's own audit trail.
CREATE TABLE sjaak.audit_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id uuid,
    actor text NOT NULL,
    action text NOT NULL,
    details jsonb NOT NULL DEFAULT '{}',
    occurred_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_by_tenant ON sjaak.audit_log (tenant_id, occurred_at DESC);
