"""Usage: counting on ingest (exact under concurrency, without a hot row), quotas (429 on Free,
overage billed on paid plans), the 80 % / 100 % events, meter events to the fake Stripe (never
double-sent, even when a worker dies between sending and marking), backoff, reconciliation.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest

from api.billing import metering, usage
from api.billing.metering import identifier, report_overage, send_due
from api.billing.plans import plan_book
from api.billing.reconcile import raise_missed_alerts, reconcile_account
from api.billing.stripe_client import StripeGateway, gateway_for
from api.config import Settings
from api.db import Database, tenant_tx
from api.tenants.lifecycle import ProvisionedShop
from api.touchpoints import ingest
from api.webhooks.events import EVENT_TYPES
from tests.conftest import ProvisionFactory, bearer
from tests.stripe_fake import FakeStripe
from tests.test_billing import (  # the module-scoped fake Stripe and billing app
    bill,
    billing,
    billing_app,
    settings,
    stripe,
    subscribe,
    unique,
)
from tests.test_http import assert_problem
from tests.test_touchpoints import send, touchpoint

__all__ = ["bill", "billing_app", "settings", "stripe"]  # fixtures, used by name
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")


async def counted(db: Database, shop: ProvisionedShop) -> tuple[int, int, int]:
    """(the month's usage, rows still in the usage log, touchpoints stored) of the shop."""
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        used = await usage.used(conn, usage.period_start(datetime.now(UTC)))
        logged = await conn.fetchval("SELECT count(*) FROM usage_log")
        stored = await conn.fetchval("SELECT count(*) FROM touchpoints")
    return used, int(logged), int(stored)


async def outbox(db: Database, shop: ProvisionedShop) -> list[tuple[str, dict[str, Any]]]:
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        rows = await conn.fetch(
            "SELECT type, payload FROM outbox WHERE type LIKE 'billing.%' ORDER BY id"
        )
    return [(r["type"], r["payload"]) for r in rows]


# -- counting --------------------------------------------------------------------------------


async def test_usage_is_exact_under_concurrent_ingest(
    client: httpx.AsyncClient, db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Busy shop"))
    bystander = await provision(unique("Quiet shop"))
    key = shop.secret_key

    def batch(n: int) -> list[dict[str, Any]]:
        # 30 new ids, 10 shared with the next batch, one in-batch repeat, one invalid item.
        items = [touchpoint(f"b-{n * 30 + j}", anonymous_id=f"v-{n}") for j in range(40)]
        items.append(touchpoint(f"b-{n * 30}", anonymous_id=f"v-{n}"))
        items.append(touchpoint(f"bad-{n}", type="not a type"))
        return items

    async def single(n: int) -> int:
        response = await client.post(
            "/v1/touchpoints", json=touchpoint(f"b-{n * 7}", anonymous_id="s"), headers=bearer(key)
        )
        assert response.status_code in (200, 201), response.text
        return 1 if response.status_code == 201 else 0

    async def batched(n: int) -> int:
        return int((await send(client, key, *batch(n)))["accepted"])

    results = await asyncio.gather(
        *(batched(n) for n in range(16)), *(single(n) for n in range(40))
    )
    await send(client, bystander.secret_key, touchpoint("only-one"))
    distinct = {f"b-{i}" for n in range(16) for i in range(n * 30, n * 30 + 40)}
    distinct |= {f"b-{n * 7}" for n in range(40)}
    used, _, stored = await counted(db, shop)
    assert sum(results) == len(distinct) == used == stored
    assert (await counted(db, bystander))[0] == 1

    # Duplicates and rejected items never count.
    again = await send(client, key, *batch(0))
    assert again["accepted"] == 0
    assert (await counted(db, shop))[0] == used


async def test_the_log_folds_into_the_months_total_without_losing_a_count(
    db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Folding shop"))
    november, december = date(2026, 11, 1), date(2026, 12, 1)

    async def log(*rows: tuple[date, int]) -> None:
        async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
            await conn.executemany(
                "INSERT INTO usage_log (period_start, touchpoints) VALUES ($1, $2)", rows
            )

    async def fold_and_read(period: date) -> tuple[int, int]:
        async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
            total = await usage.fold(conn, period)
            left = await conn.fetchval(
                "SELECT count(*) FROM usage_log WHERE period_start = $1", period
            )
        return total, int(left)

    await log((november, 5), (november, 7), (december, 2))
    assert await fold_and_read(november) == (12, 0)
    await log((november, 1))
    # Concurrent folds and appends: every row is counted once.
    results = await asyncio.gather(
        *(fold_and_read(november) for _ in range(4)), log((november, 3)), log((november, 4))
    )
    assert {r[0] for r in results if r is not None} <= {13, 16, 17, 20}
    assert await fold_and_read(november) == (20, 0)
    assert await fold_and_read(december) == (2, 0)
    assert await fold_and_read(date(2027, 1, 1)) == (0, 0)


def test_periods_are_calendar_months_in_utc() -> None:
    late = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert usage.period_start(late) == date(2026, 12, 1)
    assert usage.next_period(date(2026, 12, 1)) == date(2027, 1, 1)
    assert usage.period_bounds(date(2027, 2, 1)) == (
        datetime(2027, 2, 1, tzinfo=UTC),
        datetime(2027, 3, 1, tzinfo=UTC),
    )
    assert metering.periods_to_report(datetime(2027, 1, 3, tzinfo=UTC)) == (
        date(2026, 12, 1),
        date(2027, 1, 1),
    )


# -- quotas ----------------------------------------------------------------------------------


async def test_free_over_quota_is_429_and_the_alerts_are_raised_once(
    bill: httpx.AsyncClient, db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Free shop"))  # Free: 20 touchpoints a month here
    other = await provision(unique("Other free shop"))
    key = shop.secret_key
    first = await send(bill, key, *(touchpoint(unique("e")) for _ in range(15)))
    assert first["accepted"] == 15
    assert await outbox(db, shop) == []
    # Admitted under the quota: stored whole, taking the count past it.
    crossing = await send(bill, key, *(touchpoint(unique("e")) for _ in range(10)))
    assert crossing["accepted"] == 10
    alerts = await outbox(db, shop)
    assert [t for t, _ in alerts] == ["billing.quota_warning", "billing.quota_reached"]
    assert alerts[0][1]["percent"] == 80
    assert alerts[1][1] | {"period_start": None, "period_end": None} == {
        "percent": 100,
        "plan": "free",
        "quota": 20,
        "touchpoints": 25,
        "over_quota": "refused",
        "period_start": None,
        "period_end": None,
    }

    refused = await bill.post("/v1/touchpoints", json=touchpoint(unique("e")), headers=bearer(key))
    problem = assert_problem(refused, 429, "quota-exceeded")
    assert "20 touchpoints" in str(problem["detail"])
    assert "POST /v1/billing/checkout" in str(problem["detail"])
    assert 0 < int(refused.headers["retry-after"]) <= 31 * 86_400
    batch = await bill.post(
        "/v1/touchpoints/batch",
        json={"touchpoints": [touchpoint(unique("e"))]},
        headers=bearer(shop.publishable_key),
    )
    assert_problem(batch, 429, "quota-exceeded")

    # A process that never saw this shop reads the month and refuses too, storing nothing.
    usage._figures._figures.clear()
    fresh = await bill.post("/v1/touchpoints", json=touchpoint(unique("e")), headers=bearer(key))
    assert_problem(fresh, 429, "quota-exceeded")
    used, _, stored = await counted(db, shop)
    assert (used, stored) == (25, 25)
    assert len(await outbox(db, shop)) == 2

    body = await billing(bill, key)
    assert body["usage"] | {"period_start": None, "period_end": None} == {
        "touchpoints": 25,
        "quota": 20,
        "percent": 125.0,
        "overage": 5,
        "overage_reported": 0,
        "period_start": None,
        "period_end": None,
    }
    assert (await send(bill, other.secret_key, touchpoint("mine")))["accepted"] == 1


async def test_missed_alerts_are_raised_by_the_reconciliation(
    db: Database, settings: Settings, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Missed shop"))
    now = datetime.now(UTC)
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        await conn.execute(
            "INSERT INTO usage_log (period_start, touchpoints) VALUES ($1, 17)",
            usage.period_start(now),
        )
    tenant = [shop.tenant.as_tenant()]
    assert await raise_missed_alerts(db, plan_book(settings), now, tenant) == 1
    assert await raise_missed_alerts(db, plan_book(settings), now, tenant) == 0
    assert [t for t, _ in await outbox(db, shop)] == ["billing.quota_warning"]


# -- overage to Stripe -----------------------------------------------------------------------


async def paid_shop_over_quota(
    bill: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    stripe: FakeStripe,
    provision: ProvisionFactory,
    accepted: int,
) -> tuple[ProvisionedShop, str]:
    """A shop on Growth (50 a month here) that accepted ``accepted`` touchpoints."""
    shop = await provision(unique("Paid shop"))
    await subscribe(bill, db, settings, stripe, shop)
    body = await send(bill, shop.secret_key, *(touchpoint(unique("e")) for _ in range(accepted)))
    assert body["accepted"] == accepted  # never refused on a paid plan
    async with db.control() as conn:
        customer = await conn.fetchval(
            "SELECT stripe_customer_id FROM sjaak.billing_accounts WHERE tenant_id = $1",
            shop.tenant.id,
        )
    return shop, str(customer)


def gateway(settings: Settings) -> StripeGateway:
    found = gateway_for(settings)
    assert found is not None
    return found


async def meter_rows(db: Database, shop: ProvisionedShop) -> list[dict[str, Any]]:
    async with db.control() as conn:
        rows = await conn.fetch(
            "SELECT identifier, value, billable_through, status, attempts, leased_until,"
            " next_attempt_at, last_error FROM sjaak.meter_events WHERE tenant_id = $1 ORDER BY id",
            shop.tenant.id,
        )
    return [dict(r) for r in rows]


async def test_a_paid_plan_bills_the_overage_through_meter_events(
    bill: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    stripe: FakeStripe,
    provision: ProvisionFactory,
) -> None:
    shop, customer = await paid_shop_over_quota(bill, db, settings, stripe, provision, 60)
    plans = plan_book(settings)
    now = datetime.now(UTC)
    assert [p["over_quota"] for _, p in await outbox(db, shop)] == ["billed", "billed"]

    assert await report_overage(db, settings, plans, shop.tenant.id, now) == 1
    assert await report_overage(db, settings, plans, shop.tenant.id, now) == 0  # nothing new
    period = usage.period_start(now)
    [row] = await meter_rows(db, shop)
    assert (row["identifier"], row["value"], row["status"]) == (
        identifier(shop.tenant.id, period, 10),
        10,
        "pending",
    )
    assert await send_due(db, gateway(settings), tenant_id=shop.tenant.id) == 1
    assert stripe.meter_total(customer) == 10
    [post] = stripe.calls("POST", "/v1/billing/meter_events")[-1:]
    assert post.idempotency_key == row["identifier"]
    assert post.params["payload"] == {"stripe_customer_id": customer, "value": "10"}
    assert post.params["event_name"] == "sjaak_touchpoints"
    assert abs(int(post.params["timestamp"]) - now.timestamp()) < 5

    await send(bill, shop.secret_key, *(touchpoint(unique("e")) for _ in range(5)))
    assert await report_overage(db, settings, plans, shop.tenant.id, datetime.now(UTC)) == 1
    assert await send_due(db, gateway(settings), tenant_id=shop.tenant.id) == 1
    assert stripe.meter_total(customer) == 15
    assert [r["billable_through"] for r in await meter_rows(db, shop)] == [10, 15]
    body = await billing(bill, shop.secret_key)
    assert (body["usage"]["overage"], body["usage"]["overage_reported"]) == (15, 15)

    found = await reconcile_account(
        db, gateway(settings), settings, plans, shop.tenant.id, datetime.now(UTC)
    )
    current = found[-1]
    assert (current.counted, current.billable, current.queued, current.sent) == (65, 15, 15, 15)
    assert (current.stripe_total, current.status) == (15, "ok")


async def test_meter_events_are_never_double_sent_across_a_crash_between_send_and_mark(
    bill: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    stripe: FakeStripe,
    provision: ProvisionFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shop, customer = await paid_shop_over_quota(bill, db, settings, stripe, provision, 55)
    plans = plan_book(settings)
    now = datetime.now(UTC)
    await report_overage(db, settings, plans, shop.tenant.id, now)
    real_mark_sent = metering.mark_sent

    async def die(*args: Any) -> None:
        raise RuntimeError("the worker died between sending and marking")

    monkeypatch.setattr(metering, "mark_sent", die)
    with pytest.raises(RuntimeError, match="worker died"):
        await send_due(db, gateway(settings), now, tenant_id=shop.tenant.id)
    [row] = await meter_rows(db, shop)
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert row["leased_until"] > now
    assert stripe.meter_total(customer) == 5
    monkeypatch.setattr(metering, "mark_sent", real_mark_sent)

    # While the lease holds, no other worker sends it.
    assert await send_due(db, gateway(settings), now, tenant_id=shop.tenant.id) == 0
    # After it, the same identifier and idempotency key go again; Stripe counts it once.
    later = now + metering.LEASE + timedelta(seconds=1)
    assert await send_due(db, gateway(settings), later, tenant_id=shop.tenant.id) == 1
    posts = [
        c
        for c in stripe.calls("POST", "/v1/billing/meter_events")
        if c.params.get("identifier") == row["identifier"]
    ]
    assert len(posts) == 2
    assert {p.idempotency_key for p in posts} == {row["identifier"]}
    assert stripe.meter_total(customer) == 5
    assert (await meter_rows(db, shop))[0]["status"] == "sent"

    # Even when Stripe has forgotten the idempotency key, the identifier dedupes.
    await send(bill, shop.secret_key, *(touchpoint(unique("e")) for _ in range(3)))
    await report_overage(db, settings, plans, shop.tenant.id, later)
    monkeypatch.setattr(metering, "mark_sent", die)
    with pytest.raises(RuntimeError):
        await send_due(db, gateway(settings), later, tenant_id=shop.tenant.id)
    monkeypatch.setattr(metering, "mark_sent", real_mark_sent)
    stripe._idempotent.clear()
    even_later = later + metering.LEASE + timedelta(seconds=1)
    assert await send_due(db, gateway(settings), even_later, tenant_id=shop.tenant.id) == 1
    second = (await meter_rows(db, shop))[1]["identifier"]
    assert stripe.meter_posts.count(second) == 2
    assert stripe.meter_total(customer) == 8


async def test_two_workers_never_send_the_same_event(
    bill: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    stripe: FakeStripe,
    provision: ProvisionFactory,
) -> None:
    shops = [
        await paid_shop_over_quota(bill, db, settings, stripe, provision, 51 + n) for n in range(3)
    ]
    now = datetime.now(UTC)
    for shop, _ in shops:
        await report_overage(db, settings, plan_book(settings), shop.tenant.id, now)
    before = len(stripe.calls("POST", "/v1/billing/meter_events"))
    sent = await asyncio.gather(*(send_due(db, gateway(settings), now) for _ in range(4)))
    assert sum(sent) >= 3
    posted = stripe.calls("POST", "/v1/billing/meter_events")[before:]
    identifiers = [p.params["identifier"] for p in posted]
    assert len(identifiers) == len(set(identifiers))
    for n, (_, customer) in enumerate(shops):
        assert stripe.meter_total(customer) == 1 + n


async def test_stripe_errors_back_off_and_a_rejected_event_is_reported(
    bill: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    stripe: FakeStripe,
    provision: ProvisionFactory,
) -> None:
    shop, customer = await paid_shop_over_quota(bill, db, settings, stripe, provision, 52)
    plans = plan_book(settings)
    now = datetime.now(UTC)
    await report_overage(db, settings, plans, shop.tenant.id, now)
    stripe.fail_next("POST", "/v1/billing/meter_events", status=500)
    assert await send_due(db, gateway(settings), now, tenant_id=shop.tenant.id) == 0
    [row] = await meter_rows(db, shop)
    assert (row["status"], row["attempts"], row["leased_until"]) == ("pending", 1, None)
    assert row["next_attempt_at"] == now + timedelta(minutes=1)
    assert "unknown error" in row["last_error"]
    assert await send_due(db, gateway(settings), now, tenant_id=shop.tenant.id) == 0  # not due
    stripe.fail_next("POST", "/v1/billing/meter_events", status=429)
    retry = now + timedelta(minutes=1)
    assert await send_due(db, gateway(settings), retry, tenant_id=shop.tenant.id) == 0
    assert (await meter_rows(db, shop))[0]["next_attempt_at"] == retry + timedelta(minutes=2)
    assert (
        await send_due(
            db, gateway(settings), retry + timedelta(minutes=2), tenant_id=shop.tenant.id
        )
        == 1
    )
    assert stripe.meter_total(customer) == 2

    # Stripe rejects an event (no meter for its name): failed at once, and reconciliation says so.
    await send(bill, shop.secret_key, touchpoint(unique("e")))
    await report_overage(db, settings, plans, shop.tenant.id, now)
    stripe.meter_event_name = "renamed_meter"
    try:
        assert await send_due(db, gateway(settings), now, tenant_id=shop.tenant.id) == 0
    finally:
        stripe.meter_event_name = "sjaak_touchpoints"
    rows = await meter_rows(db, shop)
    assert (rows[1]["status"], rows[1]["attempts"]) == ("failed", 1)
    assert "No active meter" in rows[1]["last_error"]
    [*_, current] = await reconcile_account(
        db, gateway(settings), settings, plans, shop.tenant.id, now
    )
    assert (current.queued, current.sent, current.failed, current.status) == (3, 2, 1, "mismatch")
    assert current.stripe_total == 2


async def test_every_tenant_query_prepares_against_a_shop_schema(
    db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Prepared shop"))
    queries = {name: value for name, value in vars(usage).items() if name.endswith("_SQL")}
    assert len(queries) == 3
    queries["ingest._INSERT_COUNTED_SQL"] = ingest._INSERT_COUNTED_SQL
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        for name, sql in queries.items():
            named = sql.replace("count(*)", "")
            assert "*" not in named and "shop_" not in sql and "sjaak." not in sql, name
            await conn.prepare(sql)


def test_the_quota_events_can_be_subscribed_to() -> None:
    assert set(usage.ALERT_TYPES.values()) <= set(EVENT_TYPES)
