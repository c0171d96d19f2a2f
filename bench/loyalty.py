"""Loyalty benchmark: what a points programme costs ingest, and redemption latency
(``python -m bench.loyalty``).

Starts a scratch embedded PostgreSQL (or uses ``BENCH_DATABASE_URL``), provisions two shops in one
database, saves a loyalty programme in one of them (:data:`PROGRAMME`: points per euro, a return
window, expiry, three tiers) and none in the other, seeds both with the same customers through the
real batch endpoint, and starts ``python -m api serve`` (``bench.server``, rate limits lifted).
Load comes from ``bench.load``'s closed-loop generator in this process, on loopback.

- Ingest: ``POST /v1/touchpoints`` of one new purchase at a time, by a random seeded customer
  (the same bodies in both shops, every event and order id new). The two arms alternate in
  windows of ``--seconds`` (``--rounds`` each, the first arm swapping every round), so drift in
  the machine's speed falls on both alike; the medians of the windows are compared. Target: the
  shop with a programme ingests at least 85% as many purchases per second as the shop without.
- Redemption: ``POST /v1/customers/{id}/loyalty/redemptions`` of 1 point, 32 connections, on one
  hot customer (every request queues on the same account) and on random seeded customers.
- In-process, after the server stopped: the median one-purchase ``ingest.record`` transaction
  in each shop (alternating blocks), which says how many milliseconds the programme adds.

    python -m bench.loyalty [--customers N] [--seconds S] [--rounds R] [--connections C]
                            [--singles S] [--workers W]

Results go to ``bench/results/loyalty.json``. The exit status is 1 when an answer had an
unexpected status, a connection failed, the server logged an error, fewer purchases were stored
or earned points than were sent, or a shop's ledger does not add up; a missed target alone is
reported, not a failure.
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
from typing import Any

import asyncpg
import httpx
import msgspec

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
from bench.ingest import SLOT, UniqueBodies, analyze, seed, stored_count, touchpoint
from bench.load import LoadResult, Scenario, run_load
from bench.server import HOST, Fixture, logged_errors, provision, running_server, server_log

RESULTS_FILE = Path(__file__).parent / "results" / "loyalty.json"
JSON = {"Content-Type": "application/json"}
#: A typical programme: a point per euro after a 14-day return window, expiring after a year,
#: three tiers on points earned (so every purchase also reads the customer's tier window).
PROGRAMME: dict[str, Any] = {
    "spend": {"currency": "EUR", "points": 1, "per_minor_units": 100},
    "actions": {"account_created": 100, "review_written": 50},
    "pending_days": 14,
    "expiry": {"months": 12},
    "tiers": {
        "levels": [
            {"name": "bronze", "threshold": 0},
            {"name": "silver", "threshold": 500, "multiplier_percent": 125},
            {"name": "gold", "threshold": 2000, "multiplier_percent": 150},
        ],
        "basis": "points_earned",
        "window_days": 365,
    },
    "refund_policy": "within_balance",
}
#: Event ids of the measured purchases (``LIKE`` pattern for the stored-count check).
PURCHASE_IDS = "lp-%"
TARGET_RATIO = 0.85
#: Points each customer is given before the redemption scenarios (they spend 1 at a time).
FUNDS = 1_000_000
HOT_FUNDS = 10**9

_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Arm:
    """One ingest arm: every timed window, and the medians of them."""

    name: str
    windows: list[LoadResult]
    median_rps: float
    median_p50_ms: float
    median_p99_ms: float


@dataclass(frozen=True)
class InProcess:
    """Median one-purchase ``ingest.record`` transaction in each shop, alternating blocks."""

    calls_per_arm: int
    with_programme_ms: float
    without_programme_ms: float

    @property
    def extra_ms(self) -> float:
        return self.with_programme_ms - self.without_programme_ms


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    goal: str
    verdict: str


@dataclass(frozen=True)
class LoyaltyReport:
    generated_at: str
    machine: Machine
    server_workers: int
    customers: int
    seconds: float
    rounds: int
    connections: int
    with_programme: Arm
    without_programme: Arm
    ratio: float
    redemptions: list[LoadResult]
    in_process: InProcess
    targets: list[Target]
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# --- the workload -------------------------------------------------------------------------------


def purchases(customers: Sequence[str], count: int = 4096) -> list[bytes]:
    """Single purchases by random seeded customers; each event and order id is new (SLOT)."""
    rng = random.Random(6)
    now = datetime.now(UTC)
    return [
        _encode(touchpoint(rng, f"lp-{SLOT}", "purchase", customer=rng.choice(customers), now=now))
        for _ in range(count)
    ]


def ingest_scenario(name: str, fixture: Fixture, templates: list[bytes], key: str) -> Scenario:
    return Scenario(
        name,
        "POST",
        "/v1/touchpoints",
        {"Authorization": f"Bearer {fixture.secret_key}"} | JSON,
        body_factory=UniqueBodies(templates, 1),
        expect_status=201,
        key=key,
    )


def redemption_scenarios(fixture: Fixture, hot: str, customers: Sequence[str]) -> list[Scenario]:
    headers = {"Authorization": f"Bearer {fixture.secret_key}"} | JSON
    body = _encode({"points": 1, "reason": "bench reward"})
    pick = random.Random(7).choice
    return [
        Scenario(
            "redeem 1 point, one hot customer",
            "POST",
            f"/v1/customers/{hot}/loyalty/redemptions",
            headers,
            body=body,
            expect_status=201,
            key="redeem-hot",
        ),
        Scenario(
            f"redeem 1 point, {len(customers):,} customers",
            "POST",
            "/v1/customers/{customer_id}/loyalty/redemptions",
            headers,
            body=body,
            path_factory=lambda: f"/v1/customers/{pick(customers)}/loyalty/redemptions",
            expect_status=201,
            key="redeem-many",
        ),
    ]


# --- set-up through the API ---------------------------------------------------------------------


async def save_programme(base_url: str, secret_key: str) -> None:
    headers = {"Authorization": f"Bearer {secret_key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as client:
        response = await client.put("/v1/config/loyalty", json=PROGRAMME)
        response.raise_for_status()


async def fund(base_url: str, secret_key: str, grants: dict[str, int], parallel: int = 16) -> None:
    """Give each customer points with ``POST …/loyalty/adjustments``."""
    headers = {"Authorization": f"Bearer {secret_key}"}
    limit = asyncio.Semaphore(parallel)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as client:

        async def one(customer: str, points: int) -> None:
            async with limit:
                response = await client.post(
                    f"/v1/customers/{customer}/loyalty/adjustments",
                    json={"points": points, "reason": "bench funds"},
                )
            if response.status_code != 201:
                raise RuntimeError(f"funding {customer}: {response.status_code} {response.text}")

        await asyncio.gather(*(one(customer, points) for customer, points in grants.items()))


# --- checks in the database ---------------------------------------------------------------------


async def earned_count(url: str, schema: str, pattern: str) -> int:
    """Earn entries of touchpoints whose event id matches ``pattern``."""
    schema = checked_shop_schema(schema)
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                f"SELECT count(*) FROM {schema}.loyalty_entries"
                " WHERE kind = 'earn' AND event_id LIKE $1",
                pattern,
            )
        )
    finally:
        await conn.close()


async def analyze_loyalty(url: str, schema: str) -> None:
    """Fresh statistics for the ledger's tables too (``bench.ingest.analyze`` does the rest):
    without them the planner takes the freshly seeded tables for empty ones."""
    schema = checked_shop_schema(schema)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            f"ANALYZE {schema}.loyalty_accounts, {schema}.loyalty_lots, {schema}.loyalty_entries"
        )
    finally:
        await conn.close()


async def unbalanced_accounts(url: str, schema: str) -> int:
    """Accounts whose balances differ from the sums of their entries and lots (should be 0)."""
    schema = checked_shop_schema(schema)
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                f"""
                SELECT count(*) FROM {schema}.loyalty_accounts a
                LEFT JOIN (SELECT customer_ref, sum(available_delta) AS available,
                        sum(pending_delta) AS pending, sum(lifetime_delta) AS lifetime
                    FROM {schema}.loyalty_entries GROUP BY customer_ref) e USING (customer_ref)
                LEFT JOIN (SELECT customer_ref,
                        sum(remaining) FILTER (WHERE state = 'active') AS active,
                        sum(remaining) FILTER (WHERE state = 'pending') AS pending
                    FROM {schema}.loyalty_lots GROUP BY customer_ref) l USING (customer_ref)
                WHERE a.available <> coalesce(e.available, 0)
                   OR a.available <> coalesce(l.active, 0) - a.debt
                   OR a.pending <> coalesce(e.pending, 0)
                   OR a.pending <> coalesce(l.pending, 0)
                   OR a.lifetime_earned <> coalesce(e.lifetime, 0)
                """
            )
        )
    finally:
        await conn.close()


# --- the measurements ---------------------------------------------------------------------------


def arm(name: str, windows: list[LoadResult]) -> Arm:
    return Arm(
        name=name,
        windows=windows,
        median_rps=statistics.median(w.requests_per_second for w in windows),
        median_p50_ms=statistics.median(w.p50_ms for w in windows),
        median_p99_ms=statistics.median(w.p99_ms for w in windows),
    )


async def alternate(
    port: int, loyal: Scenario, plain: Scenario, args: argparse.Namespace
) -> tuple[list[LoadResult], list[LoadResult]]:
    """``args.rounds`` windows per arm, alternating (ABBA…), after an untimed warm-up of each."""
    for scenario in (loyal, plain):
        progress(f"warming up {scenario.name} …")
        await run_load(
            HOST, port, scenario, connections=args.connections, seconds=args.warmup, warmup=0
        )
    windows: dict[str, list[LoadResult]] = {loyal.key: [], plain.key: []}
    for n in range(args.rounds):
        for scenario in (loyal, plain) if n % 2 == 0 else (plain, loyal):
            result = await run_load(
                HOST, port, scenario, connections=args.connections, seconds=args.seconds, warmup=0
            )
            windows[scenario.key].append(result)
            progress(
                f"  round {n + 1}: {scenario.name}: {result.requests_per_second:,.0f} req/s,"
                f" p99 {result.p99_ms:.1f} ms"
            )
    return windows[loyal.key], windows[plain.key]


async def tenant_of(db: Database, fixture: Fixture) -> Tenant:
    async with db.control() as conn:
        tenant_id = await conn.fetchval(
            "SELECT id FROM sjaak.tenants WHERE schema_name = $1", fixture.schema
        )
    return Tenant(id=tenant_id, schema=fixture.schema)


async def in_process(
    url: str, loyal: Fixture, plain: Fixture, customers: Sequence[str], calls: int
) -> InProcess:
    """The same one-purchase ingest transaction (``BEGIN`` … ``COMMIT``, generic plans, as the
    route runs it) in the shop with the programme and in the one without, in alternating blocks
    of 50, so the difference is what the programme adds to one purchase, without HTTP."""
    db = await Database.connect(url, min_size=1, max_size=1)
    try:
        tenants = {True: await tenant_of(db, loyal), False: await tenant_of(db, plain)}
        rng = random.Random(8)
        timings: dict[bool, list[float]] = {True: [], False: []}
        block = 50
        counter = 0
        now = datetime.now(UTC)

        async def one(with_programme: bool) -> float:
            nonlocal counter
            counter += 1
            raw = touchpoint(
                rng, f"ip-{counter}", "purchase", customer=rng.choice(customers), now=now
            )
            item = msgspec.convert(raw, TouchpointIn)
            tenant = tenants[with_programme]
            started = time.perf_counter()
            async with tenant_tx(db, tenant, generic_plans=True) as conn:
                [result] = await ingest.record(conn, [item], datetime.now(UTC), tenant.schema)
            elapsed = time.perf_counter() - started
            if result.status != "accepted":
                raise RuntimeError(f"ingest refused a bench purchase: {result}")
            return elapsed

        for warm in (True, False) * 2:
            for _ in range(block):
                await one(warm)
        for b in range(2 * max(1, calls // block)):
            with_programme = b % 2 == 0
            for _ in range(block):
                timings[with_programme].append(await one(with_programme))
    finally:
        await db.close()
    return InProcess(
        calls_per_arm=len(timings[True]),
        with_programme_ms=statistics.median(timings[True]) * 1000,
        without_programme_ms=statistics.median(timings[False]) * 1000,
    )


def judge(
    ratio: float, loyal: Arm, plain: Arm, cost: InProcess, redemptions: list[LoadResult]
) -> list[Target]:
    targets = [
        Target(
            "ingest of single purchases, programme vs none (median req/s)",
            f"{ratio:.3f} ({loyal.median_rps:,.0f} vs {plain.median_rps:,.0f} req/s,"
            f" {1 - ratio:.1%} lower)",
            f"≥ {TARGET_RATIO:.2f} (at most 15% lower)",
            "PASS" if ratio >= TARGET_RATIO else "MISS",
        ),
        Target(
            "one-purchase ingest transaction in-process, programme vs none (median)",
            f"{cost.with_programme_ms:.2f} vs {cost.without_programme_ms:.2f} ms"
            f" (+{cost.extra_ms:.2f} ms, {cost.extra_ms / cost.with_programme_ms:.1%} of it)",
            "(explains the ratio)",
            "measured",
        ),
    ]
    for result in redemptions:
        targets.append(
            Target(
                f"{result.scenario}: p99 ({result.connections} connections)",
                f"{result.p99_ms:.1f} ms (p50 {result.p50_ms:.1f}, "
                f"{result.requests_per_second:,.0f} req/s)",
                "no target set",
                "measured",
            )
        )
    return targets


def check(result: LoadResult, problems: list[str]) -> None:
    if result.unexpected or result.errors:
        problems.append(
            f"{result.scenario}: statuses {result.statuses}, {result.errors} connection errors;"
            f" first answers: {result.samples}"
        )


async def bench(args: argparse.Namespace) -> LoyaltyReport:
    secret = secrets.token_urlsafe(48)
    notes = [
        "Two shops in one database and one server: one with the programme (a point per euro,"
        " 14-day return window, 12-month expiry, three tiers on points earned), one without; both"
        f" seeded with the same {args.customers:,} customers (sign-up, visit, purchase each).",
        "Ingest: one new purchase per POST /v1/touchpoints by a random seeded customer (the same"
        f" bodies for both shops), {args.connections} connections, {args.rounds} alternating"
        f" windows of {args.seconds:g} s per arm after {args.warmup:g} s of warm-up each;"
        " medians of the windows.",
        f"Redemptions: 1 point per request, no Idempotency-Key, {args.connections} connections,"
        f" {args.seconds:g} s after {args.warmup:g} s of warm-up; customers funded with"
        " adjustments beforehand.",
        f"In-process: {args.singles:,} one-purchase ingest.record transactions per shop (BEGIN"
        " … COMMIT, generic plans, as the route runs them) in alternating blocks of 50, after"
        " the server stopped; medians.",
    ]
    problems: list[str] = []
    with server_log() as log, postgres_server() as server:
        async with bench_database(server) as url:
            loyal = await provision(url, secret)
            plain = await provision(url, secret)
            db = await Database.connect(url, min_size=1, max_size=1)
            try:
                machine = machine_facts(await postgres_version(db), server.kind)
            finally:
                await db.close()
            with running_server(url, secret, args.workers, log) as port:
                base = f"http://{HOST}:{port}"
                await save_programme(base, loyal.secret_key)
                progress(f"seeding {args.customers:,} customers in each shop …")
                customers = await seed(base, loyal.secret_key, args.customers)
                await seed(base, plain.secret_key, args.customers)
                for fixture in (loyal, plain):
                    await analyze(url, fixture.schema)
                    await analyze_loyalty(url, fixture.schema)

                templates = purchases(customers)
                with_arm = ingest_scenario(
                    "ingest purchase, programme", loyal, templates, "ingest-programme"
                )
                without_arm = ingest_scenario(
                    "ingest purchase, no programme", plain, templates, "ingest-none"
                )
                loyal_windows, plain_windows = await alternate(port, with_arm, without_arm, args)
                for result in (*loyal_windows, *plain_windows):
                    check(result, problems)

                progress("funding customers for the redemption scenarios …")
                hot, *others = customers
                await fund(base, loyal.secret_key, {hot: HOT_FUNDS} | dict.fromkeys(others, FUNDS))
                redemptions = []
                for scenario in redemption_scenarios(loyal, hot, others):
                    progress(f"running {scenario.name} …")
                    result = await run_load(
                        HOST,
                        port,
                        scenario,
                        connections=args.connections,
                        seconds=args.seconds,
                        warmup=args.warmup,
                    )
                    progress(f"  p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms")
                    check(result, problems)
                    redemptions.append(result)

            stored: dict[str, int] = {}
            for fixture, made in ((loyal, with_arm), (plain, without_arm)):
                assert isinstance(made.body_factory, UniqueBodies)
                sent = made.body_factory.items_made
                stored[made.key] = await stored_count(url, fixture.schema, PURCHASE_IDS)
                line = (
                    f"{made.name}: {sent:,} purchases sent (warm-up included),"
                    f" {stored[made.key]:,} stored"
                )
                (notes if stored[made.key] == sent else problems).append(line)
            earned = await earned_count(url, loyal.schema, PURCHASE_IDS)
            line = f"purchases that earned points in the programme's shop: {earned:,}"
            (notes if earned == stored[with_arm.key] else problems).append(line)
            progress("timing one-purchase ingest transactions in-process …")
            cost = await in_process(url, loyal, plain, customers, args.singles)
            unbalanced = await unbalanced_accounts(url, loyal.schema)
            line = f"accounts whose balances differ from their entries and lots: {unbalanced}"
            (notes if unbalanced == 0 else problems).append(line)
        errors, first = logged_errors(log)
        if errors:
            problems.append(f"the server logged {errors:,} errors (log kept in {log}): {first}")
    with_programme = arm(with_arm.name, loyal_windows)
    without_programme = arm(without_arm.name, plain_windows)
    ratio = with_programme.median_rps / without_programme.median_rps
    return LoyaltyReport(
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=machine,
        server_workers=args.workers,
        customers=args.customers,
        seconds=args.seconds,
        rounds=args.rounds,
        connections=args.connections,
        with_programme=with_programme,
        without_programme=without_programme,
        ratio=ratio,
        redemptions=redemptions,
        in_process=cost,
        targets=judge(ratio, with_programme, without_programme, cost, redemptions),
        notes=notes,
        problems=problems,
    )


def render(report: LoyaltyReport) -> str:
    m = report.machine
    lines = [
        f"## Loyalty benchmark ({report.generated_at})",
        "",
        f"Machine: {m.cpus} CPUs ({m.cpu_model}), {m.memory_gib:.1f} GiB RAM, Python {m.python},"
        f" {m.postgres.split(' on ')[0]} ({m.server}); server workers: {report.server_workers}.",
        "",
        "| ingest arm | windows (req/s) | median req/s | median p50 ms | median p99 ms |",
        "|---|---|---:|---:|---:|",
    ]
    for a in (report.with_programme, report.without_programme):
        windows = ", ".join(f"{w.requests_per_second:,.0f}" for w in a.windows)
        lines.append(
            f"| {a.name} | {windows} | {a.median_rps:,.0f} | {a.median_p50_ms:.2f} |"
            f" {a.median_p99_ms:.2f} |"
        )
    lines += [
        "",
        "| redemption | conns | req/s | p50 ms | p95 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.scenario} | {r.connections} | {r.requests_per_second:,.0f} | {r.p50_ms:.2f} |"
        f" {r.p95_ms:.2f} | {r.p99_ms:.2f} |"
        for r in report.redemptions
    ]
    lines += ["", "| target | measured | goal | verdict |", "|---|---|---|---|"]
    lines += [f"| {t.name} | {t.measured} | {t.goal} | {t.verdict} |" for t in report.targets]
    lines.append("")
    lines += [f"Note: {note}" for note in report.notes]
    lines += [f"Problem: {problem}" for problem in report.problems]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loyalty",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--customers", type=int, default=2000, help="seeded in each shop")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed window")
    parser.add_argument("--rounds", type=int, default=5, help="ingest windows per arm")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed load before")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="granian workers")
    parser.add_argument("--singles", type=int, default=1000, help="in-process ingest calls per arm")
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
