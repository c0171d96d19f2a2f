"""Loyalty ledger properties: random operation sequences under each refund policy, concurrent
redemptions, and idempotent redemption retries.

How Hypothesis runs here. The suite's pytest-asyncio (1.5, ``asyncio_mode = "auto"``, session
loop) recognises an ``async def`` test decorated with ``@given`` (its ``AsyncHypothesisTest``
item) and runs every example's coroutine on the session loop. So the property test is a plain
``async def`` with ``@given``: it uses the session ``db`` pool and the ``provision`` factory
directly, without a second loop, a second pool or thread hand-offs. ``provision`` is
function-scoped, which Hypothesis flags (``function_scoped_fixture``); it is a stateless factory
and every example provisions a shop of its own, so the check is suppressed. The settings are
CI-friendly: ``derandomize=True`` (the same examples every run), ``database=None`` (no
``.hypothesis`` directory), ``deadline=None`` (database round trips vary), 30 examples per
policy.

An example is one shop with a random programme (return window, expiry, tiers) and a random list
of operations on two customers, run on a simulated clock that moves on after each operation:
purchases and actions through the real ingest transaction (``api.touchpoints.ingest.record``
with ``received_at`` = the clock), refunds (part of an earlier order or the rest of it), re-sent
orders, redemptions (a share of the balance: 10%, 50%, all of it, or one point more), orders
paid with points (``reference``; amount 0 is an order paid wholly with points), adjustments of
either sign, and the activation and expiry job (``jobs.settle_due``) at a later time.

After every operation (:func:`check_ledger`, :func:`check_refunds`): each balance equals the sum
of its entries' deltas and its lots (available = active lots' remaining - debt, pending =
pending lots' remaining, lifetime = sum of lifetime deltas); available and debt stay at 0 or
above unless the policy is ``allow_negative``; the job leaves nothing due. And what each
operation promises exactly: a purchase earns one point per euro times the tier's multiplier, a
re-sent order nothing; a redemption or removal succeeds exactly when the balance settled at that
time covers it, takes exactly that and never touches lifetime, and otherwise raises
``insufficient-points`` (409) with every ledger table unchanged; refunds take back the refunded
share of the order's points (all of it once the whole order is refunded), as much of it as the
policy allows (all under ``allow_negative``, never spendable points under ``pending_only``),
and give back the same share of the points that paid for the order.

Two ``@example``s pin the paths random generation reaches least often (a debt paid off by an
activation, then expiry; an order paid with points refunded in three parts), and ``target``
steers generation towards sequences with every kind of ledger entry (and, under
``allow_negative``, towards debt). ``pytest --hypothesis-show-statistics`` shows what was
reached (``event``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, event, example, given, settings, target
from hypothesis import strategies as st

from api.customers.profiles import resolve_customer_ref
from api.db import Database, Tenant, TenantConn, in_tenant, tenant_tx
from api.errors import Problem
from api.loyalty import accounts, jobs, ledger
from api.loyalty.accounts import AdjustmentIn, Redemption, RedemptionIn
from api.loyalty.program import Program, current_program, parse_program, save_program
from api.tenants.lifecycle import ProvisionedShop
from api.touchpoints import ingest
from api.touchpoints.schemas import TouchpointIn
from tests.conftest import ProvisionFactory, bearer, http_client, make_app
from tests.test_loyalty import PROGRAM, action, invariant_holds, loyalty_url, purchase, refund
from tests.test_touchpoints import touchpoint

T = TypeVar("T")
POLICIES = ("pending_only", "within_balance", "allow_negative")
CUSTOMERS = ("ann", "bob")
#: The simulated clock starts on 31 January, so "one month later" clamps to February's end.
START = datetime(2026, 1, 31, 12, tzinfo=UTC)
ACTOR = "property-test"
TIERS: dict[str, Any] = {
    "levels": [
        {"name": "bronze", "threshold": 0},
        {"name": "silver", "threshold": 150, "multiplier_percent": 150},
        {"name": "gold", "threshold": 500, "multiplier_percent": 200},
    ],
    "window_days": 60,
    "review_after_days": 30,
}
INSUFFICIENT = "insufficient-points"


# --- operations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Buy:
    """A purchase of ``amount`` minor units, ``days_back`` days before the clock."""

    customer: int
    amount: int
    days_back: int


@dataclass(frozen=True)
class Act:
    """A ``review_written`` touchpoint: action points, spendable at once."""

    customer: int


@dataclass(frozen=True)
class Resend:
    """An earlier order sent again with a new event id: it must earn nothing more."""

    order: int


@dataclass(frozen=True)
class Refund:
    """A refund of ``quarters``/4 of an earlier order's amount (4: everything not yet refunded)."""

    order: int
    quarters: int


