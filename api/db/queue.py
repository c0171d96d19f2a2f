"""Where the job queue (pgqueuer) lives, and the connections its worker uses.

pgqueuer's tables are in the control schema (control migration ``0003_jobs.sql``) and every
statement it sends names them with the schema, so no search path is involved anywhere.

The worker's queue connections come from a pool of their own, without the msgspec ``jsonb``
codecs :class:`~api.db.Database` installs: pgqueuer sends and reads ``jsonb`` as JSON text, and
through those codecs its headers and tracebacks would be stored as JSON strings it cannot read
back. Application code never needs this pool; it enqueues on its own connection
(:func:`api.jobs.enqueue`).
"""

from __future__ import annotations

import asyncpg
from pgqueuer.domain.settings import DBSettings
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from api.db.schemas import CONTROL_SCHEMA


class QueueNames(DBSettings):
    """pgqueuer's object names exactly as migration 0003 created them: ``sjaak.pgqueuer``,
    ``sjaak.pgqueuer_log``, ``sjaak.pgqueuer_schedules`` … ``PGQUEUER_*`` environment variables
    must not move them, so only the values given here count."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


#: The names every pgqueuer query builder in Sjaak is given.
QUEUE_NAMES = QueueNames(db_schema=CONTROL_SCHEMA)


async def connect_queue_pool(url: str, *, max_size: int = 4) -> asyncpg.Pool[asyncpg.Record]:
    """A pool for the worker's pgqueuer managers: one connection listens for new jobs, the others
    dequeue, log and beat hearts. Plain asyncpg connections (see the module docstring)."""
    return await asyncpg.create_pool(
        url,
        min_size=1,
        max_size=max(3, max_size),
        server_settings={"application_name": "sjaak-worker"},
    )
