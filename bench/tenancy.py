"""The multi-tenancy benchmark the "Foundation" issue asks for.

Provision N shops (1,000 by default) one after another, then add one tenant migration and migrate
them all. Reports the provisioning time per shop, the total migration time and the PostgreSQL
catalog size left behind (rows in ``pg_class``) as a markdown table on stdout, and the same
figures as JSON in ``bench/results/tenancy.json``.

It runs on a scratch embedded PostgreSQL (durability off, as in the tests) or on the server
``BENCH_DATABASE_URL`` points at. Either way it works in a fresh database of its own, dropped at
the end, with a copy of the real migrations.

    python -m bench.tenancy [--shops N] [--concurrency C] [--output PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from api.db import Database
from api.db.migrate import MIGRATIONS_DIR, MigrationSet, migrate
from api.tenants.lifecycle import create_tenant
from bench.common import (
    Machine,
    Server,
    bench_database,
    machine_facts,
    percentile,
    postgres_server,
    postgres_version,
    progress,
)

RESULTS_FILE = Path(__file__).parent / "results" / "tenancy.json"
ADDED_MIGRATION_NAME = "bench_added_column"
ADDED_MIGRATION_SQL = """\
-- What a typical later migration does to every shop: a new column, and an index to look up by.
ALTER TABLE customers ADD COLUMN locale text;
CREATE INDEX customers_by_locale ON customers (locale);
"""
#: Provisions compared at the start and the end of the run, to see whether it slows down.
EDGE_WINDOW = 100
PROGRESS_EVERY = 100


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provisioning:
    shops: int
    median_ms: float
    p95_ms: float
    max_ms: float
    total_seconds: float
    edge_window: int
    first_median_ms: float
    last_median_ms: float
    pg_class_before: int
    pg_class_after: int
    pg_class_per_shop: float
    database_bytes: int


@dataclass(frozen=True)
class MigrationRun:
    migration_file: str
    migration_sql: str
    concurrency: int
    seconds: float
    shops_per_second: float
    shops_migrated: int
    shops_failed: int
    ok: bool
    shops_at_latest: int
    pg_class_after: int
    pg_class_per_shop: float
    database_bytes: int


@dataclass(frozen=True)
class BenchResult:
    generated_at: str
    machine: Machine
    provisioning: Provisioning
    migration: MigrationRun
    provision_ms: list[float]


# --- the server and the database --------------------------------------------------------------


@contextmanager
def migrations_copy() -> Iterator[Path]:
    """A copy of the real migrations directory that the benchmark may add a file to."""
    with tempfile.TemporaryDirectory(prefix="sjaak-bench-migrations-") as scratch:
        target = Path(scratch) / "migrations"
        shutil.copytree(MIGRATIONS_DIR, target)
        yield target


# --- measurements -----------------------------------------------------------------------------


async def pg_class_rows(db: Database) -> int:
    async with db.control() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM pg_class"))


async def database_bytes(db: Database) -> int:
    async with db.control() as conn:
        return int(await conn.fetchval("SELECT pg_database_size(current_database())"))


async def shops_at_version(db: Database, version: int) -> int:
    async with db.control() as conn:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM sjaak.tenants WHERE schema_version = $1", version
            )
        )


async def prepare_database(db: Database, migrations: MigrationSet) -> None:
    report = await migrate(db, migrations)
    if not report.ok:
        raise RuntimeError(f"initial migration failed: {report.shops_failed}")


async def provision_shops(db: Database, shops: int, migrations: MigrationSet) -> list[float]:
    """Create ``shops`` shops one after another; returns each one's duration in seconds."""
    durations: list[float] = []
    for i in range(1, shops + 1):
        started = time.perf_counter()
        await create_tenant(db, f"Bench shop {i}", actor="bench", migrations=migrations)
        durations.append(time.perf_counter() - started)
        if i % PROGRESS_EVERY == 0 or i == shops:
            recent = statistics.median(durations[-PROGRESS_EVERY:]) * 1000
            progress(f"provisioned {i}/{shops} (median of the last batch {recent:.1f} ms)")
    return durations


def added_migration_file(migrations_dir: Path) -> str:
    latest = MigrationSet.from_directory(migrations_dir).latest_tenant
    return f"{latest + 1:04d}_{ADDED_MIGRATION_NAME}.sql"


def add_migration(migrations_dir: Path) -> MigrationSet:
    (migrations_dir / "tenant" / added_migration_file(migrations_dir)).write_text(
        ADDED_MIGRATION_SQL
    )
    return MigrationSet.from_directory(migrations_dir)


