"""HTTP benchmarks against the real service (``make bench``).

Starts a scratch embedded PostgreSQL (or uses ``BENCH_DATABASE_URL``), provisions a shop, starts
``python -m api serve`` with several granian workers, drives closed-loop load from this separate
process on loopback and prints throughput and latency per scenario. Every figure of one run comes
from the same server, so ratios between scenarios are meaningful even on a noisy machine.

    python -m bench.http [--seconds S] [--connections C] [--workers W] [--only NAME,…]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from api.auth import oauth_clients
from api.auth.scopes import ALL_SCOPES
from api.auth.secrets import Keyring
from api.db import Database
from api.db.migrate import migrate
from api.tenants.lifecycle import provision_shop
from bench.common import (
    Machine,
    bench_database,
    machine_facts,
    postgres_server,
    postgres_version,
    progress,
)
from bench.load import LoadResult, Scenario, run_load

RESULTS_FILE = Path(__file__).parent / "results" / "http.json"
REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
UNLIMITED = "1000000000"


@dataclass(frozen=True)
class Fixture:
    """What the scenarios need from the provisioned shop."""

    secret_key: str
    client_id: str
    client_secret: str


@dataclass(frozen=True)
class BenchReport:
    generated_at: str
    machine: Machine
    server_workers: int
    connections: int
    seconds: float
    results: list[LoadResult]
    ratios: dict[str, float]


async def provision(url: str, secret: str) -> Fixture:
    db = await Database.connect(url, min_size=1, max_size=4)
    try:
        await migrate(db)
        keyring = Keyring(secret)
        shop = await provision_shop(db, keyring, "Bench shop", actor="bench")
        async with db.control() as conn:
            client = await oauth_clients.create_client(
                conn,
                keyring,
                tenant_id=shop.tenant.id,
                name="bench",
                scopes=ALL_SCOPES,
                grant_types=frozenset({"client_credentials"}),
            )
        return Fixture(shop.secret_key, client.client_id, client.client_secret)
    finally:
        await db.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(url: str, secret: str, workers: int) -> Iterator[int]:
    """``python -m api serve`` as production runs it; rate limits lifted so they do not bind."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SJAAK_")}
    env.update(
        SJAAK_DATABASE_URL=url,
        SJAAK_SECRET_KEY=secret,
        SJAAK_SEED_DEMO="false",
        SJAAK_ISSUER=f"http://{HOST}:{port}",
        SJAAK_RATE_LIMIT_PER_SECOND=UNLIMITED,
        SJAAK_RATE_LIMIT_BURST=UNLIMITED,
        SJAAK_SHOP_RATE_LIMIT_PER_SECOND=UNLIMITED,
        SJAAK_SHOP_RATE_LIMIT_BURST=UNLIMITED,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "api", "serve", "--port", str(port), "--workers", str(workers)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_ready(port, process)
        yield port
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_until_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(f"http://{HOST}:{port}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready within 60 s")


def access_token(port: int, fixture: Fixture) -> str:
    basic = base64.b64encode(f"{fixture.client_id}:{fixture.client_secret}".encode()).decode()
    response = httpx.post(
        f"http://{HOST}:{port}/oauth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": f"Basic {basic}"},
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


def scenarios(fixture: Fixture, token: str) -> list[Scenario]:
    return [
        Scenario("health (no auth)", "GET", "/health"),
        Scenario(
            "whoami, secret key", "GET", "/v1/me", {"Authorization": f"Bearer {fixture.secret_key}"}
        ),
        Scenario("whoami, JWT", "GET", "/v1/me", {"Authorization": f"Bearer {token}"}),
        # A real read with one control-schema query, to put the cost of auth in proportion.
        Scenario(
            "list API keys, secret key",
            "GET",
            "/v1/api-keys?limit=10",
            {"Authorization": f"Bearer {fixture.secret_key}"},
        ),
    ]


def ratios(results: list[LoadResult]) -> dict[str, float]:
    by_name = {r.scenario: r.requests_per_second for r in results}
    baseline = by_name.get("health (no auth)")
    if not baseline:
        return {}
    return {
        f"{name} / health": round(rps / baseline, 3)
        for name, rps in by_name.items()
        if name != "health (no auth)"
    }


def render(report: BenchReport) -> str:
    machine = report.machine
    lines = [
        f"Machine: {machine.cpus} CPUs ({machine.cpu_model}), {machine.memory_gib:.1f} GiB, "
        f"Python {machine.python}; {machine.server}",
        f"Server: granian, {report.server_workers} workers; load: {report.connections} "
        f"connections, {report.seconds:.0f} s per scenario, from a separate process",
        "",
        "| scenario | req/s | items/s | p50 ms | p95 ms | p99 ms | unexpected |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.results:
        lines.append(
            f"| {r.scenario} | {r.requests_per_second:,.0f} | {r.items_per_second:,.0f} | "
            f"{r.p50_ms:.2f} | {r.p95_ms:.2f} | {r.p99_ms:.2f} | {r.unexpected} |"
        )
    if report.ratios:
        lines += ["", "| ratio (throughput) | value |", "|---|---:|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in report.ratios.items()]
    return "\n".join(lines)


async def bench(args: argparse.Namespace) -> BenchReport:
    secret = secrets.token_urlsafe(48)
    with postgres_server() as server:
        async with bench_database(server) as url:
            fixture = await provision(url, secret)
            db = await Database.connect(url, min_size=1, max_size=1)
            try:
                machine = machine_facts(await postgres_version(db), server.kind)
            finally:
                await db.close()
            with running_server(url, secret, args.workers) as port:
                token = access_token(port, fixture)
                results = []
                for scenario in scenarios(fixture, token):
                    if args.only and scenario.name not in args.only:
                        continue
                    progress(f"running {scenario.name} …")
                    results.append(
                        await run_load(
                            HOST,
                            port,
                            scenario,
                            connections=args.connections,
                            seconds=args.seconds,
                            warmup=args.warmup,
                        )
                    )
    return BenchReport(
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=machine,
        server_workers=args.workers,
        connections=args.connections,
        seconds=args.seconds,
        results=results,
        ratios=ratios(results),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", type=lambda s: set(s.split(",")), default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    report = asyncio.run(bench(parse_args(argv)))
    print(render(report))
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(asdict(report), indent=2) + "\n")
    progress(f"wrote {RESULTS_FILE}")
    return 0 if all(r.unexpected == 0 for r in report.results) else 1


if __name__ == "__main__":
    sys.exit(main())
