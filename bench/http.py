"""HTTP benchmarks against the real service (``make bench``).

Starts a scratch embedded PostgreSQL (or uses ``BENCH_DATABASE_URL``), provisions a shop, starts
``python -m api serve`` with several granian workers and ``SJAAK_BENCH_ECHO=true``, seeds
customers through the real batch endpoint, drives closed-loop load from this separate process on
loopback and prints throughput and latency per scenario. Every figure of one run comes from the
same server, so ratios between scenarios are meaningful even on a noisy machine.

    python -m bench.http [--seconds S] [--connections C] [--batch-connections B] [--only KEYS]

Scenarios, by the key ``--only`` takes (comma-separated; ``ingest``, ``echo`` or ``whoami``
select every scenario whose key starts with it):

- ``health``, ``whoami-secret``, ``whoami-jwt``, ``api-keys``: the cost of auth.
- ``echo-single``, ``ingest-single``: one new touchpoint per ``POST /v1/touchpoints``; the echo
  route (``POST /_bench/echo``) decodes the same JSON as a one-item batch and returns it.
- ``echo-batch``, ``ingest-batch``: 500 new touchpoints per ``POST /v1/touchpoints/batch``, and the
  same bodies to the echo route, on ``--batch-connections`` connections.
- ``profile``: ``GET /v1/customers/{customer_id}`` of random seeded customers, when the server
  documents that route (else skipped, with a note); its ceiling is ``GET /health``.
- ``copy``: ``COPY`` of the batch scenario's rows, 500 per call, on ``--batch-connections``
  connections from this process: the database's ceiling (see :func:`bench.ingest.copy_rate`).

Targets (the issue's, for this 2-core machine with the load generator on it) are printed as
PASS or MISS. The exit status is 1 when an answer had an unexpected status, a connection failed,
the server logged an error, or fewer touchpoints were stored than sent; a missed target alone is
reported, not a failure. Results go to ``bench/results/http.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from api.db import Database
from bench.common import (
    Machine,
    bench_database,
    machine_facts,
    postgres_server,
    postgres_version,
    progress,
)
from bench.ingest import (
    BATCH_SIZE,
    UniqueBodies,
    Workload,
    analyze,
    copy_rate,
    seed,
    stored_count,
    workload,
)
from bench.load import LoadResult, Scenario, run_load
from bench.server import (
    HOST,
    PROFILE_ROUTE,
    Fixture,
    access_token,
    logged_errors,
    provision,
    running_server,
    server_log,
    serves_profiles,
)

RESULTS_FILE = Path(__file__).parent / "results" / "http.json"
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    goal: str
    #: PASS, MISS, or why it could not be judged.
    verdict: str


@dataclass(frozen=True)
class BenchReport:
    generated_at: str
    machine: Machine
    server_workers: int
    connections: int
    batch_connections: int
    seconds: float
    warmup: float
    seeded_customers: int
    results: list[LoadResult]
    targets: list[Target]
    ratios: dict[str, float]
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def scenarios(
    fixture: Fixture, token: str, work: Workload, customers: Sequence[str] | None, batch: int
) -> list[Scenario]:
    secret = {"Authorization": f"Bearer {fixture.secret_key}"}
    plan = [
        Scenario("health (no auth)", "GET", "/health", key="health"),
        Scenario("whoami, secret key", "GET", "/v1/me", secret, key="whoami-secret"),
        Scenario(
            "whoami, JWT", "GET", "/v1/me", {"Authorization": f"Bearer {token}"}, key="whoami-jwt"
        ),
        # A real read with one control-schema query, to put the cost of auth in proportion.
        Scenario(
            "list API keys, secret key", "GET", "/v1/api-keys?limit=10", secret, key="api-keys"
        ),
        Scenario(
            "echo, single",
            "POST",
            "/_bench/echo",
            JSON,
            body_factory=work.single_as_batch(),
            key="echo-single",
        ),
        Scenario(
            "ingest, single",
            "POST",
            "/v1/touchpoints",
            secret | JSON,
            body_factory=work.single(),
            expect_status=201,
            key="ingest-single",
        ),
        Scenario(
            f"echo, batch of {BATCH_SIZE}",
            "POST",
            "/_bench/echo",
            JSON,
            body_factory=work.batch(),
            items_per_request=BATCH_SIZE,
            connections=batch,
            key="echo-batch",
        ),
        Scenario(
            f"ingest, batch of {BATCH_SIZE}",
            "POST",
            "/v1/touchpoints/batch",
            secret | JSON,
            body_factory=work.batch(),
            items_per_request=BATCH_SIZE,
            connections=batch,
            key="ingest-batch",
        ),
    ]
    if customers:
        pick = random.Random(3).choice
        plan.append(
            Scenario(
                "profile read",
                "GET",
                PROFILE_ROUTE,
                secret,
                path_factory=lambda: f"/v1/customers/{pick(customers)}",
                key="profile",
            )
        )
    return plan


def selected(key: str, only: set[str] | None) -> bool:
    return only is None or any(key == term or key.startswith(f"{term}-") for term in only)


#: Which touchpoints each ingest scenario stores: the ``LIKE`` pattern of its event ids.
STORED_IDS = {"ingest-single": "s-%", "ingest-batch": "b-%"}


def targets(results: list[LoadResult], profile_skipped: bool) -> list[Target]:
    by = {r.key: r for r in results}

    def judged(
        name: str, measured: float | None, goal: float, shown: str, unit: str = ""
    ) -> Target:
        goal_text = f"≥ {goal:,.2f}{unit}" if goal < 100 else f"≥ {goal:,.0f}{unit}"
        if measured is None:
            return Target(name, "—", goal_text, "n/a (a scenario was not run)")
        return Target(name, shown, goal_text, "PASS" if measured >= goal else "MISS")

    def share(top: str, bottom: str, per: str = "req") -> float | None:
        if top not in by or bottom not in by:
            return None
        a, b = by[top], by[bottom]
        if per == "items":
            return a.items_per_second / b.items_per_second
        return a.requests_per_second / b.requests_per_second

    single = share("ingest-single", "echo-single")
    batch = by["ingest-batch"].items_per_second if "ingest-batch" in by else None
    batch_copy = share("ingest-batch", "copy", "items")
    profile = share("profile", "health")
    listed = [
        judged("ingest, single / echo, single (req/s)", single, 0.40, f"{single or 0:.3f}"),
    ]
    if "ingest-single" in by:
        p99 = by["ingest-single"].p99_ms
        listed.append(
            Target(
                "ingest, single: p99", f"{p99:.1f} ms", "< 50 ms", "PASS" if p99 < 50 else "MISS"
            )
        )
    else:
        listed.append(Target("ingest, single: p99", "—", "< 50 ms", "n/a (not run)"))
    listed += [
        judged("ingest, batch: touchpoints/s", batch, 50_000, f"{batch or 0:,.0f}"),
        judged("ingest, batch / COPY (rows/s)", batch_copy, 0.20, f"{batch_copy or 0:.3f}"),
    ]
    if profile_skipped:
        listed.append(
            Target("profile read / health (req/s)", "—", "≥ 0.60", f"SKIPPED (no {PROFILE_ROUTE})")
        )
    else:
        listed.append(judged("profile read / health (req/s)", profile, 0.60, f"{profile or 0:.3f}"))
    return listed


def ratios(results: list[LoadResult]) -> dict[str, float]:
    """Auth and reads against ``/health``; each ingest against its echo (items per second)."""
    by = {r.key: r for r in results}
    found: dict[str, float] = {}
    if "health" in by:
        for key in ("whoami-secret", "whoami-jwt", "api-keys", "profile"):
            if key in by:
                rps = by[key].requests_per_second / by["health"].requests_per_second
                found[f"{by[key].scenario} / health"] = round(rps, 3)
    for ingest, echo in (("ingest-single", "echo-single"), ("ingest-batch", "echo-batch")):
        if ingest in by and echo in by:
            value = by[ingest].items_per_second / by[echo].items_per_second
            found[f"{by[ingest].scenario} / {by[echo].scenario}"] = round(value, 3)
    if "profile" in by and "echo-single" in by:
        value = by["profile"].requests_per_second / by["echo-single"].requests_per_second
        found["profile read / echo, single"] = round(value, 3)
    return found


def render(report: BenchReport) -> str:
    machine = report.machine
    lines = [
        f"Machine: {machine.cpus} CPUs ({machine.cpu_model}), {machine.memory_gib:.1f} GiB, "
        f"Python {machine.python}; {machine.server}",
        f"Server: granian, {report.server_workers} workers, SJAAK_BENCH_ECHO on; "
        f"{report.seeded_customers:,} seeded customers. Load: closed loop from a separate "
        f"process on loopback, {report.seconds:g} s per scenario after {report.warmup:g} s "
        "of warm-up",
        "",
        "| scenario | conns | req/s | items/s | p50 ms | p95 ms | p99 ms | unexpected |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.results:
        unexpected = str(r.unexpected)
        if r.unexpected:
            unexpected += " (" + ", ".join(f"{s}: {n}" for s, n in r.statuses.items()) + ")"
        if r.errors:
            unexpected += f" + {r.errors} conn errors"
        lines.append(
            f"| {r.scenario} | {r.connections} | {r.requests_per_second:,.0f} | "
            f"{r.items_per_second:,.0f} | {r.p50_ms:.2f} | {r.p95_ms:.2f} | {r.p99_ms:.2f} | "
            f"{unexpected} |"
        )
    lines += ["", "| target | measured | goal | verdict |", "|---|---:|---:|---|"]
    lines += [f"| {t.name} | {t.measured} | {t.goal} | {t.verdict} |" for t in report.targets]
    if report.ratios:
        lines += ["", "| ratio (throughput) | value |", "|---|---:|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in report.ratios.items()]
    if report.notes or report.problems:
        lines += ["", *(f"- {note}" for note in report.notes)]
        lines += [f"- PROBLEM: {problem}" for problem in report.problems]
    return "\n".join(lines)


async def bench(args: argparse.Namespace) -> BenchReport:
    secret = secrets.token_urlsafe(48)
    notes = [
        "Ceilings: echo routes decode the same JSON as ingest and return it (same server, same "
        "run); profile read is compared with GET /health (no auth, no database); COPY is "
        f"asyncpg copy_records_to_table of the batch rows ({BATCH_SIZE} per call, "
        f"{args.batch_connections} connections) into a copy of the shop's touchpoints table "
        "with its indexes and without its foreign key.",
        "Ingest sends the shop's secret key; every touchpoint id is new; 3 in 5 touchpoints are "
        "about a seeded customer, the rest about new anonymous visitors.",
    ]
    problems: list[str] = []
    results: list[LoadResult] = []
    with server_log() as log, postgres_server() as server:
        async with bench_database(server) as url:
            fixture = await provision(url, secret)
            db = await Database.connect(url, min_size=1, max_size=1)
            try:
                machine = machine_facts(await postgres_version(db), server.kind)
            finally:
                await db.close()
            with running_server(url, secret, args.workers, log) as port:
                token = access_token(port, fixture)
                progress(f"seeding {args.customers:,} customers through the batch endpoint …")
                customers = await seed(f"http://{HOST}:{port}", fixture.secret_key, args.customers)
                await analyze(url, fixture.schema)
                profiles = serves_profiles(port)
                if not profiles:
                    notes.append(
                        f"profile read SKIPPED: the server does not serve GET {PROFILE_ROUTE} "
                        "(api/app.py does not register the customers routes yet)."
                    )
                work = workload(customers)
                plan = scenarios(
                    fixture, token, work, customers if profiles else None, args.batch_connections
                )
                for scenario in plan:
                    if not selected(scenario.key, args.only):
                        continue
                    progress(f"running {scenario.name} …")
                    result = await run_load(
                        HOST,
                        port,
                        scenario,
                        connections=scenario.connections or args.connections,
                        seconds=args.seconds,
                        warmup=args.warmup,
                    )
                    results.append(result)
                    if result.unexpected or result.errors:
                        problems.append(
                            f"{scenario.name}: statuses {result.statuses}, {result.errors} "
                            f"connection errors; first answers: {result.samples}"
                        )
                    if scenario.key in STORED_IDS and isinstance(
                        scenario.body_factory, UniqueBodies
                    ):
                        sent = scenario.body_factory.items_made
                        stored = await stored_count(url, fixture.schema, STORED_IDS[scenario.key])
                        check = (
                            f"{scenario.name}: {sent:,} touchpoints sent (warm-up included), "
                            f"{stored:,} stored"
                        )
                        (notes if stored == sent else problems).append(check)
                if selected("copy", args.only):
                    progress("running COPY …")
                    results.append(
                        await copy_rate(
                            url,
                            fixture.schema,
                            work.batch_items,
                            connections=args.batch_connections,
                            seconds=args.seconds,
                            warmup=args.warmup,
                        )
                    )
        errors, first = logged_errors(log)
        if errors:
            problems.append(f"the server logged {errors:,} errors (log kept in {log}): {first}")
    return BenchReport(
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=machine,
        server_workers=args.workers,
        connections=args.connections,
        batch_connections=args.batch_connections,
        seconds=args.seconds,
        warmup=args.warmup,
        seeded_customers=args.customers,
        results=results,
        targets=targets(results, profile_skipped=not profiles),
        ratios=ratios(results),
        notes=notes,
        problems=problems,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="timed window per scenario")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed load before each")
    parser.add_argument("--connections", type=int, default=32, help="for all but batches")
    parser.add_argument(
        "--batch-connections", type=int, default=4, help="for batch ingest, its echo and COPY"
    )
    parser.add_argument("--workers", type=int, default=2, help="granian workers")
    parser.add_argument("--customers", type=int, default=2000, help="seeded customers")
    parser.add_argument(
        "--only", type=lambda s: set(s.split(",")), default=None, help="scenario keys, see above"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    report = asyncio.run(bench(parse_args(argv)))
    print(render(report))
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(asdict(report), indent=2) + "\n")
    progress(f"wrote {RESULTS_FILE}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