def print_migration_progress(done: int, total: int, failed: int) -> None:
    if done == total or done % max(1, total // 10) == 0:
        progress(f"migrated {done}/{total} shops ({failed} failed)")


def summarise_provisioning(
    durations: Sequence[float], before: int, after: int, size: int
) -> Provisioning:
    shops = len(durations)
    window = max(1, min(EDGE_WINDOW, shops // 2))
    return Provisioning(
        shops=shops,
        median_ms=statistics.median(durations) * 1000,
        p95_ms=percentile(durations, 0.95) * 1000,
        max_ms=max(durations) * 1000,
        total_seconds=sum(durations),
        edge_window=window,
        first_median_ms=statistics.median(durations[:window]) * 1000,
        last_median_ms=statistics.median(durations[-window:]) * 1000,
        pg_class_before=before,
        pg_class_after=after,
        pg_class_per_shop=(after - before) / shops,
        database_bytes=size,
    )


async def measure_migration(
    db: Database, migrations: MigrationSet, concurrency: int, shops: int, pg_class_before: int
) -> MigrationRun:
    added = migrations.tenant[-1].file_name
    progress(f"migrating {shops} shops with {added} (concurrency {concurrency})")
    started = time.perf_counter()
    report = await migrate(
        db, migrations, concurrency=concurrency, on_progress=print_migration_progress
    )
    seconds = time.perf_counter() - started
    after = await pg_class_rows(db)
    return MigrationRun(
        migration_file=migrations.tenant[-1].file_name,
        migration_sql=ADDED_MIGRATION_SQL,
        concurrency=concurrency,
        seconds=seconds,
        shops_per_second=report.shops_migrated / seconds if seconds else 0.0,
        shops_migrated=report.shops_migrated,
        shops_failed=len(report.shops_failed),
        ok=report.ok,
        shops_at_latest=await shops_at_version(db, migrations.latest_tenant),
        pg_class_after=after,
        pg_class_per_shop=(after - pg_class_before) / shops,
        database_bytes=await database_bytes(db),
    )


async def run_benchmark(
    db: Database, server: Server, migrations_dir: Path, shops: int, concurrency: int
) -> BenchResult:
    base = MigrationSet.from_directory(migrations_dir)
    await prepare_database(db, base)
    before = await pg_class_rows(db)
    progress(f"provisioning {shops} shops one after another")
    durations = await provision_shops(db, shops, base)
    provisioning = summarise_provisioning(
        durations, before, await pg_class_rows(db), await database_bytes(db)
    )
    migration = await measure_migration(
        db, add_migration(migrations_dir), concurrency, shops, before
    )
    return BenchResult(
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=machine_facts(await postgres_version(db), server.kind),
        provisioning=provisioning,
        migration=migration,
        provision_ms=[round(d * 1000, 3) for d in durations],
    )


async def bench(server: Server, shops: int, concurrency: int) -> BenchResult:
    with migrations_copy() as migrations_dir:
        async with bench_database(server) as url:
            # migrate() holds one connection for its advisory lock, the shops need the rest.
            db = await Database.connect(url, min_size=1, max_size=concurrency + 2)
            try:
                return await run_benchmark(db, server, migrations_dir, shops, concurrency)
            finally:
                await db.close()


# --- machine facts ----------------------------------------------------------------------------


# --- output -----------------------------------------------------------------------------------


def mib(size: int) -> str:
    return f"{size / 1024**2:,.1f} MiB"


def render_table(result: BenchResult) -> str:
    m, p, g = result.machine, result.provisioning, result.migration
    rows = [
        ("Machine", f"{m.cpus} CPUs ({m.cpu_model}), {m.memory_gib:.1f} GiB RAM"),
        ("PostgreSQL", f"{m.postgres} ({m.server})"),
        ("Python", m.python),
        ("Shops provisioned (sequentially)", f"{p.shops:,}"),
        ("Provisioning per shop, median", f"{p.median_ms:.1f} ms"),
        ("Provisioning per shop, p95", f"{p.p95_ms:.1f} ms"),
        ("Provisioning per shop, max", f"{p.max_ms:.1f} ms"),
        (
            f"Provisioning median, first / last {p.edge_window}",
            f"{p.first_median_ms:.1f} ms / {p.last_median_ms:.1f} ms",
        ),
        ("Provisioning, total", f"{p.total_seconds:.1f} s"),
        ("pg_class rows before shops", f"{p.pg_class_before:,}"),
        (
            "pg_class rows after provisioning",
            f"{p.pg_class_after:,} (+{p.pg_class_per_shop:.1f} per shop)",
        ),
        ("Database size after provisioning", mib(p.database_bytes)),
        ("Added migration", " ".join(_sql_statements(g.migration_sql))),
        (
            f"Migrating all shops, total (concurrency {g.concurrency})",
            f"{g.seconds:.1f} s ({g.shops_per_second:,.0f} shops/s)",
        ),
        (
            "Migration report ok",
            f"{'yes' if g.ok else 'NO'} ({g.shops_migrated:,} migrated, {g.shops_failed} failed,"
            f" {g.shops_at_latest:,} at the latest version)",
        ),
        (
            "pg_class rows after migration",
            f"{g.pg_class_after:,} (+{g.pg_class_per_shop:.1f} per shop)",
        ),
        ("Database size after migration", mib(g.database_bytes)),
    ]
    lines = ["| Measure | Value |", "|---|---|"]
    lines += [f"| {name} | {value.replace('|', '/')} |" for name, value in rows]
    return "\n".join(lines)


def _sql_statements(sql: str) -> list[str]:
    return [
        f"`{line.strip()}`"
        for line in sql.splitlines()
        if line.strip() and not line.lstrip().startswith("--")
    ]


def write_json(result: BenchResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(result), indent=2) + "\n")


# --- command line -----------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tenancy",
        description="Provision N shops, add one tenant migration, migrate them all.",
    )
    parser.add_argument("--shops", type=positive_int, default=1000, help="default 1000")
    parser.add_argument(
        "--concurrency", type=positive_int, default=4, help="shops migrated at once (default 4)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS_FILE, help="where the JSON goes")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with postgres_server() as server:
            result = asyncio.run(bench(server, args.shops, args.concurrency))
    except KeyboardInterrupt:
        progress("interrupted; the benchmark database and scratch server were cleaned up")
        return 130
    print(render_table(result))
    write_json(result, args.output)
    progress(f"wrote {args.output}")
    return 0 if result.migration.ok else 1


if __name__ == "__main__":
    sys.exit(main())