@dataclass(frozen=True)
class Redeem:
    """Spend ``percent`` of what the customer can spend now (at least 1 point): 100 is all of it,
    101 one point more than there is."""

    customer: int
    percent: int


@dataclass(frozen=True)
class PayWithPoints:
    """Redeem ``percent`` of the balance for a new order (``reference``), then the order's
    purchase arrives."""

    customer: int
    percent: int
    amount: int


@dataclass(frozen=True)
class Adjust:
    customer: int
    points: int


@dataclass(frozen=True)
class Advance:
    """Move the clock forward and run the activation and expiry job."""

    days: int
    hours: int


Operation = Buy | Act | Resend | Refund | Redeem | PayWithPoints | Adjust | Advance

customer_index = st.integers(0, len(CUSTOMERS) - 1)
order_index = st.integers(0, 30)
buy = st.builds(Buy, customer_index, st.integers(0, 40_000), st.integers(0, 3))
refund_order = st.builds(Refund, order_index, st.integers(1, 4))
percent = st.sampled_from([10, 50, 100, 101])
redeem_points = st.builds(Redeem, customer_index, percent)
advance = st.builds(Advance, st.sampled_from([0, 1, 3, 7, 14, 31, 62]), st.integers(0, 23))
# Repeated entries weigh the draw: orders, refunds, spending and time come up most.
operations = st.one_of(
    buy,
    buy,
    refund_order,
    refund_order,
    redeem_points,
    advance,
    advance,
    st.builds(Act, customer_index),
    st.builds(Resend, order_index),
    # Amount 0: an order paid wholly with points.
    st.builds(PayWithPoints, customer_index, percent, st.integers(0, 20_000)),
    st.builds(Adjust, customer_index, st.integers(-300, -1) | st.integers(1, 300)),
)
#: Days the clock moves on after each operation.
gaps = st.sampled_from([0, 0, 1, 3, 6, 15])
programmes = st.fixed_dictionaries(
    {
        "pending_days": st.sampled_from([0, 3, 14]),
        "expiry": st.fixed_dictionaries(
            {"months": st.sampled_from([1, 2, None]), "end_of_month": st.booleans()}
        ),
        "tiers": st.sampled_from([{}, TIERS]),
    }
)


# --- the ledger as the database holds it --------------------------------------------------------


class _Rollback(Exception):
    pass


@dataclass
class Order:
    customer: str
    order_id: str
    amount: int
    refunded: int = 0
    #: Redemptions that paid for it (``reference``), in points.
    paid_with_points: int = 0


#: Balances of one customer as stored: available, pending, lifetime earned, debt, tier.
Balances = dict[str, Any]
#: What an operation promises: (customer, balance, expected value after it).
Expectations = list[tuple[str, str, Any]]


