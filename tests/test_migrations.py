"""Migrations: from zero, tamper detection, concurrent runs, failure and resume."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from api.db import Database, tenant_tx
from api.db.migrate import (
    MIGRATION_LOCK_KEY,
    MigrationError,
    MigrationSet,
    load_migrations,
    migrate,
    migration_status,
)
from api.tenants.lifecycle import create_tenant, get_tenant
from tests.conftest import add_tenant_migration

NOTES_TABLE = "CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL);\n"


async def table_exists(db: Database, schema: str, table: str) -> bool:
    async with db.connection() as conn:
        return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{schema}.{table}"))


async def test_migrates_an_empty_database_from_zero(fresh_db: Database) -> None:
    before = await migration_status(fresh_db)
    assert before.control_version == 0 and not before.up_to_date

    report = await migrate(fresh_db)

    migrations = MigrationSet.from_directory()
    assert report.control_applied == [m.file_name for m in migrations.control]
    assert report.ok
    status = await migration_status(fresh_db)
    assert status.up_to_date
    assert status.control_version == status.control_latest
    async with fresh_db.connection() as conn:
        recorded = await conn.fetch(
            "SELECT scope, version, checksum FROM sjaak.schema_migrations ORDER BY scope, version"
        )
    assert [(r["scope"], r["version"], r["checksum"]) for r in recorded] == [
        *[("control", m.version, m.checksum) for m in migrations.control],
        *[("tenant", m.version, m.checksum) for m in migrations.tenant],
    ]
    again = await migrate(fresh_db)
    assert again.control_applied == [] and again.shops_total == 0


async def test_a_new_shop_gets_every_tenant_migration(fresh_db: Database) -> None:
    await migrate(fresh_db)
    shop = await create_tenant(fresh_db, "New shop")
    assert shop.schema_version == MigrationSet.from_directory().latest_tenant
    assert await table_exists(fresh_db, shop.schema_name, "customers")


@pytest.mark.parametrize("scope", ["control", "tenant"])
async def test_a_changed_applied_file_is_refused(
    fresh_db: Database, migration_dir: Path, scope: str
) -> None:
    await migrate(fresh_db, MigrationSet.from_directory(migration_dir))
    first = sorted((migration_dir / scope).glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- an innocent-looking edit\n")

    with pytest.raises(MigrationError, match=rf"{scope} migration {first.name} was changed"):
        await migrate(fresh_db, MigrationSet.from_directory(migration_dir))


async def test_provisioning_refuses_files_migrate_has_not_recorded(
    fresh_db: Database, migration_dir: Path
) -> None:
    await migrate(fresh_db, MigrationSet.from_directory(migration_dir))
    newer = add_tenant_migration(migration_dir, "notes", NOTES_TABLE)
    with pytest.raises(MigrationError, match="run `python -m api migrate` first"):
        await create_tenant(fresh_db, "Too early", migrations=newer)
    async with fresh_db.connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM sjaak.tenants") == 0


async def test_code_older_than_the_database_is_refused(
    fresh_db: Database, migration_dir: Path
) -> None:
    newer = add_tenant_migration(migration_dir, "notes", NOTES_TABLE)
    await migrate(fresh_db, newer)
    (migration_dir / "tenant" / newer.tenant[-1].file_name).unlink()
    with pytest.raises(MigrationError, match="deploy the newer code"):
        await migrate(fresh_db, MigrationSet.from_directory(migration_dir))


def test_migration_files_must_be_numbered_without_gaps(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="expected migration 0002"):
        load_migrations(tmp_path)
    (tmp_path / "2_bad-name.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="NNNN_lower_snake"):
        load_migrations(tmp_path)


async def test_a_second_run_waits_for_the_first(fresh_db: Database, migration_dir: Path) -> None:
    await migrate(fresh_db, MigrationSet.from_directory(migration_dir))
    shops = [await create_tenant(fresh_db, f"Shop {i}") for i in range(3)]
    # Not idempotent on purpose: applying it twice to a shop would fail.
    newer = add_tenant_migration(migration_dir, "notes", NOTES_TABLE)

    async with fresh_db.connection() as holder:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        first = asyncio.create_task(migrate(fresh_db, newer, concurrency=2))
        second = asyncio.create_task(migrate(fresh_db, newer, concurrency=2))
        await wait_for_lock_waiters(holder, 2)
        assert not first.done() and not second.done(), "both runs wait for the lock"
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        reports = await asyncio.gather(first, second)

    assert all(r.ok for r in reports)
    assert sorted(r.shops_migrated for r in reports) == [0, 3], "each shop migrated exactly once"
    for shop in shops:
        assert (await get_tenant(fresh_db, shop.id)).schema_version == newer.latest_tenant
        assert await table_exists(fresh_db, shop.schema_name, "notes")


async def wait_for_lock_waiters(conn: asyncpg.Connection[asyncpg.Record], expected: int) -> None:
    """Poll pg_locks (bounded) until ``expected`` sessions wait on the migration lock."""
    for _ in range(500):
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )
        if waiting >= expected:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {expected} runs waiting on the migration lock")


async def test_a_failing_shop_is_left_unchanged_and_the_next_run_finishes_it(
    fresh_db: Database, migration_dir: Path
) -> None:
    await migrate(fresh_db, MigrationSet.from_directory(migration_dir))
    broken = await create_tenant(fresh_db, "Has a customer without e-mail")
    healthy = await create_tenant(fresh_db, "Clean shop")
    async with tenant_tx(fresh_db, broken.as_tenant()) as conn:
        await conn.execute("INSERT INTO customers (customer_id) VALUES ('no-email')")
    # Two statements: the first succeeds everywhere, the second fails in the broken shop.
    newer = add_tenant_migration(
        migration_dir,
        "require_email",
        NOTES_TABLE + "ALTER TABLE customers ALTER COLUMN email SET NOT NULL;\n",
    )

    report = await migrate(fresh_db, newer)

    assert list(report.shops_failed) == [broken.schema_name]
    assert "email" in report.shops_failed[broken.schema_name]
    assert report.shops_migrated == 1
    assert (await get_tenant(fresh_db, broken.id)).schema_version == newer.latest_tenant - 1
    assert not await table_exists(fresh_db, broken.schema_name, "notes"), "no half migration"
    assert await table_exists(fresh_db, healthy.schema_name, "notes")
    status = await migration_status(fresh_db, newer)
    assert status.shops_behind == 1 and not status.up_to_date

    async with tenant_tx(fresh_db, broken.as_tenant()) as conn:
        await conn.execute("UPDATE customers SET email = 'fixed@example.com'")
    resumed = await migrate(fresh_db, newer)

    assert resumed.ok and resumed.shops_total == 1 and resumed.shops_migrated == 1
    assert (await get_tenant(fresh_db, broken.id)).schema_version == newer.latest_tenant
    assert (await migration_status(fresh_db, newer)).up_to_date


async def test_progress_is_reported_per_shop(fresh_db: Database, migration_dir: Path) -> None:
    await migrate(fresh_db, MigrationSet.from_directory(migration_dir))
    for i in range(4):
        await create_tenant(fresh_db, f"Shop {i}")
    newer = add_tenant_migration(migration_dir, "notes", NOTES_TABLE)
    seen: list[tuple[int, int, int]] = []
    await migrate(fresh_db, newer, on_progress=lambda *p: seen.append(p))
    assert sorted(seen) == [(1, 4, 0), (2, 4, 0), (3, 4, 0), (4, 4, 0)]
