"""Settings, read once from ``SJAAK_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

import msgspec

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
    if raw.get("database_url") == "":
        raw.pop("database_url")
    raw.update(overrides)
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except (msgspec.ValidationError, ValueError) as exc:
        raise SettingsError(f"invalid configuration: {exc}") from exc
