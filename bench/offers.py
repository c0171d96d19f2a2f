"""Offers benchmark: deciding and issuing on request at scale (``python -m bench.offers``).

Issue #7's target: ``POST /v1/customers/{customer_id}/offers/trigger`` with 20 active campaigns on
a large shop, p99 under 30 ms. Starts a scratch embedded PostgreSQL (or uses
``BENCH_DATABASE_URL``), provisions one shop and fills it with the journey benchmark's seeded
generator (:func:`bench.journey.generate`: 100,000 customers, about 2.1 million touchpoints),
scores RFM once (:func:`api.journey.rfm.recompute`), starts ``python -m api serve`` (granian, 2
workers) and creates the 20 campaigns of :data:`CAMPAIGNS` through the API: stages, RFM segments,
order and spend ranges, recent touchpoints and cart values, a few with holdouts and variants, some
stackable, priorities spread, per-customer limits and cooldowns, one with a global budget.

Then, from this separate process on loopback:

1. History (untimed): ``--history`` seconds of real issuing to random known customers, so that the
   measured decisions meet per-customer limits, cooldowns and held offers as a live shop would.
2. Outcomes: ``--sample`` sequential dry runs for random known customers, counting each
   campaign's outcome and why the ineligible ones were not eligible.
3. Reference: ``GET /v1/customers/{id}`` (one authenticated tenant read) at the largest
   connection count, to put the figures in proportion (``--no-reference`` skips it).
4. Timed, ``dry_run: true`` (the pure decision: nothing is locked, written or consumed) and then
   real issuing: closed loop (:mod:`bench.load`) at every ``--connections`` count for
   ``--seconds`` after ``--warmup``; then open loop (:func:`paced_load`: requests due at a fixed
   rate, latency counted from when each was due) at the ``--paced`` shares of the best closed-loop
   throughput. Each request is for a random known customer (one with a ``customer_id``:
   anonymous visitors cannot be addressed) with a cart value drawn from a few.
5. Checks: no answer other than 200, the budgeted campaign's ``issued_count`` equals its offers and
   stays within ``max_issued``, one ``offer.issued`` event per offer, no error in the server log.
6. Webhooks (``--webhook-events``, 0 skips): ``python -m api worker`` with loopback allowed; once
   its dispatcher has taken the outbox the runs left (no endpoint yet, so it goes nowhere), an
   endpoint for ``offer.issued`` on a loopback receiver in this process (created in the database:
   the API refuses loopback URLs unless the server allows them) and that many events copied into
   the outbox; timed until the receiver has every one, checking signatures.

    python -m bench.offers [--customers N] [--seconds S] [--connections 1,16,32]
        [--paced 0.25,0.5,0.75] [--history S] [--webhook-events N]

Results go to ``bench/results/offers.json``. The exit status is 1 when a request failed, a check
failed or the server or worker logged an error; a missed target alone is reported, not a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec

from api.auth.secrets import Keyring
from api.db import Database, Tenant, TenantConn, in_tenant
from api.db.migrate import migrate
from api.db.schemas import checked_shop_schema
from api.webhooks.endpoints import NewWebhookEndpoint, create_endpoint
from api.webhooks.signing import SIGNATURE_HEADER, verify
from bench.common import (
    Machine,
    bench_database,
    machine_facts,
    percentile,
    postgres_server,
    postgres_version,
    progress,
)
from bench.journey import SECRET, Mix, generate, provisioned, time_rfm
from bench.load import LoadResult, Scenario, run_load, summarize
from bench.server import HOST, PROFILE_ROUTE, REPO, logged_errors, running_server, server_log

RESULTS_FILE = Path(__file__).parent / "results" / "offers.json"
ROUTE = "/v1/customers/{customer_id}/offers/trigger"
TARGET_P99_MS = 30.0
#: Connections the open-loop runs send on: enough that one is nearly always free.
PACED_CONNECTIONS = 64
#: Cart values sent in ``context`` (minor units; None: no cart), cycled through.
CART_VALUES: tuple[int | None, ...] = (None, None, 1_500, 4_000, 8_000, 20_000)
#: The campaign with a global budget, to check it holds under concurrent issuing.
BUDGETED = "High-value cart"

_encode = msgspec.json.Encoder().encode


def _campaign(name: str, priority: int, reward: dict[str, Any], **rest: Any) -> dict[str, Any]:
    return {"name": name, "status": "active", "priority": priority, "reward": reward, **rest}


def _pct(percent: int) -> dict[str, Any]:
    return {"type": "percent_off", "percent": percent}


def _eur(amount: int) -> dict[str, Any]:
    return {"type": "amount_off", "amount": amount, "currency": "EUR"}


def _limits(per_customer: int | None = 1, cooldown_days: int = 0, **rest: Any) -> dict[str, Any]:
    return {"per_customer": per_customer, "cooldown_days": cooldown_days, **rest}


FREE_SHIPPING = {"type": "free_shipping"}

#: Twenty on-request campaigns, as a shop with a busy marketing team might run them at once.
CAMPAIGNS: list[dict[str, Any]] = [
    _campaign(
        "Win back lapsed big spenders",
        95,
        _eur(1500),
        targeting={"stages": ["lapsed"], "spend": {"currency": "EUR", "at_least": 15_000}},
        holdout_percent=20,
    ),
    _campaign(
        "Big spender thank-you",
        90,
        _eur(2500),
        targeting={"spend": {"currency": "EUR", "at_least": 50_000}},
        limits=_limits(1),
    ),
    _campaign(
        "At-risk nudge",
        85,
        _pct(15),
        targeting={"stages": ["at_risk"]},
        limits=_limits(3, cooldown_days=30),
        holdout_percent=10,
        variants=[
            {"name": "ten", "weight": 1, "reward": _pct(10)},
            {"name": "fifteen", "weight": 1},
        ],
    ),
    _campaign(
        "Service recovery",
        80,
        _eur(1000),
        targeting={"stages": ["service"]},
        limits=_limits(1),
    ),
    _campaign(
        "Second order",
        75,
        _pct(10),
        targeting={"stages": ["acquisition"], "orders": {"at_least": 1, "at_most": 1}},
        limits=_limits(1),
        holdout_percent=10,
    ),
    _campaign(
        "Hibernating reactivation",
        70,
        _pct(20),
        targeting={"rfm_segments": ["hibernating", "lost"]},
        limits=_limits(2, cooldown_days=60),
        holdout_percent=25,
    ),
    _campaign(
        "Cart rescue",
        65,
        FREE_SHIPPING,
        targeting={
            "recent_touchpoints": {
                "types": ["cart_abandoned", "checkout_started"],
                "within_days": 30,
            },
            "min_cart_value": 5_000,
        },
        limits=_limits(5, cooldown_days=7, stackable=True),
    ),
    _campaign(
        "Advocates: thank you",
        60,
        {"type": "bonus_points", "points": 1000},
        targeting={"stages": ["advocacy"]},
        limits=_limits(2, cooldown_days=90, stackable=True),
    ),
    _campaign(
        "Champions: bonus points",
        55,
        {"type": "bonus_points", "points": 500},
        targeting={"rfm_segments": ["champions"]},
        limits=_limits(2, cooldown_days=90, stackable=True),
    ),
    _campaign(
        "Need attention",
        50,
        _pct(12),
        targeting={"rfm_segments": ["need_attention", "at_risk"]},
        limits=_limits(2, cooldown_days=30),
        holdout_percent=15,
    ),
    _campaign(
        "Loyal: double points",
        45,
        {"type": "points_multiplier", "multiplier_percent": 200},
        targeting={"rfm_segments": ["loyal", "champions"]},
        limits=_limits(None, cooldown_days=30, stackable=True),
    ),
    _campaign(
        "Potential loyalists",
        40,
        FREE_SHIPPING,
        targeting={"rfm_segments": ["potential_loyalists", "promising"]},
        limits=_limits(2, cooldown_days=21),
        variants=[
            {"name": "shipping", "weight": 2},
            {"name": "five_off", "weight": 1, "reward": _eur(500)},
        ],
    ),
    _campaign(
        "First order",
        35,
        _pct(10),
        targeting={"stages": ["awareness", "consideration"], "orders": {"at_most": 0}},
        limits=_limits(1),
        variants=[
            {"name": "a", "weight": 1},
            {"name": "b", "weight": 1, "reward": _eur(500)},
            {"name": "c", "weight": 1, "reward": FREE_SHIPPING},
        ],
    ),
    _campaign(
        "New customers",
        30,
        _eur(500),
        targeting={"rfm_segments": ["new"]},
        limits=_limits(1),
    ),
    _campaign(
        "Newsletter readers",
        25,
        _pct(5),
        targeting={
            "recent_touchpoints": {"types": ["email_open", "email_click"], "within_days": 60}
        },
        limits=_limits(4, cooldown_days=14),
    ),
    _campaign(
        "Searchers",
        20,
        _pct(8),
        targeting={
            "recent_touchpoints": {"types": ["search", "product_view"], "within_days": 14},
            "min_cart_value": 2_000,
        },
        limits=_limits(3, cooldown_days=7, stackable=True),
    ),
    _campaign(
        "Repeat buyers",
        15,
        FREE_SHIPPING,
        targeting={"orders": {"at_least": 3, "at_most": 5}},
        limits=_limits(2, cooldown_days=30),
    ),
    _campaign(
        "Store visitors",
        10,
        _eur(1000),
        targeting={"recent_touchpoints": {"types": ["store_visit"], "within_days": 180}},
        limits=_limits(1),
    ),
    _campaign(
        BUDGETED,
        0,
        _pct(10),
        targeting={"min_cart_value": 15_000, "spend": {"currency": "EUR", "at_least": 10_000}},
        limits=_limits(2, cooldown_days=14, max_issued=2_000, stackable=True),
    ),
    _campaign(
        "Everyone: welcome back",
        -10,
        _pct(5),
        limits=_limits(1),
        holdout_percent=5,
    ),
]


# --- the workload -------------------------------------------------------------------------------


class Requests:
    """Paths for random known customers and bodies with a cart value drawn from a few; cheap,
    since they run on the same cores as the server."""

    def __init__(self, customer_ids: Sequence[str], *, dry_run: bool, seed: int) -> None:
        self._paths = [ROUTE.format(customer_id=c) for c in customer_ids]
        self._bodies = [
            _encode({"context": {} if v is None else {"cart_value": v}, "dry_run": dry_run})
            for v in CART_VALUES
        ]
        self._rng = random.Random(seed)

    def path(self) -> str:
        return self._rng.choice(self._paths)

    def body(self) -> bytes:
        return self._rng.choice(self._bodies)


def scenario(name: str, key: str, headers: dict[str, str], requests: Requests) -> Scenario:
    return Scenario(
        name,
        "POST",
        ROUTE,
        headers,
        body_factory=requests.body,
        path_factory=requests.path,
        key=key,
    )


async def paced_load(
    host: str, port: int, load: Scenario, *, rate: float, seconds: float, connections: int
) -> LoadResult:
    """Open loop: requests are due at a fixed ``rate`` whatever the answers; a free one of
    ``connections`` keep-alive connections sends each. Latency counts from when the request was
    due, so time spent waiting for a free connection counts too (no coordinated omission)."""
    next_request = load.request_factory(f"{host}:{port}")
    due: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    samples: dict[int, bytes] = {}
    errors = 0

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (at := await due.get()) is not None:
                try:
                    writer.write(next_request())
                    head = await reader.readuntil(b"\r\n\r\n")
                    body = await reader.readexactly(_content_length(head))
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                latencies.append(time.perf_counter() - at)
                status = int(head[9:12])
                statuses[status] += 1
                if status != load.expect_status:
                    samples.setdefault(status, body[:300])
        finally:
            writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    started = time.perf_counter()
    total = int(rate * seconds)
    for n in range(total):
        at = started + n / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        due.put_nowait(at)
    for _ in workers:
        due.put_nowait(None)
    await asyncio.gather(*workers)
    result = summarize(
        f"{load.name}, {rate:,.0f} req/s offered",
        load.key,
        connections=connections,
        elapsed=time.perf_counter() - started,
        latencies=latencies,
        items_per_request=1,
        unexpected=sum(n for status, n in statuses.items() if status != load.expect_status),
        errors=errors,
        statuses={str(status): n for status, n in sorted(statuses.items())},
        samples={
            str(status): sample.decode(errors="replace") for status, sample in samples.items()
        },
    )
    return result


def _content_length(head: bytes) -> int:
    lower = head.lower()
    start = lower.index(b"\r\ncontent-length:") + 17
    return int(lower[start : lower.index(b"\r\n", start)])


def reason_kind(reason: str) -> str:
    """A not-eligible reason without its particulars ('cooldown of 30 days …' → 'cooldown')."""
    kinds = (
        ("stage is ", "stage"),
        ("RFM segment is ", "RFM segment"),
        ("orders (", "orders out of range"),
        ("points (", "points out of range"),
        ("spend ", "spend too low"),
        ("cart value ", "cart value too low"),
        ("customer already received ", "per-customer limit"),
        ("cooldown of ", "cooldown"),
        ("customer holds another offer", "holds an offer that does not stack"),
        ("the campaign's budget is spent", "budget spent"),
    )
    for prefix, kind in kinds:
        if reason.startswith(prefix):
            return kind
    if reason.startswith("no ") and "touchpoint in the last" in reason:
        return "no recent touchpoint"
    return reason


@dataclass
class Outcomes:
    """What ``--sample`` dry runs decided, over every (customer, campaign) decision."""

    requests: int = 0
    decisions: int = 0
    #: Requests where at least one campaign would issue (or holds the customer out).
    with_offer: int = 0
    offers_per_request: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    not_eligible: dict[str, int] = field(default_factory=dict)
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)


def sample_outcomes(port: int, headers: dict[str, str], ids: Sequence[str], n: int) -> Outcomes:
    rng = random.Random(5)
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    per_request: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    result = Outcomes()
    with httpx.Client(base_url=f"http://{HOST}:{port}", headers=headers, timeout=60) as client:
        for _ in range(n):
            cart = rng.choice(CART_VALUES)
            body = {"context": {} if cart is None else {"cart_value": cart}, "dry_run": True}
            started = time.perf_counter()
            response = client.post(ROUTE.format(customer_id=rng.choice(ids)), json=body)
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[str(response.status_code)] += 1
            if response.status_code != 200:
                continue
            decisions = response.json()["decisions"]
            result.requests += 1
            result.decisions += len(decisions)
            fired = 0
            for decision in decisions:
                outcomes[decision["outcome"]] += 1
                if decision["outcome"] == "not_eligible":
                    reasons[reason_kind(decision["reason"])] += 1
                elif decision["outcome"] in ("would_issue", "holdout"):
                    fired += 1
            result.with_offer += fired > 0
            per_request[str(fired)] += 1
    result.outcomes = dict(outcomes.most_common())
    result.not_eligible = dict(reasons.most_common())
    result.offers_per_request = dict(sorted(per_request.items()))
    result.statuses = dict(statuses)
    result.latency_p50_ms = round(percentile(latencies, 0.5), 2)
    result.latency_p99_ms = round(percentile(latencies, 0.99), 2)
    return result


# --- webhook delivery --------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookDelivery:
    """Delivering ``events`` ``offer.issued`` events to a loopback receiver through the worker."""

    events: int
    received: int
    #: Requests beyond the first for an event (delivery is at least once).
    duplicates: int
    #: From the outbox rows' commit to the last event received (the dispatcher runs every 5 s).
    drain_seconds: float
    #: Events per second between the first and the last received.
    per_second: float
    signatures_checked: int
    signatures_bad: int
    deliveries: dict[str, int]
    #: The worker process's CPU time over the delivery, per second of it (1.0: one core busy).
    worker_cpu: float


class Receiver:
    """A loopback webhook receiver: keep-alive HTTP/1.1, answers 204, notes each event id and
    checks the first signatures."""

    def __init__(self, secret: str, check: int = 200) -> None:
        self.secret = secret
        self.check = check
        self.ids: set[str] = set()
        self.requests = 0
        self.first = self.last = 0.0
        self.checked = 0
        self.bad = 0
        self.expected = 0
        self.all_in = asyncio.Event()

    def expect(self, events: int) -> None:
        self.expected = events
        if len(self.ids) >= events:
            self.all_in.set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = await reader.readexactly(_content_length(head))
                fields = dict(
                    line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if line
                )
                headers = {name.lower(): value for name, value in fields.items()}
                now = time.perf_counter()
                self.first = self.first or now
                self.last = now
                self.requests += 1
                self.ids.add(headers.get("sjaak-event-id", ""))
                if self.expected and len(self.ids) >= self.expected:
                    self.all_in.set()
                if self.checked < self.check:
                    self.checked += 1
                    self.bad += not verify(
                        headers.get(SIGNATURE_HEADER.lower(), ""), body, self.secret
                    )
                writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


def start_worker(url: str, log: Path) -> subprocess.Popen[bytes]:
    """``python -m api worker`` with webhooks to loopback allowed (development only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SJAAK_")}
    env.update(
        SJAAK_DATABASE_URL=url,
        SJAAK_SECRET_KEY=SECRET,
        SJAAK_SEED_DEMO="false",
        SJAAK_WEBHOOKS_ALLOW_LOOPBACK="true",
    )
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "api", "worker"],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


