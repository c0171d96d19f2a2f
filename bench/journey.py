"""Journey benchmark: a large shop's stages, analytics and RFM (``python -m bench.journey``).

Starts a scratch embedded PostgreSQL (or uses ``BENCH_DATABASE_URL``), migrates it, provisions
one shop and fills it with a seeded, realistic customer base written straight into the shop's
tables with ``COPY``: about 70% visitors who never buy, 20% one-time buyers (half of them lapsing),
8% repeat buyers and 2% advocates, over the last two years. Every customer's aggregates, stage and
stage history are computed in Python while generating, with the same rules ingest applies
(:func:`api.journey.rules.next_stage` on :data:`~api.journey.rules.DEFAULT_RULES`, one touchpoint at
a time, plus the drift job's moves as of now), so the tables look as if ingest had built them.

Then it measures, against the issue's targets:

- RFM: one forced full recomputation (:func:`api.journey.rfm.recompute`), target under 30 s.
- Analytics: ``GET /v1/analytics/funnel|paths|attribution|stages/flow`` with default parameters
  (the 90 days up to now) on the real server, sequentially, p95 target under 1 s.
- Stage evaluation on single ingest, in this process: the median time of a one-touchpoint
  :func:`api.touchpoints.ingest.record` transaction as the code is, versus with
  ``api.journey.stages.advance_stages`` replaced by a no-op *in this benchmark process only*;
  target: stage evaluation under 10% of ingest.

    python -m bench.journey [--customers N] [--requests R] [--singles S] [--workers W]

Results go to ``bench/results/journey.json``. The exit status is 1 when a request failed or the
server logged an error; a missed target alone is reported, not a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec

from api.auth import oauth_clients
from api.auth.scopes import ALL_SCOPES
from api.auth.secrets import Keyring
from api.db import Database, TenantConn
from api.db.migrate import migrate
from api.db.schemas import checked_shop_schema
from api.db.tenant import Tenant, in_tenant, tenant_tx
from api.journey import rfm, stages
from api.journey.rules import DEFAULT_RULES, Aggregates, next_stage
from api.tenants.lifecycle import provision_shop
from api.touchpoints import ingest
from api.touchpoints.schemas import ItemResult, TouchpointIn
from bench.common import (
    Machine,
    bench_database,
    machine_facts,
    percentile,
    postgres_server,
    postgres_version,
    progress,
)
from bench.ingest import COPY_COLUMNS
from bench.server import (
    HOST,
    Fixture,
    access_token,
    logged_errors,
    running_server,
    server_log,
)

RESULTS_FILE = Path(__file__).parent / "results" / "journey.json"
SECRET = "bench-journey-secret-key-0123456789abcdef"
YEARS_DAYS = 730
CHUNK_CUSTOMERS = 2000
ENDPOINTS = ("funnel", "paths", "attribution", "stages/flow")

_encode = msgspec.json.Encoder().encode
DAY = timedelta(days=1)

CUSTOMER_COLUMNS = (
    "id",
    "customer_id",
    "email",
    "created_at",
    "updated_at",
    "first_seen_at",
    "last_seen_at",
    "touchpoint_count",
    "counts_by_type",
    "counts_by_channel",
    "order_count",
    "revenue",
    "last_purchase_at",
    "stage",
    "stage_since",
    "reached_stage",
)
IDENTITY_COLUMNS = ("kind", "value", "customer_ref", "created_at")
TRANSITION_COLUMNS = (
    "customer_ref",
    "from_stage",
    "to_stage",
    "occurred_at",
    "cause",
    "touchpoint_event_id",
)

#: Browsing and marketing touches (not purchases) and how often each comes, per 100.
_TOUCHES = [
    ("page_view", 38),
    ("product_view", 24),
    ("search", 7),
    ("add_to_cart", 6),
    ("cart_abandoned", 3),
    ("checkout_started", 2),
    ("email_open", 12),
    ("email_click", 5),
    ("newsletter_signup", 1),
    ("store_visit", 2),
]
_TOUCH_TYPES = [kind for kind, _ in _TOUCHES]
_TOUCH_WEIGHTS = [weight for _, weight in _TOUCHES]
_CHANNELS = ["web", "ads", "social", "mobile_app"]
_CHANNEL_WEIGHTS = [55, 20, 15, 10]
_CAMPAIGNS = {
    "ads": [("google", "cpc", f"search-{n}") for n in ("brand", "generic", "shoes", "sale")],
    "social": [("instagram", "social", "spring-drop"), ("facebook", "social", "retarget")],
    "email": [("newsletter", "email", f"nl-week-{n:02d}") for n in range(1, 53, 4)],
    "web": [("google", "organic", "")],
    "mobile_app": [("app", "push", "app-promo")],
}
_PRODUCTS = [f"sku-{n:04d}" for n in range(400)]


# --- the generator ------------------------------------------------------------------------------


@dataclass
class Chunk:
    customers: list[tuple[Any, ...]] = field(default_factory=list)
    identities: list[tuple[Any, ...]] = field(default_factory=list)
    touchpoints: list[tuple[Any, ...]] = field(default_factory=list)
    transitions: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass
class Mix:
    visitors: int = 0
    one_time: int = 0
    lapsing: int = 0
    repeat: int = 0
    advocates: int = 0
    touchpoints: int = 0
    purchases: int = 0
    transitions: int = 0
    stages: dict[str, int] = field(default_factory=dict)


def _uniform_time(rng: random.Random, start: datetime, end: datetime) -> datetime:
    if end <= start:
        return start
    return start + (end - start) * rng.random()


def _touch_type(rng: random.Random) -> str:
    return rng.choices(_TOUCH_TYPES, _TOUCH_WEIGHTS)[0]


def _channel_of(rng: random.Random, kind: str) -> str:
    if kind.startswith("email") or kind == "newsletter_signup":
        return "email"
    if kind == "store_visit":
        return "store"
    return rng.choices(_CHANNELS, _CHANNEL_WEIGHTS)[0]


def _context(rng: random.Random, channel: str, product: str) -> str:
    context: dict[str, str] = {}
    if channel in ("web", "ads", "social"):
        context["page_url"] = f"https://shop.example/products/{product}"
    campaigns = _CAMPAIGNS.get(channel)
    # Campaign-tagged: every ad click, most emails and social posts, some plain web visits.
    share = {"ads": 1.0, "email": 0.8, "social": 0.6, "web": 0.15, "mobile_app": 0.3}
    if campaigns and rng.random() < share.get(channel, 0.0):
        source, medium, campaign = rng.choice(campaigns)
        context["utm_source"] = source
        context["utm_medium"] = medium
        if campaign:
            context["utm_campaign"] = campaign
    return _encode(context).decode()


class Generator:
    """Customers one at a time, each as its rows in every table (seeded, reproducible)."""

    def __init__(self, seed: int, now: datetime) -> None:
        self.rng = random.Random(seed)
        self.now = now
        self.mix = Mix()

    def customer(self, n: int, chunk: Chunk) -> None:
        rng, now = self.rng, self.now
        ref = n + 1
        roll = rng.random()
        purchases: list[datetime] = []
        extra: list[tuple[datetime, str]] = []
        known = False
        if roll < 0.70:
            self.mix.visitors += 1
            touches = rng.randint(1, 10)
            first = now - YEARS_DAYS * DAY * rng.random()
            last = min(now, first + 30 * DAY * rng.random())
            known = rng.random() < 0.15
        elif roll < 0.90:
            self.mix.one_time += 1
            known = True
            touches = rng.randint(15, 50)
            if rng.random() < 0.5:
                self.mix.lapsing += 1
                purchase = now - timedelta(days=rng.uniform(100, 400))
                last = min(now, purchase + timedelta(days=rng.uniform(0, 80)))
            else:
                purchase = now - timedelta(days=rng.uniform(0, 100))
                last = _uniform_time(rng, purchase, now)
            first = purchase - timedelta(days=rng.uniform(0, 90))
            purchases = [purchase]
        else:
            advocate = roll >= 0.98
            known = True
            if advocate:
                self.mix.advocates += 1
                orders, touches = rng.randint(1, 10), rng.randint(60, 200)
            else:
                self.mix.repeat += 1
                orders, touches = rng.randint(2, 10), rng.randint(50, 160)
            first = now - timedelta(days=rng.uniform(60, YEARS_DAYS))
            last_order = now - timedelta(days=rng.expovariate(1 / 60))
            last_order = max(last_order, first + DAY)
            purchases = sorted(
                _uniform_time(rng, first + DAY, last_order) for _ in range(orders - 1)
            )
            purchases.append(last_order)
            last = max(last_order, now - timedelta(days=rng.uniform(0, 45)))
            if advocate:
                for _ in range(rng.randint(1, 5)):
                    kind = rng.choice(("review_written", "referral_made", "social_share"))
                    extra.append((_uniform_time(rng, purchases[0], last), kind))
        if purchases:
            if rng.random() < 0.10:
                extra.append((_uniform_time(rng, purchases[0], last), "service_contact"))
            if rng.random() < 0.04:
                extra.append((_uniform_time(rng, purchases[0], last), "refund"))
        events: list[tuple[datetime, str]] = [(p, "purchase") for p in purchases] + extra
        events += [
            (_uniform_time(rng, first, last), _touch_type(rng))
            for _ in range(max(1, touches - len(events)))
        ]
        events.sort(key=lambda e: e[0])
        self._write(n, ref, events, known, chunk)

    def _write(
        self, n: int, ref: int, events: list[tuple[datetime, str]], known: bool, chunk: Chunk
    ) -> None:
        rng, now = self.rng, self.now
        customer_id = f"cust-{n:06d}" if known else None
        anonymous_id = f"anon-{n:06d}"
        email = f"customer{n}@example.com" if known else None
        # A known customer signs up on the touch before the first purchase (or a random one).
        signup = -1
        if known:
            first_purchase = next((j for j, e in enumerate(events) if e[1] == "purchase"), None)
            signup = max(0, (first_purchase or rng.randrange(len(events))) - 1)
            if events[signup][1] == "purchase":
                events.insert(signup, (events[signup][0], "account_created"))
            else:
                events[signup] = (events[signup][0], "account_created")
        types: dict[str, int] = {}
        channels: dict[str, int] = {}
        revenue: dict[str, int] = {}
        orders = 0
        last_purchase: datetime | None = None
        stage = reached = "awareness"
        since = events[0][0]
        last_order_amount = 0
        for j, (at, kind) in enumerate(events):
            event_id = f"j-{n:06d}-{j:03d}"
            channel = _channel_of(rng, kind)
            if kind in ("review_written", "referral_made", "social_share"):
                channel = "referral" if kind == "referral_made" else "social"
            product = rng.choice(_PRODUCTS)
            price = rng.randrange(500, 20_000, 5)
            properties = "{}"
            order_id = amount = currency = details = None
            if kind in ("product_view", "add_to_cart"):
                properties = _encode({"product_id": product, "price": price}).decode()
            elif kind == "search":
                properties = _encode({"query": rng.choice(("shoes", "dress", "gift"))}).decode()
            elif kind == "purchase":
                quantity = rng.randrange(1, 4)
                amount = price * quantity + 495
                order_id, currency = f"o-{n:06d}-{j:03d}", "EUR"
                details = _encode(
                    {
                        "shipping": 495,
                        "items": [
                            {"product_id": product, "quantity": quantity, "unit_price": price}
                        ],
                    }
                ).decode()
                orders += 1
                revenue["EUR"] = revenue.get("EUR", 0) + amount
                last_purchase = at if last_purchase is None else max(last_purchase, at)
                last_order_amount = amount
                self.mix.purchases += 1
            elif kind == "refund" and last_order_amount:
                amount, currency = last_order_amount, "EUR"
                order_id = f"o-{n:06d}-refund"
                revenue["EUR"] = revenue.get("EUR", 0) - amount
            types[kind] = types.get(kind, 0) + 1
            channels[channel] = channels.get(channel, 0) + 1
            who = customer_id if known and j >= signup else None
            device = anonymous_id if not known or j <= signup else None
            chunk.touchpoints.append(
                (
                    event_id,
                    ref,
                    kind,
                    channel,
                    who,
                    device,
                    at,
                    None,
                    at + timedelta(seconds=rng.uniform(0.05, 3)),
                    email if j == signup else None,
                    order_id,
                    amount,
                    currency,
                    details,
                    properties,
                    _context(rng, channel, product),
                )
            )
            # What ingest would have decided on receiving this touchpoint, then.
            profile = Aggregates(types, channels, orders, revenue, at, last_purchase)
            new_stage, reached = next_stage(DEFAULT_RULES, reached, profile, at)
            if new_stage != stage:
                chunk.transitions.append((ref, stage, new_stage, at, "touchpoint", event_id))
                stage, since = new_stage, at
        # What the drift job has done since, as of now.
        first_seen, last_seen = events[0][0], events[-1][0]
        profile = Aggregates(types, channels, orders, revenue, last_seen, last_purchase)
        final, reached = next_stage(DEFAULT_RULES, reached, profile, now)
        if final != stage and last_purchase is not None:
            steps = [("at_risk", DEFAULT_RULES.drift.at_risk_after_days)]
            if final == "lapsed":
                steps.append(("lapsed", DEFAULT_RULES.drift.lapsed_after_days))
            for drift_to, days in steps:
                if drift_to == stage:
                    continue
                at = max(last_purchase + timedelta(days=days, seconds=1), since)
                chunk.transitions.append((ref, stage, drift_to, at, "drift", None))
                stage, since = drift_to, at
        self.mix.stages[stage] = self.mix.stages.get(stage, 0) + 1
        self.mix.touchpoints += len(events)
        chunk.customers.append(
            (
                ref,
                customer_id,
                email,
                first_seen,
                last_seen,
                first_seen,
                last_seen,
                len(events),
                _encode(types).decode(),
                _encode(channels).decode(),
                orders,
                _encode(revenue).decode(),
                last_purchase,
                stage,
                since,
                reached,
            )
        )
        chunk.identities.append(("anonymous_id", anonymous_id, ref, first_seen))
        if customer_id is not None:
            chunk.identities.append(("customer_id", customer_id, ref, events[signup][0]))


async def generate(url: str, schema: str, customers: int, now: datetime) -> tuple[Mix, float]:
    """Writes the shop's customers with ``COPY``; returns the mix and the seconds it took.

    Tenant code never names a schema (the search path does); this bulk loader does, through
    ``copy_records_to_table(schema_name=...)``, on a plain connection of its own.
    """
    schema = checked_shop_schema(schema)
    generator = Generator(7, now)
    conn = await asyncpg.connect(url)
    started = time.perf_counter()
    try:
        for start in range(0, customers, CHUNK_CUSTOMERS):
            chunk = Chunk()
            for n in range(start, min(customers, start + CHUNK_CUSTOMERS)):
                generator.customer(n, chunk)
            async with conn.transaction():
                for table, rows, columns in (
                    ("customers", chunk.customers, CUSTOMER_COLUMNS),
                    ("identities", chunk.identities, IDENTITY_COLUMNS),
                    ("touchpoints", chunk.touchpoints, COPY_COLUMNS),
                    ("stage_transitions", chunk.transitions, TRANSITION_COLUMNS),
                ):
                    await conn.copy_records_to_table(
                        table, records=rows, columns=columns, schema_name=schema
                    )
            generator.mix.transitions += len(chunk.transitions)
            done = min(customers, start + CHUNK_CUSTOMERS)
            if done % 20_000 == 0 or done == customers:
                progress(
                    f"  {done:,} customers, {generator.mix.touchpoints:,} touchpoints,"
                    f" {time.perf_counter() - started:,.0f} s"
                )
        # COPY gave the identity columns explicit values: move the sequence past them.
        await conn.execute(
            f"SELECT setval(pg_get_serial_sequence('{schema}.customers', 'id'), $1)", customers
        )
        elapsed = time.perf_counter() - started
        await conn.execute(
            f"ANALYZE {schema}.customers, {schema}.identities, {schema}.touchpoints,"
            f" {schema}.stage_transitions"
        )
    finally:
        await conn.close()
    return generator.mix, elapsed


# --- the measurements ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    endpoint: str
    requests: int
    p50_ms: float
    p95_ms: float
    max_ms: float
    status: int


@dataclass(frozen=True)
class IngestCost:
    calls_per_arm: int
    with_stages_median_ms: float
    without_stages_median_ms: float
    stage_share: float


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    goal: str
    verdict: str


@dataclass(frozen=True)
class JourneyReport:
    generated_at: str
    machine: Machine
    customers: int
    mix: Mix
    generation_seconds: float
    rfm_seconds: float
    rfm_scored: int
    analytics: list[Latency]
    ingest: IngestCost
    targets: list[Target]
    server_workers: int
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def time_rfm(db: Database, tenant: Tenant) -> tuple[float, int]:
    async def work(conn: TenantConn) -> rfm.Recomputed:
        return await rfm.recompute(conn, trigger="schedule", force=True)

    started = time.perf_counter()
    result = await in_tenant(db, tenant, work)
    return time.perf_counter() - started, result.report.customers


async def _noop_advance(*args: object, **kwargs: object) -> list[stages.Move]:
    return []


async def ingest_cost(
    db: Database, tenant: Tenant, customers: int, calls: int, now: datetime
) -> IngestCost:
    """Median one-touchpoint ``record`` transaction with and without ``advance_stages``.

    The arms alternate in blocks, so drift in the machine's speed falls on both alike. The no-op
    replaces ``api.journey.stages.advance_stages`` in this benchmark process only.
    """
    rng = random.Random(11)
    real = stages.advance_stages
    timings: dict[bool, list[float]] = {True: [], False: []}
    block = 50
    counter = 0

    async def one(with_stages: bool) -> None:
        nonlocal counter
        counter += 1
        n = rng.randrange(customers)
        kind = rng.choices(("purchase", "email_open", "browse"), (3, 4, 93))[0]
        kind = (
            rng.choice(("page_view", "product_view", "add_to_cart")) if kind == "browse" else kind
        )
        raw: dict[str, Any] = {
            "id": f"bench-single-{counter}",
            "type": kind,
            "channel": "email" if kind == "email_open" else "web",
            "occurred_at": now.isoformat(),
            # Known people: the buyers by customer id, everyone by their device.
            "anonymous_id": f"anon-{n:06d}",
        }
        if kind == "purchase":
            raw["order"] = {"order_id": f"bench-order-{counter}", "amount": 4995, "currency": "EUR"}
        item = msgspec.convert(raw, TouchpointIn)
        started = time.perf_counter()
        async with tenant_tx(db, tenant, generic_plans=True) as conn:
            results: list[ItemResult] = await ingest.record(
                conn, [item], datetime.now(UTC), tenant.schema
            )
        timings[with_stages].append(time.perf_counter() - started)
        if results[0].status != "accepted":
            raise RuntimeError(f"ingest refused a bench touchpoint: {results[0]}")

    try:
        for warm in (True, False) * 2:
            stages.advance_stages = real if warm else _noop_advance
            for _ in range(block):
                await one(warm)
        timings = {True: [], False: []}
        for b in range(2 * (calls // block)):
            with_stages = b % 2 == 0
            stages.advance_stages = real if with_stages else _noop_advance
            for _ in range(block):
                await one(with_stages)
    finally:
        stages.advance_stages = real
    with_ms = statistics.median(timings[True]) * 1000
    without_ms = statistics.median(timings[False]) * 1000
    return IngestCost(
        calls_per_arm=len(timings[True]),
        with_stages_median_ms=with_ms,
        without_stages_median_ms=without_ms,
        stage_share=(with_ms - without_ms) / with_ms,
    )


def analytics_latency(port: int, token: str, requests: int, warmups: int) -> list[Latency]:
    results = []
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=f"http://{HOST}:{port}", headers=headers, timeout=120) as client:
        for endpoint in ENDPOINTS:
            path = f"/v1/analytics/{endpoint}"
            status = 200
            latencies = []
            for n in range(warmups + requests):
                started = time.perf_counter()
                response = client.get(path)
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    status = response.status_code
                    progress(f"  {path}: {response.status_code} {response.text[:300]}")
                if n >= warmups:
                    latencies.append(elapsed * 1000)
            results.append(
                Latency(
                    endpoint=path,
                    requests=requests,
                    p50_ms=percentile(latencies, 0.5),
                    p95_ms=percentile(latencies, 0.95),
                    max_ms=max(latencies),
                    status=status,
                )
            )
            progress(
                f"  {path}: p50 {results[-1].p50_ms:,.0f} ms, p95 {results[-1].p95_ms:,.0f} ms"
            )
    return results


def judge(report_ingest: IngestCost, rfm_seconds: float, analytics: list[Latency]) -> list[Target]:
    targets = [
        Target(
            "stage evaluation share of single ingest",
            f"{report_ingest.stage_share:.1%} ({report_ingest.with_stages_median_ms:.2f} vs"
            f" {report_ingest.without_stages_median_ms:.2f} ms)",
            "< 10%",
            "PASS" if report_ingest.stage_share < 0.10 else "MISS",
        ),
        Target(
            "RFM full recomputation",
            f"{rfm_seconds:.2f} s",
            "< 30 s",
            "PASS" if rfm_seconds < 30 else "MISS",
        ),
    ]
    for latency in analytics:
        ok = latency.status == 200 and latency.p95_ms < 1000
        targets.append(
            Target(
                f"GET {latency.endpoint} p95",
                f"{latency.p95_ms:,.0f} ms (p50 {latency.p50_ms:,.0f} ms)",
                "< 1 s",
                "PASS" if ok else ("MISS" if latency.status == 200 else f"HTTP {latency.status}"),
            )
        )
    return targets


def render(report: JourneyReport) -> str:
    m, mix = report.machine, report.mix
    lines = [
        f"## Journey benchmark ({report.generated_at})",
        "",
        f"Machine: {m.cpus} CPUs ({m.cpu_model}), {m.memory_gib:.1f} GiB RAM, Python {m.python},"
        f" {m.postgres.split(' on ')[0]} ({m.server}); server workers: {report.server_workers}.",
        "",
        f"Shop: {report.customers:,} customers ({mix.visitors:,} visitors who never bought,"
        f" {mix.one_time:,} one-time buyers of whom {mix.lapsing:,} lapsing, {mix.repeat:,} repeat"
        f" buyers, {mix.advocates:,} advocates), {mix.touchpoints:,} touchpoints"
        f" ({mix.purchases:,} purchases), {mix.transitions:,} stage transitions;"
        f" generated and copied in {report.generation_seconds:,.1f} s.",
        "Stages now: "
        + ", ".join(f"{stage} {count:,}" for stage, count in sorted(mix.stages.items())),
        "",
        "| Target | Measured | Goal | Verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t.name} | {t.measured} | {t.goal} | {t.verdict} |" for t in report.targets]
    lines.append("")
    lines += [f"Note: {note}" for note in report.notes]
    lines += [f"Problem: {problem}" for problem in report.problems]
    return "\n".join(lines)


async def provisioned(db: Database) -> tuple[Tenant, Fixture]:
    keyring = Keyring(SECRET)
    shop = await provision_shop(db, keyring, "Journey bench shop", actor="bench")
    async with db.control() as conn:
        client = await oauth_clients.create_client(
            conn,
            keyring,
            tenant_id=shop.tenant.id,
            name="bench",
            scopes=ALL_SCOPES,
            grant_types=frozenset({"client_credentials"}),
        )
    fixture = Fixture(
        shop.secret_key, client.client_id, client.client_secret, shop.tenant.schema_name
    )
    return shop.tenant.as_tenant(), fixture


async def _with_db(url: str, work: Callable[[Database], Awaitable[Any]]) -> Any:
    db = await Database.connect(url, min_size=1, max_size=4, statement_timeout_ms=60_000)
    try:
        return await work(db)
    finally:
        await db.close()


async def bench(args: argparse.Namespace) -> JourneyReport:
    notes = [
        "Rows were written with COPY straight into the shop's tables (the bulk loader names the"
        " shop's schema); aggregates, stages and transitions come from api.journey.rules"
        ".next_stage with the default rules, replayed touchpoint by touchpoint, plus drift.",
        "Ingest cost: median of one-touchpoint ingest.record transactions (BEGIN..COMMIT, generic"
        " plans) about existing profiles, 3% purchases; the 'without' arm replaces"
        " api.journey.stages.advance_stages by a no-op in the benchmark process only.",
        f"Analytics: {args.requests} sequential requests per endpoint after 2 warm-ups, default"
        " parameters (the 90 days up to now), JWT with every scope.",
    ]
    problems: list[str] = []
    now = datetime.now(UTC)
    with postgres_server() as server:
        async with bench_database(server) as url:
            db = await Database.connect(url, min_size=1, max_size=4, statement_timeout_ms=60_000)
            try:
                await migrate(db)
                tenant, fixture = await provisioned(db)
                postgres = await postgres_version(db)
            finally:
                await db.close()
            progress(f"generating {args.customers:,} customers")
            mix, generation = await generate(url, fixture.schema, args.customers, now)
            progress(f"generated in {generation:,.1f} s; timing the RFM recomputation")

            async def measure_db(db: Database) -> tuple[float, int, IngestCost]:
                seconds, scored = await time_rfm(db, tenant)
                progress(f"RFM: {seconds:.2f} s for {scored:,} buyers; timing single ingest")
                cost = await ingest_cost(db, tenant, args.customers, args.singles, now)
                return seconds, scored, cost

            rfm_seconds, scored, cost = await _with_db(url, measure_db)
            progress(
                f"ingest: {cost.with_stages_median_ms:.2f} ms with stages,"
                f" {cost.without_stages_median_ms:.2f} ms without; starting the server"
            )
            with (
                server_log() as log,
                running_server(url, SECRET, args.workers, log) as port,
            ):
                token = access_token(port, fixture)
                analytics = analytics_latency(port, token, args.requests, warmups=2)
            errors, first = logged_errors(log) if log.exists() else (0, [])
            if errors:
                problems.append(f"the server logged {errors} error lines (log kept: {log})")
                problems += first
    problems += [f"{a.endpoint} answered {a.status}" for a in analytics if a.status != 200]
    return JourneyReport(
        generated_at=now.isoformat(timespec="seconds"),
        machine=machine_facts(postgres, server.kind),
        customers=args.customers,
        mix=mix,
        generation_seconds=generation,
        rfm_seconds=rfm_seconds,
        rfm_scored=scored,
        analytics=analytics,
        ingest=cost,
        targets=judge(cost, rfm_seconds, analytics),
        server_workers=args.workers,
        notes=notes,
        problems=problems,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.journey", description=__doc__)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=20, help="per analytics endpoint")
    parser.add_argument("--singles", type=int, default=1000, help="ingest calls per arm")
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
