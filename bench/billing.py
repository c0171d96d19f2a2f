"""Billing benchmark: what counting usage costs ingest (``python -m bench.billing``).

Starts a scratch embedded PostgreSQL (or uses ``BENCH_DATABASE_URL``), provisions one shop, and
starts two ``python -m api serve`` processes on the same database (``bench.server``: rate limits
and Free's quota lifted): one as production runs it, counting every accepted touchpoint
(``SJAAK_USAGE_METERING=true``), one with counting off. Customers are seeded through the first.
Load comes from ``bench.load``'s closed-loop generator in this process, on loopback, with the
bodies of ``bench.ingest`` (every touchpoint id new).

- For single ingest (``POST /v1/touchpoints``, ``--connections``) and for batches of 500
  (``POST /v1/touchpoints/batch``, ``--batch-connections``), the two servers take turns in
  windows of ``--seconds`` (``--rounds`` each, the first arm swapping every round, so drift in
  the machine's speed falls on both); the medians of the windows are compared. Only one server
  is loaded at a time. Target: counting on ingests at least 95 % as many touchpoints per second
  as counting off.
- In-process, after the servers stopped: the median one-touchpoint ingest transaction with and
  without the counting statement (alternating blocks), which says what counting adds in
  milliseconds.
- Checks: every touchpoint sent was stored, and the shop's usage equals exactly the touchpoints
  stored through the counting server (seeding included); none of the other server's.

    python -m bench.billing [--seconds S] [--rounds R] [--connections C] [--batch-connections B]
                            [--customers N] [--workers W] [--calls N]

Results go to ``bench/results/billing.json``. The exit status is 1 when an answer had an
unexpected status, a connection failed, a server logged an error or a count is off; a missed
target alone is reported, not a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from api.billing.usage import period_start
from api.db import Database, Tenant, tenant_tx
from api.db.schemas import checked_shop_schema
from api.touchpoints import ingest
from api.touchpoints.schemas import TouchpointIn
from bench.common import (
    Machine,
    bench_database,
    machine_facts,
    postgres_server,
    postgres_version,
    progress,
)
from bench.ingest import BATCH_SIZE, UniqueBodies, analyze, browsing, seed, stored_count, workload
from bench.ingest import touchpoint as bench_touchpoint
from bench.load import LoadResult, Scenario, run_load
from bench.server import (
    HOST,
    Fixture,
    logged_errors,
    provision,
    running_server,
    server_log,
)

RESULTS_FILE = Path(__file__).parent / "results" / "billing.json"
JSON = {"Content-Type": "application/json"}
TARGET = 0.95
#: The counting-off arm's counters start here, so its ids never meet the other arm's: every
#: slot it stamps begins with ``1`` (``%010x`` of 2**36 and up), the counting arm's with ``0``.
OFF_OFFSET = 1 << 36


@dataclass(frozen=True)
class Arm:
    name: str
    windows: list[LoadResult]
    median_items_per_second: float
    median_p50_ms: float
    median_p99_ms: float


@dataclass(frozen=True)
class Comparison:
    scenario: str
    counting: Arm
    not_counting: Arm
    #: counting / not counting, items per second (medians).
    ratio: float
    #: The median of each round's own ratio (the two windows of a round are adjacent in time).
    paired_ratio: float
    verdict: str


@dataclass(frozen=True)
class InProcess:
    calls_per_arm: int
    counting_median_ms: float
    not_counting_median_ms: float
    added_ms: float


@dataclass(frozen=True)
class BillingReport:
    generated_at: str
    machine: Machine
    server_workers: int
    connections: int
    batch_connections: int
    seconds: float
    rounds: int
    seeded_customers: int
    comparisons: list[Comparison]
    in_process: InProcess | None
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def offset(bodies: UniqueBodies, start: int) -> UniqueBodies:
    """``bodies`` counting from ``start`` (the slot is stamped from the counter)."""
    bodies._count = start
    return bodies


def arm(name: str, windows: list[LoadResult]) -> Arm:
    return Arm(
        name=name,
        windows=windows,
        median_items_per_second=statistics.median(w.items_per_second for w in windows),
        median_p50_ms=statistics.median(w.p50_ms for w in windows),
        median_p99_ms=statistics.median(w.p99_ms for w in windows),
    )


async def alternate(
    ports: dict[bool, int],
    scenarios: dict[bool, Scenario],
    *,
    connections: int,
    seconds: float,
    warmup: float,
    rounds: int,
) -> dict[bool, list[LoadResult]]:
    """``rounds`` windows per arm, the first arm swapping each round, after a warm-up of each."""
    for counting in (True, False):
        progress(f"warming up {scenarios[counting].name} …")
        await run_load(
            HOST,
            ports[counting],
            scenarios[counting],
            connections=connections,
            seconds=warmup,
            warmup=0,
        )
    windows: dict[bool, list[LoadResult]] = {True: [], False: []}
    for n in range(rounds):
        for counting in (True, False) if n % 2 == 0 else (False, True):
            result = await run_load(
                HOST,
                ports[counting],
                scenarios[counting],
                connections=connections,
                seconds=seconds,
                warmup=0,
            )
            windows[counting].append(result)
            progress(
                f"  round {n + 1}: {scenarios[counting].name}: "
                f"{result.items_per_second:,.0f} touchpoints/s, p99 {result.p99_ms:.1f} ms"
            )
    return windows


def compare(name: str, windows: dict[bool, list[LoadResult]]) -> Comparison:
    on, off = arm("counting on", windows[True]), arm("counting off", windows[False])
    ratio = on.median_items_per_second / off.median_items_per_second
    paired = statistics.median(
        a.items_per_second / b.items_per_second
        for a, b in zip(on.windows, off.windows, strict=True)
    )
    verdict = "PASS" if ratio >= TARGET else "MISS"
    return Comparison(name, on, off, round(ratio, 3), round(paired, 3), verdict)


def check(results: Sequence[LoadResult], problems: list[str]) -> None:
    for result in results:
        if result.unexpected or result.errors:
            problems.append(
                f"{result.scenario}: statuses {result.statuses}, {result.errors} connection "
                f"errors; first answers: {result.samples}"
            )


async def usage_of(url: str, schema: str) -> int:
    schema = checked_shop_schema(schema)
    db = await Database.connect(url, min_size=1, max_size=1)
    try:
        async with db.control() as conn:
            return int(
                await conn.fetchval(
                    f"SELECT (SELECT coalesce(sum(touchpoints), 0) FROM {schema}.usage_totals)"
                    f" + (SELECT coalesce(sum(touchpoints), 0) FROM {schema}.usage_log)"
                )
            )
    finally:
        await db.close()


async def in_process(url: str, fixture: Fixture, customers: Sequence[str], calls: int) -> InProcess:
    """The same one-touchpoint ingest transaction (``BEGIN`` … ``COMMIT``, generic plans, as the
    route runs it) with and without counting, in alternating blocks of 50."""
    db = await Database.connect(url, min_size=1, max_size=1)
    try:
        async with db.control() as conn:
            tenant_id = await conn.fetchval(
                "SELECT id FROM sjaak.tenants WHERE schema_name = $1", fixture.schema
            )
        tenant = Tenant(id=tenant_id, schema=fixture.schema)
        now = datetime.now(UTC)
        period = period_start(now)
        rng = random.Random(9)
        counter = 0
        timings: dict[bool, list[float]] = {True: [], False: []}

        async def one(counting: bool) -> float:
            nonlocal counter
            counter += 1
            raw = bench_touchpoint(
                rng, f"ip-{counter}", browsing(rng), customer=rng.choice(customers), now=now
            )
            item = msgspec.convert(raw, TouchpointIn)
            started = time.perf_counter()
            async with tenant_tx(db, tenant, generic_plans=True) as conn:
                [result] = await ingest.record(
                    conn,
                    [item],
                    datetime.now(UTC),
                    tenant.schema,
                    usage_period=period if counting else None,
                )
            elapsed = time.perf_counter() - started
            if result.status != "accepted":
                raise RuntimeError(f"ingest refused a bench touchpoint: {result}")
            return elapsed

        block = 50
        for warm in (True, False) * 2:
            for _ in range(block):
                await one(warm)
        for b in range(2 * max(1, calls // block)):
            counting = b % 2 == 0
            for _ in range(block):
                timings[counting].append(await one(counting))
    finally:
        await db.close()
    on = statistics.median(timings[True]) * 1000
    off = statistics.median(timings[False]) * 1000
    return InProcess(len(timings[True]), round(on, 3), round(off, 3), round(on - off, 3))


async def bench(args: argparse.Namespace) -> BillingReport:
    secret = secrets.token_urlsafe(48)
    notes = [
        "Both servers run on the same database and shop and are loaded one at a time; every "
        "touchpoint id is new; 3 in 5 touchpoints are about a seeded customer, the rest about "
        "new anonymous visitors (bench.ingest's mix).",
        "Counting on: the touchpoint INSERT also appends one row to the shop's usage log (no "
        "extra round trip, no row lock); the plan and the month's figure come from a "
        "per-process cache, refreshed (log folded) at most once a second per shop.",
    ]
    problems: list[str] = []
    comparisons: list[Comparison] = []
    with server_log() as log_on, server_log() as log_off, postgres_server() as server:
        async with bench_database(server) as url:
            fixture = await provision(url, secret)
            db = await Database.connect(url, min_size=1, max_size=1)
            try:
                machine = machine_facts(await postgres_version(db), server.kind)
            finally:
                await db.close()
            with (
                running_server(
                    url, secret, args.workers, log_on, {"SJAAK_USAGE_METERING": "true"}
                ) as port_on,
                running_server(
                    url, secret, args.workers, log_off, {"SJAAK_USAGE_METERING": "false"}
                ) as port_off,
            ):
                ports = {True: port_on, False: port_off}
                progress(f"seeding {args.customers:,} customers through the counting server …")
                customers = await seed(
                    f"http://{HOST}:{port_on}", fixture.secret_key, args.customers
                )
                await analyze(url, fixture.schema)
                work = workload(customers)
                secret_header = {"Authorization": f"Bearer {fixture.secret_key}"}
                plans = [
                    ("ingest, single", "/v1/touchpoints", work.single, 201, 1, args.connections),
                    (
                        f"ingest, batch of {BATCH_SIZE}",
                        "/v1/touchpoints/batch",
                        work.batch,
                        200,
                        BATCH_SIZE,
                        args.batch_connections,
                    ),
                ]
                sent: dict[bool, int] = {True: 0, False: 0}
                for name, path, bodies, status, items, connections in plans:
                    factories = {True: bodies(), False: offset(bodies(), OFF_OFFSET)}
                    scenarios = {
                        counting: Scenario(
                            f"{name}, counting {'on' if counting else 'off'}",
                            "POST",
                            path,
                            secret_header | JSON,
                            body_factory=factories[counting],
                            expect_status=status,
                            items_per_request=items,
                            key=f"{path}-{counting}",
                        )
                        for counting in (True, False)
                    }
                    windows = await alternate(
                        ports,
                        scenarios,
                        connections=connections,
                        seconds=args.seconds,
                        warmup=args.warmup,
                        rounds=args.rounds,
                    )
                    check(windows[True] + windows[False], problems)
                    comparisons.append(compare(name, windows))
                    sent[True] += factories[True].items_made
                    sent[False] += factories[False].items_made - OFF_OFFSET * items
            stored_on = sum(
                [
                    await stored_count(url, fixture.schema, "s-0%"),
                    await stored_count(url, fixture.schema, "b-0%"),
                ]
            )
            stored_off = sum(
                [
                    await stored_count(url, fixture.schema, "s-1%"),
                    await stored_count(url, fixture.schema, "b-1%"),
                ]
            )
            seeded = await stored_count(url, fixture.schema, "seed-%")
            counted = await usage_of(url, fixture.schema)
            for label, made, stored in (
                ("on", sent[True], stored_on),
                ("off", sent[False], stored_off),
            ):
                line = (
                    f"counting {label}: {made:,} touchpoints sent (warm-up included), "
                    f"{stored:,} stored"
                )
                (notes if made == stored else problems).append(line)
            line = (
                f"usage counted {counted:,} = {seeded:,} seeded + {stored_on:,} through the "
                f"counting server (and none of the {stored_off:,} through the other)"
            )
            (notes if counted == seeded + stored_on else problems).append(line)
            progress("in-process: the ingest transaction with and without counting …")
            measured = await in_process(url, fixture, customers, args.calls)
        for log in (log_on, log_off):
            errors, first = logged_errors(log)
            if errors:
                problems.append(f"a server logged {errors:,} errors (log kept in {log}): {first}")
    return BillingReport(
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=machine,
        server_workers=args.workers,
        connections=args.connections,
        batch_connections=args.batch_connections,
        seconds=args.seconds,
        rounds=args.rounds,
        seeded_customers=args.customers,
        comparisons=comparisons,
        in_process=measured,
        notes=notes,
        problems=problems,
    )


def render(report: BillingReport) -> str:
    machine = report.machine
    lines = [
        f"Machine: {machine.cpus} CPUs ({machine.cpu_model}), {machine.memory_gib:.1f} GiB, "
        f"Python {machine.python}; {machine.server}",
        f"Servers: granian, {report.server_workers} workers each; {report.seeded_customers:,} "
        f"seeded customers; {report.rounds} windows of {report.seconds:g} s per arm, alternating",
        "",
        "| scenario | counting | touchpoints/s (median) | p50 ms | p99 ms | windows |",
        "|---|---|---:|---:|---:|---|",
    ]
    for c in report.comparisons:
        for a in (c.counting, c.not_counting):
            each = ", ".join(f"{w.items_per_second:,.0f}" for w in a.windows)
            lines.append(
                f"| {c.scenario} | {a.name} | {a.median_items_per_second:,.0f} | "
                f"{a.median_p50_ms:.2f} | {a.median_p99_ms:.2f} | {each} |"
            )
    lines += [
        "",
        "| target | measured (medians) | per-round median | goal | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for c in report.comparisons:
        lines.append(
            f"| {c.scenario}: counting on / off | {c.ratio:.3f} | {c.paired_ratio:.3f} | "
            f"≥ {TARGET:.2f} | {c.verdict} |"
        )
    if report.in_process is not None:
        p = report.in_process
        lines += [
            "",
            f"In-process, one-touchpoint ingest transaction ({p.calls_per_arm:,} per arm): "
            f"{p.counting_median_ms:.3f} ms with counting, {p.not_counting_median_ms:.3f} ms "
            f"without (+{p.added_ms:.3f} ms).",
        ]
    lines += ["", *(f"- {note}" for note in report.notes)]
    lines += [f"- PROBLEM: {problem}" for problem in report.problems]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.billing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="timed window per arm")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed load per arm, first")
    parser.add_argument("--rounds", type=int, default=4, help="windows per arm and scenario")
    parser.add_argument("--connections", type=int, default=32, help="for single ingest")
    parser.add_argument("--batch-connections", type=int, default=4, help="for batch ingest")
    parser.add_argument("--workers", type=int, default=2, help="granian workers per server")
    parser.add_argument("--customers", type=int, default=2000, help="seeded customers")
    parser.add_argument("--calls", type=int, default=1000, help="in-process calls per arm")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    report = asyncio.run(bench(parse_args(argv)))
    print(render(report))
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    progress(f"wrote {RESULTS_FILE}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
