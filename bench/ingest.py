"""Touchpoints for the ingest benchmarks: seed data, request bodies, and the raw ``COPY`` rate.

Bodies are encoded once, before any timed window, with a placeholder (:data:`SLOT`) wherever a
value must be new on every request: the touchpoint ids, and the anonymous ids of new visitors.
:class:`UniqueBodies` cycles the templates and stamps a fresh counter into the placeholder, so
no id ever repeats however many requests a run makes, for the cost of one ``bytes.replace``.

The mix, for single and batch ingest alike: three in five touchpoints are about one of the
seeded customers (an existing profile: the common case), the rest about new anonymous visitors
(a new profile each). In a batch the visitors come in sessions of four events, and one session
in ten ends with a sign-up naming a new ``customer_id`` (the anonymous profile becomes known).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import msgspec

from api.db.schemas import checked_shop_schema
from bench.common import progress
from bench.load import LoadResult, summarize

#: Stands for a fresh counter in a template; as long as ``b"%010x" % n`` (2**40 requests).
SLOT = "@@@@@@@@@@"
_SLOT = SLOT.encode()
BATCH_SIZE = 500
SEED_BATCH = 500
SESSION_EVENTS = 4
KNOWN_SHARE = 0.6

_encode = msgspec.json.Encoder().encode
_PRODUCTS = [f"sku-{n:04d}" for n in range(400)]
_USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Safari/605.1.15",
]
#: Browsing events and how often each comes, per 100.
_BROWSING = [("page_view", 45), ("product_view", 30), ("add_to_cart", 10), ("search", 8)]
_BROWSING_TYPES = [kind for kind, _ in _BROWSING]
_BROWSING_WEIGHTS = [weight for _, weight in _BROWSING]
#: Touchpoint columns in the order :func:`copy_rows` fills them (all but the generated ``id``).
COPY_COLUMNS = (
    "event_id",
    "customer_ref",
    "type",
    "channel",
    "customer_id",
    "anonymous_id",
    "occurred_at",
    "sent_at",
    "received_at",
    "email",
    "order_id",
    "amount",
    "currency",
    "order_details",
    "properties",
    "context",
)


def customer_id(n: int) -> str:
    return f"cust-{n:05d}"


def touchpoint(
    rng: random.Random,
    event_id: str,
    kind: str,
    *,
    customer: str | None = None,
    anonymous: str | None = None,
    email: str | None = None,
    now: datetime,
) -> dict[str, Any]:
    """One realistic touchpoint as a client sends it: about 400 bytes of JSON."""
    product = rng.choice(_PRODUCTS)
    price = rng.randrange(500, 20_000, 5)
    item: dict[str, Any] = {
        "id": event_id,
        "type": kind,
        "channel": "email" if kind == "email_open" else rng.choice(("web", "web", "mobile_app")),
        "occurred_at": (now - timedelta(seconds=rng.randrange(86_400))).isoformat(),
    }
    if customer is not None:
        item["customer_id"] = customer
    if anonymous is not None:
        item["anonymous_id"] = anonymous
    if email is not None:
        item["email"] = email
    if kind in ("product_view", "add_to_cart"):
        item["properties"] = {"product_id": product, "price": price}
    elif kind == "search":
        item["properties"] = {"query": rng.choice(("shoes", "red dress", "gift card")), "hits": 12}
    elif kind == "purchase":
        quantity = rng.randrange(1, 4)
        item["order"] = {
            "order_id": f"{event_id}-order",
            "amount": price * quantity + 495,
            "currency": "EUR",
            "shipping": 495,
            "items": [{"product_id": product, "quantity": quantity, "unit_price": price}],
        }
    item["context"] = {
        "page_url": f"https://shop.example/products/{product}",
        "user_agent": rng.choice(_USER_AGENTS),
        "utm_source": rng.choice(("google", "newsletter", "instagram")),
    }
    return item


def browsing(rng: random.Random) -> str:
    return rng.choices(_BROWSING_TYPES, _BROWSING_WEIGHTS)[0]


def seed_touchpoints(customers: int, now: datetime) -> list[dict[str, Any]]:
    """Three per customer: a sign-up that links a device, a visit from it, and a purchase."""
    rng = random.Random(1)
    items = []
    for n in range(customers):
        who, device = customer_id(n), f"seed-device-{n:05d}"
        items += [
            touchpoint(
                rng,
                f"seed-{n}-1",
                "account_created",
                customer=who,
                anonymous=device,
                email=f"customer{n}@example.com",
                now=now,
            ),
            touchpoint(rng, f"seed-{n}-2", "product_view", anonymous=device, now=now),
            touchpoint(rng, f"seed-{n}-3", "purchase", customer=who, now=now),
        ]
    return items


async def seed(base_url: str, secret_key: str, customers: int) -> list[str]:
    """The seeded customers' ids, after storing their touchpoints through the batch endpoint."""
    items = seed_touchpoints(customers, datetime.now(UTC))
    headers = {"Authorization": f"Bearer {secret_key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as client:
        for start in range(0, len(items), SEED_BATCH):
            chunk = items[start : start + SEED_BATCH]
            response = await client.post("/v1/touchpoints/batch", json={"touchpoints": chunk})
            response.raise_for_status()
            accepted = response.json()["accepted"]
            if accepted != len(chunk):
                raise RuntimeError(f"seeding: {accepted} of {len(chunk)} accepted: {response.text}")
    return [customer_id(n) for n in range(customers)]


class UniqueBodies:
    """Cycles pre-encoded bodies, stamping a new counter into :data:`SLOT` each time."""

    def __init__(self, templates: Sequence[bytes], items_per_body: int) -> None:
        if not templates or any(_SLOT not in template for template in templates):
            raise ValueError("every template needs the slot, or its ids would repeat")
        self._templates = list(templates)
        self._count = 0
        self.items_per_body = items_per_body

    def __call__(self) -> bytes:
        n = self._count
        self._count = n + 1
        return self._templates[n % len(self._templates)].replace(_SLOT, b"%010x" % n)

    @property
    def items_made(self) -> int:
        """Touchpoints handed out so far (each one sent, since the generator is closed-loop)."""
        return self._count * self.items_per_body


@dataclass(frozen=True)
class Workload:
    """Templates of every ingest body, built from the same touchpoints for ingest and echo."""

    singles: list[bytes]
    batches: list[bytes]
    #: The touchpoints of each batch template, for the ``COPY`` of the same rows.
    batch_items: list[list[dict[str, Any]]]

    def single(self) -> UniqueBodies:
        return UniqueBodies(self.singles, 1)

    def single_as_batch(self) -> UniqueBodies:
        """The same single touchpoints, each wrapped as a one-item batch (for the echo route)."""
        return UniqueBodies([b'{"touchpoints":[' + t + b"]}" for t in self.singles], 1)

    def batch(self) -> UniqueBodies:
        return UniqueBodies(self.batches, BATCH_SIZE)


def workload(seeded: Sequence[str], *, singles: int = 4096, batches: int = 16) -> Workload:
    """Single touchpoints have ids ``s-…``, batch ones ``b-…``; new visitors ``vs-…``, ``vb-…``."""
    rng = random.Random(2)
    now = datetime.now(UTC)
    single_bodies = []
    for n in range(singles):
        event_id = f"s-{SLOT}"
        if rng.random() < KNOWN_SHARE:
            item = touchpoint(rng, event_id, browsing(rng), customer=rng.choice(seeded), now=now)
        else:
            item = touchpoint(rng, event_id, browsing(rng), anonymous=f"vs-{SLOT}-{n}", now=now)
        single_bodies.append(_encode(item))
    batch_items = [batch_touchpoints(rng, seeded, f"b-{SLOT}", now) for _ in range(batches)]
    return Workload(
        singles=single_bodies,
        batches=[_encode({"touchpoints": items}) for items in batch_items],
        batch_items=batch_items,
    )


def batch_touchpoints(
    rng: random.Random, seeded: Sequence[str], event_prefix: str, now: datetime
) -> list[dict[str, Any]]:
    items = []
    known = int(BATCH_SIZE * KNOWN_SHARE)
    for j in range(known):
        who = rng.choice(seeded)
        kind = rng.choices(("purchase", "email_open", "browsing"), (3, 4, 93))[0]
        kind = browsing(rng) if kind == "browsing" else kind
        items.append(touchpoint(rng, f"{event_prefix}-{j:03d}", kind, customer=who, now=now))
    for j in range(known, BATCH_SIZE):
        session = (j - known) // SESSION_EVENTS
        visitor = f"vb-{SLOT}-{session:03d}"
        last = (j - known) % SESSION_EVENTS == SESSION_EVENTS - 1
        if last and session % 10 == 0:
            new_customer = f"new-{SLOT}-{session:03d}"
            item = touchpoint(
                rng,
                f"{event_prefix}-{j:03d}",
                "account_created",
                customer=new_customer,
                anonymous=visitor,
                email=f"{new_customer}@example.com",
                now=now,
            )
        else:
            item = touchpoint(
                rng, f"{event_prefix}-{j:03d}", browsing(rng), anonymous=visitor, now=now
            )
        items.append(item)
    rng.shuffle(items)
    return items


def copy_rows(items: Sequence[dict[str, Any]], received_at: datetime) -> list[tuple[Any, ...]]:
    """The rows ingest would store for ``items``, minus ``event_id`` (stamped per copy)."""
    rows = []
    for n, item in enumerate(items):
        order = item.get("order")
        details = None
        if order is not None:
            details = _encode(
                {k: v for k, v in order.items() if k not in ("order_id", "amount", "currency")}
            ).decode()
        rows.append(
            (
                n + 1,  # customer_ref: the copy table has no foreign key
                item["type"],
                item["channel"],
                item.get("customer_id"),
                item.get("anonymous_id"),
                datetime.fromisoformat(item["occurred_at"]),
                None,
                received_at,
                item.get("email"),
                order["order_id"] if order else None,
                order["amount"] if order else None,
                order["currency"] if order else None,
                details,
                _encode(item.get("properties", {})).decode(),
                _encode(item.get("context", {})).decode(),
            )
        )
    return rows


async def copy_rate(
    url: str,
    schema: str,
    batches: Sequence[Sequence[dict[str, Any]]],
    *,
    connections: int,
    seconds: float,
    warmup: float,
) -> LoadResult:
    """``copy_records_to_table`` of the batch scenario's rows, one 500-row ``COPY`` per call.

    Into ``bench_copy``, a copy of the shop's ``touchpoints`` with its defaults, identity and
    indexes (the unique ``event_id`` and the timeline index) but no foreign key: the same work
    for PostgreSQL as storing the rows, minus everything ingest adds around it.
    """
    schema = checked_shop_schema(schema)
    received_at = datetime.now(UTC)
    templates = [copy_rows(items, received_at) for items in batches]
    counter = itertools.count()

    def next_rows() -> list[tuple[Any, ...]]:
        n = next(counter)
        return [
            (f"copy-{n:010x}-{j:03d}", *row) for j, row in enumerate(templates[n % len(templates)])
        ]

    async def one_connection(
        conn: asyncpg.Connection[Any], deadline: float, latencies: list[float]
    ) -> None:
        while time.perf_counter() < deadline:
            rows = next_rows()
            started = time.perf_counter()
            await conn.copy_records_to_table(
                "bench_copy", records=rows, columns=COPY_COLUMNS, schema_name=schema
            )
            latencies.append(time.perf_counter() - started)

    conns = [await asyncpg.connect(url) for _ in range(connections)]
    try:
        await conns[0].execute(
            f"CREATE TABLE {schema}.bench_copy (LIKE {schema}.touchpoints INCLUDING ALL)"
        )
        if warmup > 0:
            warm_until = time.perf_counter() + warmup
            await asyncio.gather(*(one_connection(c, warm_until, []) for c in conns))
        latencies: list[float] = []
        started = time.perf_counter()
        await asyncio.gather(*(one_connection(c, started + seconds, latencies) for c in conns))
        elapsed = time.perf_counter() - started
        await conns[0].execute(f"DROP TABLE {schema}.bench_copy")
    finally:
        for conn in conns:
            await conn.close()
    return summarize(
        f"COPY, {BATCH_SIZE} rows per COPY",
        "copy",
        connections=connections,
        elapsed=elapsed,
        latencies=latencies,
        items_per_request=BATCH_SIZE,
    )


async def stored_count(url: str, schema: str, pattern: str) -> int:
    """Touchpoints whose ``event_id`` matches the ``LIKE`` pattern."""
    schema = checked_shop_schema(schema)
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                f"SELECT count(*) FROM {schema}.touchpoints WHERE event_id LIKE $1", pattern
            )
        )
    finally:
        await conn.close()


async def analyze(url: str, schema: str) -> None:
    """Fresh planner statistics after seeding, as a running shop would have."""
    schema = checked_shop_schema(schema)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"ANALYZE {schema}.customers, {schema}.identities, {schema}.touchpoints")
    finally:
        await conn.close()
    progress("analyzed the seeded tables")