async def outbox_drained(db: Database, schema: str) -> None:
    """Wait until the dispatcher has taken every outbox row."""
    while True:
        async with db.control() as conn:
            left = await conn.fetchval(
                f"SELECT count(*) FROM {schema}.outbox WHERE delivered_at IS NULL"
            )
        if left == 0:
            return
        await asyncio.sleep(0.5)


async def webhook_delivery(url: str, tenant: Tenant, events: int, log: Path) -> WebhookDelivery:
    """Start the worker and let its dispatcher take the outbox the runs left (no endpoint yet:
    those events go nowhere); then add an endpoint on a loopback receiver, copy ``events``
    ``offer.issued`` rows into the outbox, and time until the receiver has every one."""
    schema = checked_shop_schema(tenant.schema)
    db = await Database.connect(url, min_size=1, max_size=2)
    worker = start_worker(url, log)
    server: asyncio.Server | None = None
    try:
        progress("webhooks: the worker takes the outbox backlog first …")
        async with asyncio.timeout(600):
            await outbox_drained(db, schema)
        await asyncio.sleep(5)  # the periodic jobs every worker runs once at start-up
        keyring = Keyring(SECRET)
        receiver = Receiver("")
        server = await asyncio.start_server(receiver.handle, HOST, 0)
        port = server.sockets[0].getsockname()[1]

        async def subscribe(conn: TenantConn) -> int:
            body = NewWebhookEndpoint(
                url=f"http://{HOST}:{port}/hooks", event_types=["offer.issued"]
            )
            receiver.secret = (await create_endpoint(conn, keyring, body)).secret
            status = await conn.execute(
                "INSERT INTO outbox (type, customer_ref, payload, occurred_at)"
                " SELECT type, customer_ref, payload, now() FROM outbox"
                " WHERE type = 'offer.issued' ORDER BY id LIMIT $1",
                events,
            )
            return int(status.rsplit(" ", 1)[-1])

        made = await in_tenant(db, tenant, subscribe)
        started = time.perf_counter()
        cpu_before = process_cpu_seconds(worker.pid)
        progress(f"webhooks: {made:,} events to deliver to {HOST}:{port} …")
        receiver.expect(made)
        try:
            async with asyncio.timeout(120 + made / 20):
                await receiver.all_in.wait()
        except TimeoutError:
            progress(f"webhooks: only {len(receiver.ids):,} of {made:,} arrived in time")
        cpu = process_cpu_seconds(worker.pid) - cpu_before
        await asyncio.sleep(1)  # late duplicates, if any
        async with db.control() as conn:
            rows = await conn.fetch(
                f"SELECT status, count(*) AS n FROM {schema}.webhook_deliveries GROUP BY status"
            )
    finally:
        if server is not None:
            server.close()
        stop_worker(worker)
        await db.close()
    span = receiver.last - receiver.first
    return WebhookDelivery(
        events=made,
        received=len(receiver.ids),
        duplicates=receiver.requests - len(receiver.ids),
        drain_seconds=round(receiver.last - started, 2),
        per_second=round((len(receiver.ids) - 1) / span, 1) if span > 0 else 0.0,
        signatures_checked=receiver.checked,
        signatures_bad=receiver.bad,
        deliveries={row["status"]: row["n"] for row in rows},
        worker_cpu=round(cpu / (receiver.last - started), 2) if receiver.last > started else 0.0,
    )


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (0 where ``/proc`` has none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """What the issuing left in the shop."""

    offers: int
    assignments_treatment: int
    assignments_holdout: int
    outbox_offer_issued: int
    budgeted_issued_count: int
    budgeted_offers: int
    budgeted_max: int


@dataclass(frozen=True)
class OffersReport:
    generated_at: str
    machine: Machine
    customers: int
    known_customers: int
    mix: Mix
    generation_seconds: float
    rfm_scored: int
    campaigns: int
    server_workers: int
    seconds: float
    warmup: float
    history_seconds: float
    history: LoadResult | None
    outcomes: Outcomes
    runs: list[Run]
    stored: Stored
    webhooks: WebhookDelivery | None
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def stored_counts(url: str, schema: str) -> Stored:
    schema = checked_shop_schema(schema)
    db = await Database.connect(url, min_size=1, max_size=1)
    try:
        async with db.control() as conn:
            row = await conn.fetchrow(
                f"SELECT (SELECT count(*) FROM {schema}.offers) AS offers,"
                f" (SELECT count(*) FROM {schema}.campaign_assignments WHERE arm = 'treatment')"
                " AS treatment,"
                f" (SELECT count(*) FROM {schema}.campaign_assignments WHERE arm = 'holdout')"
                " AS holdout,"
                f" (SELECT count(*) FROM {schema}.outbox WHERE type = 'offer.issued') AS outbox,"
                f" c.issued_count, (SELECT count(*) FROM {schema}.offers o"
                " WHERE o.campaign_id = c.id) AS budgeted_offers,"
                " (c.definition #>> '{limits,max_issued}')::bigint AS budget"
                f" FROM {schema}.campaigns c WHERE c.name = $1",
                BUDGETED,
            )
    finally:
        await db.close()
    assert row is not None
    return Stored(
        offers=row["offers"],
        assignments_treatment=row["treatment"],
        assignments_holdout=row["holdout"],
        outbox_offer_issued=row["outbox"],
        budgeted_issued_count=row["issued_count"],
        budgeted_offers=row["budgeted_offers"],
        budgeted_max=row["budget"],
    )


async def known_customer_ids(url: str, schema: str) -> list[str]:
    schema = checked_shop_schema(schema)
    db = await Database.connect(url, min_size=1, max_size=1)
    try:
        async with db.control() as conn:
            rows = await conn.fetch(
                f"SELECT customer_id FROM {schema}.customers WHERE customer_id IS NOT NULL"
                " ORDER BY id"
            )
    finally:
        await db.close()
    return [row["customer_id"] for row in rows]


def create_campaigns(port: int, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=f"http://{HOST}:{port}", headers=headers, timeout=30) as client:
        for body in CAMPAIGNS:
            response = client.post("/v1/campaigns", json=body)
            if response.status_code != 201:
                raise RuntimeError(f"campaign {body['name']!r}: {response.text[:500]}")


@dataclass(frozen=True)
class Run:
    mode: str
    #: ``closed, 16 conns`` or ``open, 250 req/s (50% of peak)``.
    load: str
    result: LoadResult
    #: The machine's 1-minute load average at the end of the run (this benchmark alone: about
    #: 3 on 2 CPUs at saturation); much more means something else was running.
    load_average: float


def _show(result: LoadResult) -> None:
    progress(
        f"  {result.requests_per_second:,.0f} req/s, p50 {result.p50_ms:.1f} ms,"
        f" p95 {result.p95_ms:.1f} ms, p99 {result.p99_ms:.1f} ms"
    )


async def measure(port: int, load: Scenario, args: argparse.Namespace) -> list[Run]:
    """Closed loop at each connection count, then open loop at shares of the best throughput."""
    runs = []
    for connections in args.connections:
        progress(f"running {load.name}, closed loop, {connections} connections …")
        result = await run_load(
            HOST, port, load, connections=connections, seconds=args.seconds, warmup=args.warmup
        )
        _show(result)
        runs.append(Run(load.name, f"closed, {connections} conns", result, os.getloadavg()[0]))
    peak = max(run.result.requests_per_second for run in runs)
    for share in args.paced:
        rate = max(1.0, round(peak * share / 10) * 10)
        progress(f"running {load.name}, open loop, {rate:,.0f} req/s …")
        result = await paced_load(
            HOST, port, load, rate=rate, seconds=args.seconds, connections=PACED_CONNECTIONS
        )
        _show(result)
        load_average = os.getloadavg()[0]
        runs.append(
            Run(load.name, f"open, {rate:,.0f} req/s ({share:.0%} of peak)", result, load_average)
        )
    return runs


def load_problems(results: Sequence[LoadResult]) -> list[str]:
    return [
        f"{r.scenario} ({r.connections} conns): statuses {r.statuses}, {r.errors} connection"
        f" errors; first answers: {r.samples}"
        for r in results
        if r.unexpected or r.errors
    ]


async def bench(args: argparse.Namespace) -> OffersReport:
    now = datetime.now(UTC)
    problems: list[str] = []
    history: LoadResult | None = None
    with postgres_server() as server:
        async with bench_database(server) as url:
            db = await Database.connect(url, min_size=1, max_size=4, statement_timeout_ms=60_000)
            try:
                await migrate(db)
                tenant, fixture = await provisioned(db)
                postgres = await postgres_version(db)
            finally:
                await db.close()
            progress(f"generating {args.customers:,} customers (bench.journey's generator)")
            mix, generation = await generate(url, fixture.schema, args.customers, now)
            db = await Database.connect(url, min_size=1, max_size=2, statement_timeout_ms=60_000)
            try:
                rfm_seconds, scored = await time_rfm(db, tenant)
            finally:
                await db.close()
            ids = await known_customer_ids(url, fixture.schema)
            progress(
                f"generated in {generation:,.0f} s; RFM scored {scored:,} buyers in"
                f" {rfm_seconds:.1f} s; {len(ids):,} known customers; starting the server"
            )
            headers = {"Authorization": f"Bearer {fixture.secret_key}"}
            json_headers = headers | {"Content-Type": "application/json"}
            with (
                server_log() as log,
                running_server(url, SECRET, args.workers, log) as port,
            ):
                create_campaigns(port, headers)
                issuing = scenario(
                    "issue", "issue", json_headers, Requests(ids, dry_run=False, seed=1)
                )
                if args.history > 0:
                    progress(f"history: {args.history:g} s of issuing, untimed …")
                    history = await run_load(
                        HOST, port, issuing, connections=16, seconds=args.history, warmup=0
                    )
                progress(f"sampling {args.sample:,} dry-run decisions …")
                outcomes = sample_outcomes(port, headers, ids, args.sample)
                dry = scenario(
                    "dry run", "dry-run", json_headers, Requests(ids, dry_run=True, seed=2)
                )
                issue = scenario(
                    "issue", "issue", json_headers, Requests(ids, dry_run=False, seed=3)
                )
                runs = []
                if args.reference:
                    pick = random.Random(4).choice
                    read = Scenario(
                        "profile read (reference)",
                        "GET",
                        PROFILE_ROUTE,
                        headers,
                        path_factory=lambda: f"/v1/customers/{pick(ids)}",
                        key="profile",
                    )
                    progress("running the reference: profile read, closed loop …")
                    result = await run_load(
                        HOST,
                        port,
                        read,
                        connections=args.connections[-1],
                        seconds=args.seconds,
                        warmup=args.warmup,
                    )
                    _show(result)
                    conns = f"closed, {args.connections[-1]} conns"
                    runs.append(Run(read.name, conns, result, os.getloadavg()[0]))
                runs += await measure(port, dry, args)
                runs += await measure(port, issue, args)
            errors, first = logged_errors(log) if log.exists() else (0, [])
            if errors:
                problems.append(f"the server logged {errors} error lines (log kept: {log})")
                problems += first
            stored = await stored_counts(url, fixture.schema)
            webhooks = None
            if args.webhook_events > 0:
                with server_log() as worker_log:
                    webhooks = await webhook_delivery(url, tenant, args.webhook_events, worker_log)
                    errors, first = logged_errors(worker_log)
                if errors:
                    problems.append(
                        f"the worker logged {errors} error lines (log kept: {worker_log})"
                    )
                    problems += first
                problems += webhook_problems(webhooks)
    problems += load_problems([run.result for run in runs] + ([history] if history else []))
    if outcomes.requests != args.sample:
        problems.append(f"outcome sample: statuses {outcomes.statuses}")
    if stored.budgeted_issued_count != stored.budgeted_offers or (
        stored.budgeted_offers > stored.budgeted_max
    ):
        problems.append(
            f"budget: issued_count {stored.budgeted_issued_count}, offers"
            f" {stored.budgeted_offers}, max_issued {stored.budgeted_max}"
        )
    if stored.outbox_offer_issued != stored.offers:
        problems.append(
            f"{stored.offers} offers but {stored.outbox_offer_issued} offer.issued events"
        )
    notes = [
        f"Shop: bench.journey's generator (seed 7), {args.customers:,} customers of whom"
        f" {len(ids):,} known (a customer_id); RFM scored once ({scored:,} buyers).",
        f"{len(CAMPAIGNS)} active on-request campaigns (see bench/offers.py CAMPAIGNS), created"
        " through POST /v1/campaigns; the shop's secret key; no Idempotency-Key.",
        f"History: {args.history:g} s of issuing at 16 connections before anything is measured"
        f" ({history.requests if history else 0:,} requests); issuing runs go on adding offers,"
        " so later runs meet more limits and cooldowns.",
        "Closed loop: each connection sends its next request when the last one answered, so at"
        " saturation latency is mostly queueing (latency ≈ connections / throughput).",
    ]
    return OffersReport(
        generated_at=now.isoformat(timespec="seconds"),
        machine=machine_facts(postgres, server.kind),
        customers=args.customers,
        known_customers=len(ids),
        mix=mix,
        generation_seconds=round(generation, 1),
        rfm_scored=scored,
        campaigns=len(CAMPAIGNS),
        server_workers=args.workers,
        seconds=args.seconds,
        warmup=args.warmup,
        history_seconds=args.history,
        history=history,
        outcomes=outcomes,
        runs=runs,
        stored=stored,
        webhooks=webhooks,
        notes=notes,
        problems=problems,
    )


def webhook_problems(w: WebhookDelivery) -> list[str]:
    problems = []
    if w.received != w.events:
        problems.append(f"webhooks: {w.received:,} of {w.events:,} events received")
    if w.signatures_bad:
        problems.append(f"webhooks: {w.signatures_bad} bad signatures")
    if w.deliveries != {"succeeded": w.events}:
        problems.append(f"webhooks: deliveries {w.deliveries}")
    return problems


def render(report: OffersReport) -> str:
    m, o, s = report.machine, report.outcomes, report.stored
    lines = [
        f"## Offers benchmark ({report.generated_at})",
        "",
        f"Machine: {m.cpus} CPUs ({m.cpu_model}), {m.memory_gib:.1f} GiB RAM, Python {m.python},"
        f" {m.postgres.split(' on ')[0]} ({m.server}); server workers: {report.server_workers};"
        f" {report.seconds:g} s per run after {report.warmup:g} s of warm-up.",
        "",
        f"`POST {ROUTE}`, {report.campaigns} active campaigns,"
        f" {report.customers:,} customers ({report.known_customers:,} known).",
        "",
        "| mode | load | req/s | p50 ms | p95 ms | p99 ms | p99 < 30 ms | load avg |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for run in report.runs:
        r = run.result
        verdict = "PASS" if r.p99_ms < TARGET_P99_MS else "MISS"
        lines.append(
            f"| {run.mode} | {run.load} | {r.requests_per_second:,.0f} | {r.p50_ms:.2f} |"
            f" {r.p95_ms:.2f} | {r.p99_ms:.2f} | {verdict} | {run.load_average:.1f} |"
        )
    lines += [
        "",
        f"Outcomes of {o.requests:,} sequential dry runs after the history"
        f" ({o.decisions:,} decisions; p50 {o.latency_p50_ms} ms, p99 {o.latency_p99_ms} ms"
        " through httpx):",
        ", ".join(f"{k} {v:,}" for k, v in o.outcomes.items()) + ".",
        "Not eligible because: " + ", ".join(f"{k} {v:,}" for k, v in o.not_eligible.items()) + ".",
        "Campaigns firing per request: "
        + ", ".join(f"{k}: {v:,}" for k, v in o.offers_per_request.items())
        + ".",
        "",
        f"Stored: {s.offers:,} offers ({s.outbox_offer_issued:,} offer.issued events),"
        f" assignments {s.assignments_treatment:,} treatment / {s.assignments_holdout:,} holdout;"
        f" budgeted campaign {s.budgeted_offers:,} offers, issued_count"
        f" {s.budgeted_issued_count:,}, max_issued {s.budgeted_max:,}.",
        "",
    ]
    w = report.webhooks
    if w is not None:
        lines += [
            f"Webhooks: {w.events:,} offer.issued events through the worker to a loopback"
            f" receiver: {w.per_second:,.0f} events/s from the first to the last received,"
            f" {w.drain_seconds:.1f} s from commit to the last; {w.received:,} received,"
            f" {w.duplicates} duplicates; {w.signatures_checked - w.signatures_bad} of"
            f" {w.signatures_checked} signatures checked valid; deliveries {w.deliveries};"
            f" the worker process used {w.worker_cpu:.2f} CPU cores meanwhile.",
            "",
        ]
    lines += [f"Note: {note}" for note in report.notes]
    lines += [f"Problem: {problem}" for problem in report.problems]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.offers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed window per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed load before each")
    parser.add_argument(
        "--connections",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[1, 16, 32],
        help="comma-separated; every mode runs at each",
    )
    parser.add_argument(
        "--paced",
        type=lambda s: [float(n) for n in s.split(",")] if s else [],
        default=[0.25, 0.5, 0.75],
        help="open-loop rates, as shares of the mode's best closed-loop throughput",
    )
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the profile read (GET /v1/customers/{id}) run kept for comparison",
    )
    parser.add_argument(
        "--webhook-events",
        type=int,
        default=5000,
        help="offer.issued events to deliver to a loopback receiver through the worker (0: skip)",
    )
    parser.add_argument("--history", type=float, default=20.0, help="seconds of issuing first")
    parser.add_argument("--sample", type=int, default=1000, help="dry runs to count outcomes")
    parser.add_argument("--workers", type=int, default=2, help="server workers")
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
