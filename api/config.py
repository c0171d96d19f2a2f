"""Settings, read once from ``SJAAK_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

import msgspec

from api.billing.plans import parse_plans

ENV_PREFIX = "SJAAK_"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the service can be told from outside. Each field is ``SJAAK_<FIELD>``."""

    #: PostgreSQL to use. Unset: start the embedded server in ``data_dir``.
    database_url: str | None = None
    data_dir: str = ".data"
    environment: Literal["development", "test", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    pool_min_size: int = 2
    pool_max_size: int = 10
    #: Applied to every tenant and control transaction, so one bad query cannot hog a connection.
    statement_timeout_ms: int = 5000
    #: How many shops ``migrate`` works on at once.
    migrate_concurrency: int = 4
    #: Create a demo shop on ``serve`` when there is none.
    seed_demo: bool = True
    #: Secret for API-key HMACs and for encrypting token signing keys. Required in production;
    #: elsewhere it is generated once and kept in ``data_dir/secret_key``.
    secret_key: str | None = None
    #: Earlier secrets, comma-separated, still accepted while keys made under them are in use.
    previous_secret_keys: str = ""
    #: Shared rate limits across workers and hosts; unset means per-process limits.
    redis_url: str | None = None
    #: The ``iss`` of our tokens; defaults to ``http://host:port``.
    issuer: str | None = None
    access_token_ttl_seconds: int = 900
    refresh_token_ttl_days: int = 30
    signing_key_rotation_days: int = 30
    #: How often each worker polls for revoked credentials and suspended shops.
    revocation_poll_seconds: float = 5.0
    #: Default plan limits, per credential and per shop (token bucket: rate and burst).
    rate_limit_per_second: float = 50.0
    rate_limit_burst: int = 100
    shop_rate_limit_per_second: float = 200.0
    shop_rate_limit_burst: int = 400
    #: Serve ``POST /_bench/echo`` (benchmarks only: the framework's ceiling). Never in production.
    bench_echo: bool = False
    #: Let webhooks go to loopback addresses (``http://127.0.0.1:…``), for development only.
    webhooks_allow_loopback: bool = False
    #: Billing (README "Billing"): plan overrides as JSON (``api/billing/plans.py``), the grace
    #: period of a failed payment, and whether ingest counts usage (off only for benchmarks).
    billing_plans: str = ""
    billing_grace_days: int = 7
    usage_metering: bool = True
    #: Where Checkout and the billing portal send the customer back; default ``<issuer>/``.
    billing_return_url: str | None = None
    #: Stripe: the secret key, the webhook signing secret (unset: the webhook answers 404), the
    #: API's base address (unset: Stripe itself), the meter's event name and id.
    stripe_api_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_api_base: str | None = None
    stripe_meter_event_name: str = "sjaak_touchpoints"
    stripe_meter_id: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"SJAAK_PORT must be 1..65535, got {self.port}")
        if self.workers < 1 or self.migrate_concurrency < 1 or self.pool_max_size < 1:
            raise ValueError(
                "SJAAK_WORKERS, SJAAK_MIGRATE_CONCURRENCY, SJAAK_POOL_MAX_SIZE must be >= 1"
            )
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("SJAAK_POOL_MIN_SIZE must not exceed SJAAK_POOL_MAX_SIZE")
        if self.statement_timeout_ms < 0:
            raise ValueError("SJAAK_STATEMENT_TIMEOUT_MS must be >= 0")
        if not 60 <= self.access_token_ttl_seconds <= 900:
            raise ValueError("SJAAK_ACCESS_TOKEN_TTL_SECONDS must be 60..900 (RFC 9068 advice)")
        if self.secret_key is not None and len(self.secret_key) < 32:
            raise ValueError("SJAAK_SECRET_KEY must be at least 32 characters")
        if self.environment == "production" and not self.secret_key:
            raise ValueError("SJAAK_SECRET_KEY is required in production")
        if self.environment == "production" and self.bench_echo:
            raise ValueError("SJAAK_BENCH_ECHO is for benchmarks, not production")
        if self.environment == "production" and self.webhooks_allow_loopback:
            raise ValueError("SJAAK_WEBHOOKS_ALLOW_LOOPBACK is for development, not production")
        if self.billing_grace_days < 0:
            raise ValueError("SJAAK_BILLING_GRACE_DAYS must be >= 0")
        parse_plans(
            self.billing_plans,
            free_rate_per_second=self.shop_rate_limit_per_second,
            free_burst=self.shop_rate_limit_burst,
        )
        if self.environment == "production" and not self.database_url:
            raise ValueError("SJAAK_DATABASE_URL is required in production (no embedded server)")

    @property
    def token_issuer(self) -> str:
        return (self.issuer or f"http://{self.host}:{self.port}").rstrip("/")


class SettingsError(Exception):
    """A ``SJAAK_*`` variable holds a value that cannot be used."""


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build settings from ``SJAAK_*`` variables (``environ`` defaults to ``os.environ``)."""
    source = os.environ if environ is None else environ
    fields = {f.name for f in msgspec.structs.fields(Settings)}
    raw: dict[str, object] = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in source.items()
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in fields
    }
    for optional in (
        "database_url",
        "secret_key",
        "redis_url",
        "issuer",
        "billing_return_url",
        "stripe_api_key",
        "stripe_webhook_secret",
        "stripe_api_base",
        "stripe_meter_id",
    ):
        if raw.get(optional) == "":
            raw.pop(optional)
    raw.update(overrides)
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except (msgspec.ValidationError, ValueError) as exc:
        raise SettingsError(f"invalid configuration: {exc}") from exc
