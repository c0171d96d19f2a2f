"""Numbered SQL migrations for the control schema and for every shop schema.

- Files are ``NNNN_name.sql`` in ``migrations/control`` and ``migrations/tenant``.
- The control schema records each applied file with its SHA-256 in ``sjaak.schema_migrations``
  (scope ``control`` or ``tenant``); a file changed after it was applied is refused.
- A shop's position is ``sjaak.tenants.schema_version``. All of a shop's pending files run in one
  transaction together with that update, so a failure leaves the shop exactly as it was and the
  next run picks it up again.
- A run holds a session advisory lock: a second run waits, then finds nothing left to do.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import asyncpg

from api.db.pool import Database, PooledConnection
from api.db.schemas import checked_shop_schema
from api.db.tenant import begin_in_schema_sql

log = logging.getLogger("sjaak.db.migrate")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
#: Key of the session advisory lock held by a migration run ("sjaak" in ASCII).
MIGRATION_LOCK_KEY = 0x736A61616B

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS sjaak;
CREATE TABLE IF NOT EXISTS sjaak.schema_migrations (
    scope text NOT NULL CHECK (scope IN ('control', 'tenant')),
    version integer NOT NULL,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, version)
);
"""


class MigrationError(Exception):
    """Migrations cannot proceed; the message says why and what to do."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def file_name(self) -> str:
        return f"{self.version:04d}_{self.name}.sql"


@dataclass(frozen=True)
class MigrationSet:
    """The control and tenant migrations a run works from."""

    control: tuple[Migration, ...]
    tenant: tuple[Migration, ...]

    @classmethod
    def from_directory(cls, root: Path = MIGRATIONS_DIR) -> MigrationSet:
        return cls(
            control=load_migrations(root / "control"), tenant=load_migrations(root / "tenant")
        )

    @property
    def latest_control(self) -> int:
        return self.control[-1].version if self.control else 0

    @property
    def latest_tenant(self) -> int:
        return self.tenant[-1].version if self.tenant else 0

    def tenant_after(self, version: int) -> tuple[Migration, ...]:
        return tuple(m for m in self.tenant if m.version > version)


def load_migrations(directory: Path) -> tuple[Migration, ...]:
    """Read ``NNNN_name.sql`` files; numbers must run 1, 2, 3 … without gaps."""
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNNN_lower_snake.sql")
        migrations.append(Migration(int(match[1]), match[2], path.read_text()))
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"{directory}: expected migration {expected:04d}, found {migration.file_name}"
            )
    return tuple(migrations)


@dataclass
class MigrationReport:
    control_applied: list[str] = field(default_factory=list)
    shops_total: int = 0
    shops_migrated: int = 0
    shops_failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.shops_failed


@dataclass(frozen=True)
class MigrationStatus:
    control_version: int
    control_latest: int
    tenant_latest: int
    shops_by_version: dict[int, int]

    @property
    def shops_behind(self) -> int:
        return sum(n for v, n in self.shops_by_version.items() if v < self.tenant_latest)

    @property
    def up_to_date(self) -> bool:
        return self.control_version == self.control_latest and self.shops_behind == 0


ProgressCallback = Callable[[int, int, int], None]


async def migrate(
    db: Database,
    migrations: MigrationSet | None = None,
    *,
    concurrency: int = 4,
    on_progress: ProgressCallback | None = None,
) -> MigrationReport:
    """Bring the control schema and every shop up to date; failed shops are reported, not fatal."""
    migrations = migrations or MigrationSet.from_directory()
    report = MigrationReport()
    started = time.perf_counter()
    async with db.connection() as lock_conn:
        await lock_conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            report.control_applied = await _migrate_control(lock_conn, migrations)
            await _register_tenant_catalog(lock_conn, migrations)
            behind = await lock_conn.fetch(
                "SELECT id, schema_name FROM sjaak.tenants"
                " WHERE status <> 'deleted' AND schema_version < $1 ORDER BY created_at",
                migrations.latest_tenant,
            )
            report.shops_total = len(behind)
            await _migrate_shops(db, migrations, behind, concurrency, report, on_progress)
        finally:
            await lock_conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    report.seconds = time.perf_counter() - started
    return report


async def _migrate_control(conn: PooledConnection, migrations: MigrationSet) -> list[str]:
    await conn.execute(_BOOTSTRAP)
    recorded = await _recorded(conn, "control")
    _refuse_changed_files("control", migrations.control, recorded)
    pending = [m for m in migrations.control if m.version not in recorded]
    if pending:
        async with conn.transaction():
            for migration in pending:
                await conn.execute(migration.sql)
            await _record(conn, "control", pending)
        for migration in pending:
            log.info("control migration applied", extra={"migration": migration.file_name})
    return [m.file_name for m in pending]


async def _register_tenant_catalog(conn: PooledConnection, migrations: MigrationSet) -> None:
    recorded = await _recorded(conn, "tenant")
    _refuse_changed_files("tenant", migrations.tenant, recorded)
    await _record(conn, "tenant", [m for m in migrations.tenant if m.version not in recorded])


async def check_tenant_catalog(conn: PooledConnection, migrations: MigrationSet) -> None:
    """Refuse to provision from files that differ from what ``migrate`` recorded."""
    recorded = await _recorded(conn, "tenant")
    _refuse_changed_files("tenant", migrations.tenant, recorded)
    if len(recorded) < len(migrations.tenant):
        raise MigrationError(
            "this code has tenant migrations the database has not seen yet; "
            "run `python -m api migrate` first"
        )


async def _recorded(conn: PooledConnection, scope: str) -> dict[int, str]:
    rows = await conn.fetch(
        "SELECT version, checksum FROM sjaak.schema_migrations WHERE scope = $1", scope
    )
    return {row["version"]: row["checksum"] for row in rows}


def _refuse_changed_files(
    scope: str, migrations: Sequence[Migration], recorded: dict[int, str]
) -> None:
    by_version = {m.version: m for m in migrations}
    for version, checksum in sorted(recorded.items()):
        migration = by_version.get(version)
        if migration is None:
            raise MigrationError(
                f"the database has {scope} migration {version:04d} but this code does not; "
                "deploy the newer code instead of migrating with this one"
            )
        if migration.checksum != checksum:
            raise MigrationError(
                f"{scope} migration {migration.file_name} was changed after it was applied "
                f"(recorded sha256 {checksum[:12]}…, file {migration.checksum[:12]}…); "
                "restore the original file and put the change in a new migration"
            )


async def _record(conn: PooledConnection, scope: str, migrations: Sequence[Migration]) -> None:
    await conn.executemany(
        "INSERT INTO sjaak.schema_migrations (scope, version, name, checksum)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        [(scope, m.version, m.name, m.checksum) for m in migrations],
    )


async def _migrate_shops(
    db: Database,
    migrations: MigrationSet,
    shops: Sequence[asyncpg.Record],
    concurrency: int,
    report: MigrationReport,
    on_progress: ProgressCallback | None,
) -> None:
    queue: asyncio.Queue[asyncpg.Record] = asyncio.Queue()
    for shop in shops:
        queue.put_nowait(shop)

    async def work() -> None:
        while not queue.empty():
            shop = queue.get_nowait()
            try:
                if await migrate_shop(db, shop["id"], shop["schema_name"], migrations):
                    report.shops_migrated += 1
            except (asyncpg.PostgresError, MigrationError) as exc:
                report.shops_failed[shop["schema_name"]] = str(exc)
                log.error(
                    "shop migration failed; the shop is unchanged",
                    extra={"schema": shop["schema_name"], "error": str(exc)},
                )
            if on_progress:
                done = report.shops_migrated + len(report.shops_failed)
                on_progress(done, report.shops_total, len(report.shops_failed))

    await asyncio.gather(*(work() for _ in range(max(1, concurrency))))


async def migrate_shop(
    db: Database, tenant_id: UUID, schema: str, migrations: MigrationSet
) -> bool:
    """Apply a shop's pending migrations in one transaction; False if it had none."""
    async with db.connection() as conn:
        await conn.execute(begin_in_schema_sql(schema, 0))
        try:
            current = await conn.fetchval(
                "SELECT schema_version FROM sjaak.tenants WHERE id = $1 FOR UPDATE", tenant_id
            )
            pending = migrations.tenant_after(current) if current is not None else ()
            for migration in pending:
                await conn.execute(migration.sql)
            if pending:
                await conn.execute(
                    "UPDATE sjaak.tenants SET schema_version = $2 WHERE id = $1",
                    tenant_id,
                    pending[-1].version,
                )
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        await conn.execute("COMMIT")
    return bool(pending)