@dataclass
class Run:
    """One example: its shop, the clock, the orders so far and the balances after the last
    operation (as :func:`check_ledger` read them)."""

    db: Database
    shop: ProvisionedShop
    policy: str
    program: Program
    now: datetime = START
    orders: list[Order] = field(default_factory=list)
    refs: dict[str, int] = field(default_factory=dict)
    balances: dict[str, Balances] = field(default_factory=dict)
    counter: int = 0
    #: The highest debt any account reached.
    most_debt: int = 0

    @property
    def tenant(self) -> Tenant:
        return self.shop.tenant.as_tenant()

    def next_id(self, label: str) -> str:
        self.counter += 1
        return f"{label}-{self.counter}"

    async def tx(self, work: Callable[[TenantConn], Awaitable[T]]) -> T:
        return await in_tenant(self.db, self.tenant, work)

    async def ingest(self, raw: dict[str, Any]) -> None:
        item = msgspec.convert(raw, TouchpointIn)

        async def work(conn: TenantConn) -> None:
            [result] = await ingest.record(conn, [item], self.now, self.tenant.schema)
            assert result.status == "accepted", result

        await self.tx(work)

    async def settled_available(self, customer: str) -> int:
        """What the customer could spend at the clock's time, found in a rolled-back
        transaction (a redemption settles the same way before it checks the balance)."""
        found: list[int] = []
        try:
            async with tenant_tx(self.db, self.tenant) as conn:
                account = await ledger.lock_account(conn, self.refs[customer])
                await ledger.settle(conn, account, self.now)
                found.append(account.available)
                raise _Rollback
        except _Rollback:
            pass
        return found[0]

    async def snapshot(self) -> dict[str, Any]:
        """Everything a refused operation must leave as it was."""

        async def work(conn: TenantConn) -> dict[str, Any]:
            tables = {
                "accounts": "SELECT customer_ref, available, pending, lifetime_earned, debt, tier,"
                " tier_since, tier_review_at FROM loyalty_accounts ORDER BY customer_ref",
                "lots": "SELECT id, remaining, state FROM loyalty_lots ORDER BY id",
                "entries": "SELECT count(*), max(id) FROM loyalty_entries",
                "redemptions": "SELECT id, points, restored FROM loyalty_redemptions ORDER BY id",
                "refunds": "SELECT count(*) FROM loyalty_refunds",
                "outbox": "SELECT count(*), max(id) FROM outbox",
                "idempotency": "SELECT count(*) FROM idempotency_keys",
            }
            return {
                name: [tuple(row) for row in await conn.fetch(sql)] for name, sql in tables.items()
            }

        return await self.tx(work)


#: Per account: the balances, and what its entries and lots add up to (the invariant of
#: ``tests.test_loyalty.invariant_holds``, read in the same query as the rest).
_LEDGER_SQL = """
SELECT c.customer_id, a.available, a.pending, a.lifetime_earned, a.debt, a.tier,
    (SELECT coalesce(sum(available_delta), 0) FROM loyalty_entries e
        WHERE e.customer_ref = a.customer_ref) AS e_available,
    (SELECT coalesce(sum(pending_delta), 0) FROM loyalty_entries e
        WHERE e.customer_ref = a.customer_ref) AS e_pending,
    (SELECT coalesce(sum(lifetime_delta), 0) FROM loyalty_entries e
        WHERE e.customer_ref = a.customer_ref) AS e_lifetime,
    (SELECT coalesce(sum(remaining), 0) FROM loyalty_lots l
        WHERE l.customer_ref = a.customer_ref AND l.state = 'active') AS l_active,
    (SELECT coalesce(sum(remaining), 0) FROM loyalty_lots l
        WHERE l.customer_ref = a.customer_ref AND l.state = 'pending') AS l_pending,
    (SELECT count(*) FROM loyalty_lots l WHERE l.customer_ref = a.customer_ref
        AND l.remaining > 0 AND ((l.state = 'pending' AND l.activates_at <= $1)
        OR (l.expires_at IS NOT NULL AND l.expires_at <= $1))) AS overdue_lots
FROM loyalty_accounts a JOIN customers c ON c.id = a.customer_ref
"""
_BALANCES = ("available", "pending", "lifetime_earned", "debt", "tier")


