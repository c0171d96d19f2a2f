-- Credentials live in the control schema: a request's shop is found from its credential.

-- API keys. Only an HMAC-SHA256 of the key is kept; `last4` is for display.
CREATE TABLE sjaak.api_keys (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES sjaak.tenants (id),
    kind text NOT NULL CHECK (kind IN ('publishable', 'secret', 'restricted')),
    mode text NOT NULL DEFAULT 'live' CHECK (mode IN ('live', 'test')),
    name text NOT NULL DEFAULT '',
    key_hash bytea NOT NULL UNIQUE,
    last4 text NOT NULL,
    scopes text[] NOT NULL,
    allowed_origins text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    revoked_at timestamptz,
    last_used_at timestamptz,
    rotated_from uuid REFERENCES sjaak.api_keys (id)
);
CREATE INDEX api_keys_by_tenant ON sjaak.api_keys (tenant_id, created_at DESC, id DESC);

-- OAuth clients. A shop's own clients have tenant_id set; partner apps registered at platform
-- level have none and act for the shops whose owners approved them (see oauth_grants).
CREATE TABLE sjaak.oauth_clients (
    client_id text PRIMARY KEY,
    tenant_id uuid REFERENCES sjaak.tenants (id),
    name text NOT NULL,
    secret_hash bytea NOT NULL,
    secret_last4 text NOT NULL,
    allowed_scopes text[] NOT NULL,
    grant_types text[] NOT NULL,
    redirect_uris text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX oauth_clients_by_tenant ON sjaak.oauth_clients (tenant_id, created_at DESC);

-- A shop owner's approval of a partner app, with the scopes granted (portal consent screen).
CREATE TABLE sjaak.oauth_grants (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES sjaak.tenants (id),
    client_id text NOT NULL REFERENCES sjaak.oauth_clients (client_id),
    scopes text[] NOT NULL,
    granted_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    UNIQUE (tenant_id, client_id)
);

-- Authorization codes (PKCE S256 required); single use, short lived.
CREATE TABLE sjaak.oauth_authorization_codes (
    code_hash bytea PRIMARY KEY,
    client_id text NOT NULL REFERENCES sjaak.oauth_clients (client_id),
    tenant_id uuid NOT NULL REFERENCES sjaak.tenants (id),
    redirect_uri text NOT NULL,
    scopes text[] NOT NULL,
    code_challenge text NOT NULL,
    code_challenge_method text NOT NULL CHECK (code_challenge_method = 'S256'),
    granted_by text NOT NULL,
    expires_at timestamptz NOT NULL,
    used_at timestamptz,
    -- The refresh tokens the exchange started, revoked if the code is ever replayed.
    refresh_family_id uuid
);

-- Refresh tokens rotate: each use issues a successor in the same family; reuse of a spent
-- token revokes the whole family (RFC 9700 4.14.2).
CREATE TABLE sjaak.oauth_refresh_tokens (
    token_hash bytea PRIMARY KEY,
    family_id uuid NOT NULL,
    client_id text NOT NULL REFERENCES sjaak.oauth_clients (client_id),
    tenant_id uuid NOT NULL REFERENCES sjaak.tenants (id),
    scopes text[] NOT NULL,
    issued_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at timestamptz,
    revoked_at timestamptz
);
CREATE INDEX oauth_refresh_tokens_by_family ON sjaak.oauth_refresh_tokens (family_id);

-- Token signing keys (JWK, private part encrypted with the service secret). Newest active key
-- signs; every key stays in the JWKS until the last token it signed has expired.
CREATE TABLE sjaak.signing_keys (
    kid text PRIMARY KEY,
    algorithm text NOT NULL,
    public_jwk jsonb NOT NULL,
    private_jwk_encrypted bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    retired_at timestamptz
);

-- A feed of revocations that every worker polls, so a revoked key or token, or a suspended
-- shop, stops working everywhere within the poll interval (and at once where it was revoked).
CREATE TABLE sjaak.revocations (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('api_key', 'access_token', 'tenant', 'oauth_client')),
    subject text NOT NULL,
    expires_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