async def create_shop_schema(conn: PooledConnection, schema: str, migrations: MigrationSet) -> int:
    """Create ``schema`` and apply every tenant migration, inside the caller's transaction.

    Returns the version reached. The search path is set transaction-locally, as everywhere.
    """
    await check_tenant_catalog(conn, migrations)
    schema = checked_shop_schema(schema)
    await conn.execute(f"CREATE SCHEMA {schema}; SET LOCAL search_path = {schema}")
    for migration in migrations.tenant:
        await conn.execute(migration.sql)
    return migrations.latest_tenant


async def drop_shop_schema(conn: PooledConnection, schema: str) -> None:
    """Drop a shop's schema and everything in it, inside the caller's transaction."""
    await conn.execute(f"DROP SCHEMA IF EXISTS {checked_shop_schema(schema)} CASCADE")


async def migration_status(db: Database, migrations: MigrationSet | None = None) -> MigrationStatus:
    """Where the control schema and the shops stand against the files of this code."""
    migrations = migrations or MigrationSet.from_directory()
    async with db.connection() as conn:
        exists = await conn.fetchval("SELECT to_regclass('sjaak.tenants') IS NOT NULL")
        if not exists:
            return MigrationStatus(0, migrations.latest_control, migrations.latest_tenant, {})
        control_version = await conn.fetchval(
            "SELECT coalesce(max(version), 0) FROM sjaak.schema_migrations WHERE scope = 'control'"
        )
        rows = await conn.fetch(
            "SELECT schema_version, count(*) AS shops FROM sjaak.tenants"
            " WHERE status <> 'deleted' GROUP BY schema_version"
        )
    return MigrationStatus(
        control_version=control_version,
        control_latest=migrations.latest_control,
        tenant_latest=migrations.latest_tenant,
        shops_by_version=dict(Counter({r["schema_version"]: r["shops"] for r in rows})),
    )