async def check_ledger(run: Run) -> dict[str, Balances]:
    """The invariant and what the policy promises; returns each customer's balances."""

    async def work(conn: TenantConn) -> list[dict[str, Any]]:
        return [dict(row) for row in await conn.fetch(_LEDGER_SQL, run.now)]

    found = {}
    for row in await run.tx(work):
        assert row["available"] == row["e_available"] == row["l_active"] - row["debt"], row
        assert row["pending"] == row["e_pending"] == row["l_pending"], row
        assert row["lifetime_earned"] == row["e_lifetime"], row
        assert row["pending"] >= 0, row
        assert row["lifetime_earned"] >= 0, row
        if run.policy != "allow_negative":
            assert row["available"] >= 0, row
            assert row["debt"] == 0, row
        if row["available"] < 0:
            event("a balance went below zero")
        run.most_debt = max(run.most_debt, row["debt"])
        found[row["customer_id"]] = {key: row[key] for key in (*_BALANCES, "overdue_lots")}
    return found


async def check_refunds(run: Run, order: Order) -> None:
    """Per refund event: what was taken back is what the policy allows; per order: the shares
    taken and the points given back (that paid for it) are the refunded part of the order's,
    all of them once the whole order is refunded."""

    async def work(conn: TenantConn) -> tuple[list[dict[str, Any]], int, int, int]:
        refunds = await conn.fetch(
            "SELECT r.event_id, r.share, r.reversed, r.restored,"
            " (SELECT available_delta FROM loyalty_entries e"
            "   WHERE e.dedupe_key = 'reverse:event:' || r.event_id) AS taken_from_available"
            " FROM loyalty_refunds r WHERE r.order_id = $1",
            order.order_id,
        )
        totals = await conn.fetchrow(
            "SELECT (SELECT coalesce(sum(lifetime_delta), 0) FROM loyalty_entries"
            "   WHERE kind = 'earn' AND order_id = $1) AS earned,"
            " (SELECT coalesce(sum(points), 0) FROM loyalty_redemptions"
            "   WHERE reference = $1) AS paid,"
            " (SELECT coalesce(sum(restored), 0) FROM loyalty_redemptions"
            "   WHERE reference = $1) AS restored",
            order.order_id,
        )
        assert totals is not None
        return [dict(r) for r in refunds], totals["earned"], totals["paid"], totals["restored"]

    refunds, earned, paid, restored = await run.tx(work)
    assert paid == order.paid_with_points
    for row in refunds:
        assert 0 <= row["reversed"] <= row["share"], row
        if row["reversed"] < row["share"]:
            event("refund: less taken back than its share (policy)")
        if (row["taken_from_available"] or 0) < 0:
            event("refund: spendable points taken back")
        if row["restored"]:
            event("refund: points that paid given back")
        if run.policy == "allow_negative":
            assert row["reversed"] == row["share"], row
        if run.policy == "pending_only":
            assert (row["taken_from_available"] or 0) == 0, row
    # The refunded share of the order, rounded down, and all of it once it is all refunded.
    whole = order.refunded >= order.amount
    assert sum(r["share"] for r in refunds) == (
        earned if whole else earned * order.refunded // order.amount
    ), (refunds, earned)
    assert restored == (paid if whole else paid * order.refunded // order.amount), (restored, paid)


# --- running an operation -----------------------------------------------------------------------


async def spend(run: Run, settled: int, points: int, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run a spending ``work``: it must succeed exactly when the settled balance covers
    ``points``; otherwise raise a 409 and change nothing (``None``)."""
    if settled >= points:
        event("spending: covered")
        return await work()
    event("spending: refused")
    before = await run.snapshot()
    with pytest.raises(Problem) as refused:
        await work()
    assert (refused.value.slug, refused.value.status) == (INSUFFICIENT, 409)
    assert await run.snapshot() == before
    return None


def multiplier(program: Program, tier: str | None) -> int:
    return next((t.multiplier_percent for t in program.tiers.levels if t.name == tier), 100)


async def apply(run: Run, op: Operation) -> Expectations:
    """Do ``op``; returns what the balances must be after it."""
    if isinstance(op, Buy | PayWithPoints):
        customer = CUSTOMERS[op.customer]
        order = Order(customer, run.next_id("order"), op.amount)
        if isinstance(op, PayWithPoints):
            _, order.paid_with_points = await redeem(run, customer, op.percent, order.order_id)
            event("order paid with points" if order.paid_with_points else "order: points refused")
        lifetime = run.balances[customer]["lifetime_earned"]
        days_back = op.days_back if isinstance(op, Buy) else 0
        await run.ingest(
            purchase(customer, order.order_id, order.amount, run.now - timedelta(days=days_back))
        )
        run.orders.append(order)
        # One point per euro, rounded down, times the multiplier of the tier before the order.
        earned = order.amount // 100 * multiplier(run.program, run.balances[customer]["tier"])
        return [(customer, "lifetime_earned", lifetime + earned // 100)]
    if isinstance(op, Act):
        customer = CUSTOMERS[op.customer]
        await run.ingest(action(customer, "review_written", run.now))
        before = run.balances[customer]
        earned = 25 * multiplier(run.program, before["tier"]) // 100
        return [(customer, "lifetime_earned", before["lifetime_earned"] + earned)]
    if isinstance(op, Resend) and run.orders:
        order = run.orders[op.order % len(run.orders)]
        at = run.now - timedelta(hours=1)
        await run.ingest(purchase(order.customer, order.order_id, order.amount, at))
        # Earns nothing more.
        return [
            (order.customer, "lifetime_earned", run.balances[order.customer]["lifetime_earned"])
        ]
    if isinstance(op, Refund) and run.orders:
        order = run.orders[op.order % len(run.orders)]
        left = order.amount - order.refunded
        amount = left if op.quarters == 4 else min(left, order.amount * op.quarters // 4)
        await run.ingest(refund(order.customer, order.order_id, amount, run.now))
        order.refunded += amount
        await check_refunds(run, order)
    elif isinstance(op, Redeem):
        return (await redeem(run, CUSTOMERS[op.customer], op.percent, None))[0]
    elif isinstance(op, Adjust):
        return await adjust(run, CUSTOMERS[op.customer], op.points)
    elif isinstance(op, Advance):
        run.now += timedelta(days=op.days, hours=op.hours)

        async def settle(conn: TenantConn) -> int:
            # A small batch, so "the next run takes the rest" is exercised too.
            return await jobs.settle_due(conn, run.now, batch=1)

        # Each run settles every due lot of the customers it picks: one run per customer at
        # most, then a run that finds nothing.
        runs = [await run.tx(settle) for _ in range(len(CUSTOMERS) + 1)]
        assert runs[-1] == 0, f"the job keeps finding due points: {runs}"
        return [(customer, "overdue_lots", 0) for customer in CUSTOMERS]
    return []


async def redeem(
    run: Run, customer: str, percent: int, reference: str | None
) -> tuple[Expectations, int]:
    """Returns what the balances must be after, and the points spent (0: refused)."""
    ref = run.refs[customer]
    settled = await run.settled_available(customer)
    points = max(1, settled * percent // 100)
    body = RedemptionIn(points=points, reason="property test", reference=reference)

    async def work(conn: TenantConn) -> Redemption:
        return await accounts.redeem(conn, ref, customer, body, ACTOR, run.now)

    done = await spend(run, settled, points, lambda: run.tx(work))
    if done is None:
        return [], 0
    assert done.available == settled - points
    before = run.balances[customer]
    expected = [
        (customer, "available", settled - points),
        # Spending never touches what was earned.
        (customer, "lifetime_earned", before["lifetime_earned"]),
    ]
    return expected, points


async def adjust(run: Run, customer: str, points: int) -> Expectations:
    ref = run.refs[customer]
    body = AdjustmentIn(points=points, reason="property test")

    async def work(conn: TenantConn) -> accounts.LoyaltyTransaction:
        program = await current_program(conn, run.tenant.schema)
        return await accounts.adjust(conn, ref, program, body, ACTOR, run.now)

    settled = await run.settled_available(customer)
    if points > 0:
        entry = await run.tx(work)
    else:
        done = await spend(run, settled, -points, lambda: run.tx(work))
        if done is None:
            return []
        entry = done
    assert (entry.kind, entry.available_delta, entry.lifetime_delta) == ("adjust", points, 0)
    return [
        (customer, "available", settled + points),
        # Adjustments never count as earned.
        (customer, "lifetime_earned", run.balances[customer]["lifetime_earned"]),
    ]


async def start(db: Database, provision: ProvisionFactory, policy: str, changes: Any) -> Run:
    shop = await provision(f"Property shop {uuid.uuid4().hex[:8]}")
    program = parse_program(
        msgspec.json.encode(
            {
                **PROGRAM,
                "actions": {"account_created": 100, "review_written": 25},
                "refund_policy": policy,
                **changes,
            }
        )
    )
    run = Run(db, shop, policy, program)

    async def save(conn: TenantConn) -> None:
        await save_program(conn, program, ACTOR)

    await run.tx(save)
    # Each customer starts with a sign-up: 100 points, spendable at once.
    for customer in CUSTOMERS:
        await run.ingest(action(customer, "account_created", run.now - timedelta(days=1)))

    async def find(conn: TenantConn) -> dict[str, int | None]:
        return {c: await resolve_customer_ref(conn, c) for c in CUSTOMERS}

    for customer, ref in (await run.tx(find)).items():
        assert ref is not None
        run.refs[customer] = ref
    run.balances = await check_ledger(run)
    return run


@pytest.mark.parametrize("policy", POLICIES)
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(
    # Spend an order's points, refund it whole (a debt under allow_negative), then a pending
    # order activates (paying the debt first), an action, and everything expires.
    changes={"pending_days": 3, "expiry": {"months": 1, "end_of_month": False}, "tiers": {}},
    steps=[
        (Buy(0, 10_000, 3), 0),
        (Redeem(0, 100), 0),
        (Refund(0, 4), 0),
        (Buy(0, 5_000, 0), 3),
        (Advance(0, 1), 0),
        (Act(0), 0),
        (Advance(62, 0), 0),
    ],
)
@example(
    # An order paid partly with points, refunded in three parts, then re-sent.
    changes={"pending_days": 14, "expiry": {"months": 2, "end_of_month": True}, "tiers": TIERS},
    steps=[
        (Buy(1, 30_000, 0), 1),
        (PayWithPoints(1, 50, 8_000), 0),
        (Refund(1, 1), 6),
        (Refund(1, 2), 15),
        (Refund(1, 4), 0),
        (Resend(1), 0),
        (Adjust(1, -40), 0),
    ],
)
@given(changes=programmes, steps=st.lists(st.tuples(operations, gaps), min_size=3, max_size=20))
async def test_any_sequence_of_operations_keeps_the_ledger_exact(
    db: Database,
    provision: ProvisionFactory,
    policy: str,
    changes: dict[str, Any],
    steps: list[tuple[Operation, int]],
) -> None:
    run = await start(db, provision, policy, changes)
    for op, gap in steps:
        expected = await apply(run, op)
        run.balances = await check_ledger(run)
        for customer, key, value in expected:
            assert run.balances[customer][key] == value, (op, customer, key, run.balances)
        # Time passes without the job: the next write settles what fell due meanwhile.
        run.now += timedelta(days=gap)
    await invariant_holds(db, run.shop)
    kinds = await entry_kinds(run)
    for kind in kinds:
        event(f"ledger has {kind} entries")
    # Steer generation towards sequences that reach every kind of entry.
    target(len(kinds), label="kinds of ledger entry")
    if policy == "allow_negative":
        target(run.most_debt, label="debt")


async def entry_kinds(run: Run) -> list[str]:
    async def work(conn: TenantConn) -> list[str]:
        rows = await conn.fetch("SELECT DISTINCT kind FROM loyalty_entries ORDER BY kind")
        return [row["kind"] for row in rows]

    return await run.tx(work)


# --- concurrency --------------------------------------------------------------------------------

CONCURRENT = 50
HOLDING = 1_000
EACH = 100


@asynccontextmanager
async def big_pool(db_url: str) -> AsyncIterator[Database]:
    """A pool with a connection for every concurrent redemption (the shared one has 8)."""
    database = await Database.connect(db_url, min_size=1, max_size=CONCURRENT + 4)
    try:
        yield database
    finally:
        await database.close()


async def funded_customer(
    client: httpx.AsyncClient, provision: ProvisionFactory, customer: str, points: int
) -> ProvisionedShop:
    shop = await provision(f"Concurrent shop {uuid.uuid4().hex[:8]}")
    key = shop.secret_key
    saved = await client.put("/v1/config/loyalty", json=PROGRAM, headers=bearer(key))
    assert saved.status_code == 200, saved.text
    seen = await client.post(
        "/v1/touchpoints",
        json=touchpoint(f"evt-{customer}", customer_id=customer, anonymous_id=None),
        headers=bearer(key),
    )
    assert seen.status_code == 201, seen.text
    added = await client.post(
        loyalty_url(customer, "/adjustments"),
        json={"points": points, "reason": "opening balance"},
        headers=bearer(key),
    )
    assert added.status_code == 201, added.text
    return shop


async def waiting_on_locks(db: Database) -> int:
    """Sessions of this test database waiting for a lock right now (while the gate is closed,
    only the redemptions can be: tests run one at a time, and each run has its own database)."""
    async with db.control() as conn:
        waiting: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        )
    return waiting


async def all_at_the_gate(
    db: Database,
    shop: ProvisionedShop,
    customer: str,
    launch: Callable[[], list[asyncio.Task[T]]],
) -> list[T | BaseException]:
    """Hold the customer's account row lock while ``launch()`` starts the redemptions, and let
    go only when every one of them is a transaction waiting for it: all of them are in the
    database at once, none was served before the others started."""
    async with tenant_tx(db, shop.tenant.as_tenant()) as gate:
        ref = await resolve_customer_ref(gate, customer)
        await gate.execute("SELECT 1 FROM loyalty_accounts WHERE customer_ref = $1 FOR UPDATE", ref)
        tasks = launch()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (waiting := await waiting_on_locks(db)) < CONCURRENT:
            assert loop.time() < deadline, f"only {waiting} redemptions reached the account lock"
            await asyncio.sleep(0.02)
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_concurrent_redemptions_over_http_never_overspend(
    db: Database, db_url: str, provision: ProvisionFactory
) -> None:
    async with big_pool(db_url) as pool:
        app = make_app(pool, rate_limit_burst=10_000, shop_rate_limit_burst=10_000)
        async with http_client(app) as client:
            shop = await funded_customer(client, provision, "cas", HOLDING)
            headers = bearer(shop.secret_key)

            def launch() -> list[asyncio.Task[httpx.Response]]:
                return [
                    asyncio.create_task(
                        client.post(
                            loyalty_url("cas", "/redemptions"),
                            json={"points": EACH, "reason": f"reward {n}"},
                            headers={**headers, "Idempotency-Key": f"redeem-{n}"},
                        )
                    )
                    for n in range(CONCURRENT)
                ]

            results = await all_at_the_gate(db, shop, "cas", launch)
            responses = [r for r in results if isinstance(r, httpx.Response)]
            assert len(responses) == CONCURRENT, results
            statuses = sorted(r.status_code for r in responses)
            assert statuses == [201] * 10 + [409] * 40
            for refused in (r for r in responses if r.status_code == 409):
                assert refused.headers["content-type"].startswith("application/problem+json")
                assert refused.json()["type"] == f"/problems/{INSUFFICIENT}"
            after = [r.json()["available"] for r in responses if r.status_code == 201]
            # Each success saw the balance the one before it left.
            assert sorted(after) == list(range(0, HOLDING, EACH))
            account = await client.get(loyalty_url("cas"), headers=headers)
            assert account.json()["available"] == 0
    await invariant_holds(db, shop)


async def test_concurrent_redemptions_in_separate_transactions_never_overspend(
    db: Database, db_url: str, provision: ProvisionFactory, client: httpx.AsyncClient
) -> None:
    shop = await funded_customer(client, provision, "dex", HOLDING)
    tenant = shop.tenant.as_tenant()
    async with big_pool(db_url) as pool:

        async def one(n: int) -> Redemption:
            async def work(conn: TenantConn) -> Redemption:
                ref = await resolve_customer_ref(conn, "dex")
                assert ref is not None
                body = RedemptionIn(points=EACH, reason=f"reward {n}")
                return await accounts.redeem(conn, ref, "dex", body, ACTOR, datetime.now(UTC))

            return await in_tenant(pool, tenant, work)

        def launch() -> list[asyncio.Task[Redemption]]:
            return [asyncio.create_task(one(n)) for n in range(CONCURRENT)]

        results = await all_at_the_gate(db, shop, "dex", launch)
    done = [r for r in results if isinstance(r, Redemption)]
    refused = [r for r in results if isinstance(r, Problem)]
    assert (len(done), len(refused)) == (10, 40), [r for r in results if isinstance(r, Exception)]
    assert {(p.slug, p.status) for p in refused} == {(INSUFFICIENT, 409)}
    assert sorted(r.available for r in done) == list(range(0, HOLDING, EACH))
    async with tenant_tx(db, tenant) as conn:
        row = await conn.fetchrow(
            "SELECT available, pending, debt FROM loyalty_accounts a JOIN customers c"
            " ON c.id = a.customer_ref WHERE c.customer_id = 'dex'"
        )
        redeemed = await conn.fetchval("SELECT count(*) FROM loyalty_entries WHERE kind = 'redeem'")
    assert row is not None and tuple(row) == (0, 0, 0)
    assert redeemed == 10
    await invariant_holds(db, shop)


# --- idempotency --------------------------------------------------------------------------------


async def test_a_replayed_redemption_spends_once_and_a_reused_key_is_refused(
    db: Database, provision: ProvisionFactory, client: httpx.AsyncClient
) -> None:
    shop = await funded_customer(client, provision, "eve", 300)
    headers = {**bearer(shop.secret_key), "Idempotency-Key": "checkout-42"}
    url = loyalty_url("eve", "/redemptions")
    body = {"points": 100, "reason": "free shipping", "reference": "o-42"}

    first = await client.post(url, json=body, headers=headers)
    assert first.status_code == 201, first.text
    assert "Idempotency-Replayed" not in first.headers
    again = await client.post(url, json=body, headers=headers)
    assert again.status_code == 201
    assert again.headers["Idempotency-Replayed"] == "true"
    assert again.json() == first.json()

    other = await client.post(url, json={**body, "points": 50}, headers=headers)
    assert other.status_code == 422
    assert other.json()["type"] == "/problems/idempotency-key-reused"

    account = await client.get(loyalty_url("eve"), headers=bearer(shop.secret_key))
    assert account.json()["available"] == 200
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        spent = await conn.fetch("SELECT id, points FROM loyalty_redemptions")
    assert [tuple(r) for r in spent] == [(first.json()["id"], 100)]
    await invariant_holds(db, shop)


async def test_a_refund_gives_back_the_points_of_an_order_paid_wholly_with_them(
    db: Database, provision: ProvisionFactory, client: httpx.AsyncClient
) -> None:
    # Found by the property test: a refund of an order whose cash amount is 0 gave nothing back,
    # because a purchase amount of 0 was taken for "no such purchase".
    shop = await funded_customer(client, provision, "fay", 500)
    key = shop.secret_key
    paid = await client.post(
        loyalty_url("fay", "/redemptions"),
        json={"points": 300, "reason": "gift", "reference": "o-free"},
        headers=bearer(key),
    )
    assert paid.status_code == 201, paid.text
    at = datetime.now(UTC) - timedelta(hours=1)
    for item in (purchase("fay", "o-free", 0, at), refund("fay", "o-free", 0, at)):
        sent = await client.post("/v1/touchpoints", json=item, headers=bearer(key))
        assert sent.status_code == 201, sent.text
    account = await client.get(loyalty_url("fay"), headers=bearer(key))
    assert account.json()["available"] == 500
    await invariant_holds(db, shop)
