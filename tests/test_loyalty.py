"""Loyalty end to end: the programme, earning on ingest, the ledger's operations over HTTP, the
jobs, tiers and refunds, against the real database. Every test provisions its own shops.

Time is passed in, never slept: touchpoints carry their own ``occurred_at`` and the jobs and
ledger operations take ``now``.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest

from api.db import Database, tenant_tx
from api.loyalty import jobs
from api.loyalty.earning import spend_points
from api.loyalty.program import Expiry, Program, SpendRule, add_months, expires_at
from api.tenants.lifecycle import ProvisionedShop
from api.touchpoints.schemas import Order, OrderItem
from tests.conftest import ProvisionFactory, bearer
from tests.test_http import assert_problem
from tests.test_touchpoints import NOW, iso, send, touchpoint

DAY = timedelta(days=1)

PROGRAM: dict[str, Any] = {
    "spend": {"currency": "EUR", "points": 1, "per_minor_units": 100},
    "actions": {"review_written": 50, "account_created": 100},
    "pending_days": 14,
    "expiry": {"months": 12},
    "refund_policy": "within_balance",
}


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


def loyalty_url(customer_id: str, suffix: str = "") -> str:
    return f"/v1/customers/{customer_id}/loyalty{suffix}"


async def shop_with(
    client: httpx.AsyncClient, provision: ProvisionFactory, **changes: Any
) -> ProvisionedShop:
    shop = await provision(unique("Loyal shop"))
    response = await client.put(
        "/v1/config/loyalty", json={**PROGRAM, **changes}, headers=bearer(shop.secret_key)
    )
    assert response.status_code == 200, response.text
    return shop


def purchase(
    customer_id: str,
    order_id: str,
    amount: int,
    at: datetime,
    *,
    event_id: str | None = None,
    **order: Any,
) -> dict[str, Any]:
    return touchpoint(
        event_id or unique("evt"),
        type="purchase",
        customer_id=customer_id,
        anonymous_id=None,
        occurred_at=iso(at),
        order={"order_id": order_id, "amount": amount, "currency": "EUR", **order},
    )


def refund(customer_id: str, order_id: str, amount: int, at: datetime) -> dict[str, Any]:
    return touchpoint(
        unique("refund"),
        type="refund",
        customer_id=customer_id,
        anonymous_id=None,
        occurred_at=iso(at),
        order={"order_id": order_id, "amount": amount, "currency": "EUR"},
    )


def action(customer_id: str, type_: str, at: datetime = NOW) -> dict[str, Any]:
    return touchpoint(
        unique("act"), type=type_, customer_id=customer_id, anonymous_id=None, occurred_at=iso(at)
    )


async def account(client: httpx.AsyncClient, key: str, customer_id: str) -> dict[str, Any]:
    response = await client.get(loyalty_url(customer_id), headers=bearer(key))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def entries(client: httpx.AsyncClient, key: str, customer_id: str) -> list[dict[str, Any]]:
    response = await client.get(
        loyalty_url(customer_id, "/transactions"), params={"limit": 100}, headers=bearer(key)
    )
    assert response.status_code == 200, response.text
    return list(reversed(response.json()["data"]))


async def redeem(
    client: httpx.AsyncClient, key: str, customer_id: str, points: int, **extra: Any
) -> httpx.Response:
    headers = {**bearer(key), **extra.pop("headers", {})}
    return await client.post(
        loyalty_url(customer_id, "/redemptions"),
        json={"points": points, "reason": "reward", **extra},
        headers=headers,
    )


async def adjust(
    client: httpx.AsyncClient, key: str, customer_id: str, points: int, reason: str = "goodwill"
) -> httpx.Response:
    return await client.post(
        loyalty_url(customer_id, "/adjustments"),
        json={"points": points, "reason": reason},
        headers=bearer(key),
    )


async def run_jobs(db: Database, shop: ProvisionedShop, now: datetime) -> int:
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        done = await jobs.settle_due(conn, now)
        done += await jobs.warn_expiring(conn, shop.tenant.schema_name, now)
        return done + await jobs.review_tiers(conn, shop.tenant.schema_name, now)


async def invariant_holds(db: Database, shop: ProvisionedShop) -> None:
    """Every account equals the sum of its entries and its lots (less debt)."""
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        rows = await conn.fetch(
            """
            SELECT a.customer_ref, a.available, a.pending, a.lifetime_earned, a.debt,
                (SELECT coalesce(sum(available_delta), 0) FROM loyalty_entries e
                    WHERE e.customer_ref = a.customer_ref) AS e_available,
                (SELECT coalesce(sum(pending_delta), 0) FROM loyalty_entries e
                    WHERE e.customer_ref = a.customer_ref) AS e_pending,
                (SELECT coalesce(sum(lifetime_delta), 0) FROM loyalty_entries e
                    WHERE e.customer_ref = a.customer_ref) AS e_lifetime,
                (SELECT coalesce(sum(remaining), 0) FROM loyalty_lots l
                    WHERE l.customer_ref = a.customer_ref AND l.state = 'active') AS l_active,
                (SELECT coalesce(sum(remaining), 0) FROM loyalty_lots l
                    WHERE l.customer_ref = a.customer_ref AND l.state = 'pending') AS l_pending
            FROM loyalty_accounts a
            """
        )
    for row in rows:
        assert row["available"] == row["e_available"] == row["l_active"] - row["debt"], dict(row)
        assert row["pending"] == row["e_pending"] == row["l_pending"], dict(row)
        assert row["lifetime_earned"] == row["e_lifetime"], dict(row)


# --- earning ----------------------------------------------------------------------------------


async def test_a_purchase_earns_pending_points_that_activate_after_the_return_window(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(client, provision)
    key = shop.secret_key
    await send(client, key, purchase("ann", "o-1", 1999, NOW - DAY))
    body = await account(client, key, "ann")
    # 19.99 at one point per euro, rounded down.
    assert (body["available"], body["pending"], body["lifetime_earned"]) == (0, 19, 19)
    [pending] = body["pending_points"]
    assert pending["points"] == 19 and pending["order_id"] == "o-1"
    assert pending["activates_at"] == iso(NOW - DAY + 14 * DAY)

    assert await run_jobs(db, shop, NOW + 12 * DAY) == 0
    assert await run_jobs(db, shop, NOW + 13 * DAY) == 1
    assert await run_jobs(db, shop, NOW + 13 * DAY) == 0
    [earn, activate] = await entries(client, key, "ann")
    assert (earn["kind"], earn["pending_delta"], earn["event_id"] is not None) == ("earn", 19, True)
    assert (activate["kind"], activate["available_after"], activate["pending_after"]) == (
        "activate",
        19,
        0,
    )
    await invariant_holds(db, shop)


async def balance(db: Database, shop: ProvisionedShop, customer_id: str) -> tuple[int, int, int]:
    """(available, pending, lifetime earned) as stored, without settling anything."""
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        row = await conn.fetchrow(
            "SELECT a.available, a.pending, a.lifetime_earned FROM loyalty_accounts a"
            " JOIN identities i ON i.customer_ref = a.customer_ref"
            " WHERE i.kind = 'customer_id' AND i.value = $1",
            customer_id,
        )
    return (row["available"], row["pending"], row["lifetime_earned"]) if row else (0, 0, 0)


async def outbox(db: Database, shop: ProvisionedShop, type_: str) -> list[dict[str, Any]]:
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        rows = await conn.fetch("SELECT payload FROM outbox WHERE type = $1 ORDER BY id", type_)
    return [row["payload"] for row in rows]


@pytest.mark.parametrize(
    ("rounding", "amount", "points"),
    [("floor", 1999, 19), ("half_up", 1950, 20), ("half_up", 1949, 19), ("ceil", 1901, 20)],
)
def test_spend_rounding_is_stated_and_exact(rounding: str, amount: int, points: int) -> None:
    rule = SpendRule(rounding=rounding)  # type: ignore[arg-type]
    assert spend_points(rule, Order(order_id="o", amount=amount, currency="EUR")) == points


def test_shipping_excluded_items_and_other_currencies_do_not_earn() -> None:
    order = Order(
        order_id="o",
        amount=10_000,
        currency="EUR",
        shipping=500,
        items=[
            OrderItem(product_id="gift-card", unit_price=1_000, quantity=2, excluded=True),
            OrderItem(product_id="shoe", unit_price=6_500),
        ],
    )
    assert spend_points(SpendRule(), order) == 75
    everything = SpendRule(exclude_shipping=False, exclude_marked_items=False)
    assert spend_points(everything, order) == 100
    assert spend_points(SpendRule(currency="USD"), order) == 0
    assert spend_points(SpendRule(points=3, per_minor_units=1000), order) == 22


async def test_an_order_earns_once_whatever_is_resent(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(client, provision)
    key = shop.secret_key
    first = purchase("bo", "o-1", 5_000, NOW - DAY, event_id="e-1")
    await send(client, key, first)
    await send(client, key, first)
    # The same order under another event id, in one batch with a copy of itself.
    again = purchase("bo", "o-1", 5_000, NOW - DAY, event_id="e-2")
    await send(client, key, again, purchase("bo", "o-1", 5_000, NOW, event_id="e-3"))
    assert await balance(db, shop, "bo") == (0, 50, 50)
    assert [e["kind"] for e in await entries(client, key, "bo")] == ["earn"]
    await invariant_holds(db, shop)


async def test_actions_earn_spendable_points_and_need_a_known_customer(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(client, provision)
    key = shop.secret_key
    await send(client, key, action("cy", "review_written"), action("cy", "account_created"))
    await send(client, key, action("cy", "page_view"))  # earns nothing
    anonymous = touchpoint(unique("anon"), type="review_written", anonymous_id="device-9")
    await send(client, key, anonymous)
    assert await balance(db, shop, "cy") == (150, 0, 150)
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        assert await conn.fetchval("SELECT count(*) FROM loyalty_accounts") == 1
    events = await outbox(db, shop, "loyalty.points_earned")
    assert sorted(e["points"] for e in events) == [50, 100]
    assert {e["customer_id"] for e in events} == {"cy"}


async def test_a_shop_without_a_programme_earns_nothing(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision(unique("No programme"))
    await send(client, shop.secret_key, purchase("di", "o-1", 5_000, NOW))
    assert await balance(db, shop, "di") == (0, 0, 0)
    body = await account(client, shop.secret_key, "di")
    assert (body["available"], body["pending"], body["tier"]) == (0, 0, None)
    config = await client.get("/v1/config/loyalty", headers=bearer(shop.secret_key))
    assert config.status_code == 200
    assert config.json()["version"] == 0
    assert config.json()["program"]["enabled"] is False


async def test_caps_limit_points_per_customer_per_day(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(client, provision, caps={"per_day": 120}, pending_days=0)
    key = shop.secret_key
    await send(client, key, purchase("ed", "o-1", 10_000, NOW))
    await send(client, key, action("ed", "review_written"))
    await send(client, key, action("ed", "review_written"))
    assert await balance(db, shop, "ed") == (120, 0, 120)


# --- expiry -----------------------------------------------------------------------------------


def test_month_arithmetic_clamps_to_the_months_end() -> None:
    assert add_months(date(2026, 1, 31), 1) == date(2026, 2, 28)
    assert add_months(date(2028, 1, 31), 1) == date(2028, 2, 29)
    assert add_months(date(2026, 11, 30), 3) == date(2027, 2, 28)
    assert add_months(date(2026, 3, 15), 12) == date(2027, 3, 15)


def test_expiry_is_the_midnight_after_the_last_day_in_the_programmes_zone() -> None:
    earned = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
    utc = Program(expiry=Expiry(months=1))
    assert expires_at(utc, earned) == datetime(2026, 3, 1, tzinfo=UTC)
    month_end = Program(expiry=Expiry(months=1, end_of_month=True))
    assert expires_at(month_end, datetime(2026, 1, 10, tzinfo=UTC)) == datetime(
        2026, 3, 1, tzinfo=UTC
    )
    amsterdam = Program(time_zone="Europe/Amsterdam", expiry=Expiry(months=1))
    # 23:30 UTC on 31 January is already 1 February in Amsterdam.
    late = datetime(2026, 1, 31, 23, 30, tzinfo=UTC)
    assert expires_at(amsterdam, late) == datetime(2026, 3, 1, 23, 0, tzinfo=UTC)
    assert expires_at(Program(expiry=Expiry(months=None)), earned) is None


async def test_points_expire_at_the_first_second_after_their_last_day(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(
        client, provision, time_zone="Europe/Amsterdam", expiry={"months": 1}, pending_days=0
    )
    key = shop.secret_key
    earned = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)
    await send(client, key, purchase("fay", "o-1", 1_000, earned))
    await send(client, key, action("fay", "review_written", earned + 20 * DAY))
    last_second = datetime(2026, 2, 15, 22, 59, 59, tzinfo=UTC)  # 23:59:59 in Amsterdam
    await run_jobs(db, shop, last_second)
    assert await balance(db, shop, "fay") == (60, 0, 60)
    await run_jobs(db, shop, last_second + timedelta(seconds=1))
    assert await balance(db, shop, "fay") == (50, 0, 60)
    expired = [e for e in await entries(client, key, "fay") if e["kind"] == "expire"]
    assert [(e["available_delta"], e["occurred_at"]) for e in expired] == [
        (-10, "2026-02-15T23:00:00Z")
    ]
    await run_jobs(db, shop, last_second + DAY)
    assert len([e for e in await entries(client, key, "fay") if e["kind"] == "expire"]) == 1
    await invariant_holds(db, shop)


async def test_spending_takes_the_earliest_expiring_points_and_expiry_takes_only_the_rest(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(client, provision, expiry={"months": 1}, pending_days=0)
    key = shop.secret_key
    await send(client, key, action("gus", "review_written", NOW - 20 * DAY))  # expires first
    await send(client, key, action("gus", "account_created", NOW - 2 * DAY))
    assert (await redeem(client, key, "gus", 70)).status_code == 201
    # 50 from the older lot, 20 from the newer: 80 left, all in the newer lot.
    await run_jobs(db, shop, NOW + 15 * DAY)
    assert await balance(db, shop, "gus") == (80, 0, 150)
    await run_jobs(db, shop, NOW + 40 * DAY)
    assert await balance(db, shop, "gus") == (0, 0, 150)
    await invariant_holds(db, shop)


async def test_an_expiry_warning_is_written_once_per_lot(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(
        client, provision, expiry={"months": 2, "notify_days_before": 10}, pending_days=0
    )
    await send(client, shop.secret_key, action("hal", "review_written", NOW))
    await run_jobs(db, shop, NOW + 30 * DAY)
    assert await outbox(db, shop, "loyalty.points_expiring") == []
    await run_jobs(db, shop, NOW + 55 * DAY)
    await run_jobs(db, shop, NOW + 56 * DAY)
    [warning] = await outbox(db, shop, "loyalty.points_expiring")
    assert (warning["customer_id"], warning["points"]) == ("hal", 50)


# --- refunds ----------------------------------------------------------------------------------


async def test_a_partial_refund_reverses_its_share_and_the_rest_reverses_the_rest(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(client, provision)
    key = shop.secret_key
    await send(client, key, purchase("ida", "o-1", 10_001, NOW - 2 * DAY))
    assert await balance(db, shop, "ida") == (0, 100, 100)
    await send(client, key, refund("ida", "o-1", 3_333, NOW - DAY))
    # 3,333 of 10,001 is 33.3 % of 100 points: 33 reversed (rounded down).
    assert await balance(db, shop, "ida") == (0, 67, 67)
    await send(client, key, refund("ida", "o-1", 6_668, NOW))
    assert await balance(db, shop, "ida") == (0, 0, 0)
    await send(client, key, refund("ida", "o-1", 500, NOW))  # more than was paid: nothing left
    reversals = [e for e in await entries(client, key, "ida") if e["kind"] == "reverse"]
    assert [(e["pending_delta"], e["lifetime_delta"]) for e in reversals] == [
        (-33, -33),
        (-67, -67),
    ]
    assert all(e["order_id"] == "o-1" for e in reversals)
    await invariant_holds(db, shop)


@pytest.mark.parametrize(
    ("policy", "after_refund", "after_next_review"),
    [
        ("pending_only", (20, 0, 100), (70, 0, 150)),
        ("within_balance", (0, 0, 80), (50, 0, 130)),
        ("allow_negative", (-80, 0, 0), (-30, 0, 50)),
    ],
)
async def test_a_refund_of_spent_points_follows_the_programmes_policy(
    client: httpx.AsyncClient,
    provision: ProvisionFactory,
    db: Database,
    policy: str,
    after_refund: tuple[int, int, int],
    after_next_review: tuple[int, int, int],
) -> None:
    shop = await shop_with(client, provision, refund_policy=policy, pending_days=0)
    key = shop.secret_key
    await send(client, key, purchase("jo", "o-1", 10_000, NOW - DAY))
    assert (await redeem(client, key, "jo", 80)).status_code == 201
    await send(client, key, refund("jo", "o-1", 10_000, NOW))
    assert await balance(db, shop, "jo") == after_refund
    # Later points pay off a negative balance first.
    await send(client, key, action("jo", "review_written"))
    assert await balance(db, shop, "jo") == after_next_review
    await invariant_holds(db, shop)


async def test_points_that_paid_for_a_refunded_order_come_back_exactly_once(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(client, provision)
    key = shop.secret_key
    await send(client, key, action("kim", "page_view", NOW - 2 * DAY))
    assert (await adjust(client, key, "kim", 500)).status_code == 201
    paid = await redeem(client, key, "kim", 300, reference="o-9")
    assert paid.status_code == 201, paid.text
    await send(client, key, purchase("kim", "o-9", 5_000, NOW - DAY))
    assert await balance(db, shop, "kim") == (200, 50, 50)
    await send(client, key, refund("kim", "o-9", 2_500, NOW))
    assert await balance(db, shop, "kim") == (350, 25, 25)
    await send(client, key, refund("kim", "o-9", 2_500, NOW))
    await send(client, key, refund("kim", "o-9", 2_500, NOW))
    assert await balance(db, shop, "kim") == (500, 0, 0)
    given_back = [
        e for e in await entries(client, key, "kim") if e["kind"] == "reverse" and e["points"] > 0
    ]
    assert [e["available_delta"] for e in given_back] == [150, 150]
    assert {e["redemption_id"] for e in given_back} == {paid.json()["id"]}
    await invariant_holds(db, shop)


# --- tiers ------------------------------------------------------------------------------------

TIERS = {
    "levels": [
        {"name": "bronze", "threshold": 0},
        {"name": "silver", "threshold": 100, "multiplier_percent": 150},
        {"name": "gold", "threshold": 400, "multiplier_percent": 200},
    ],
    "window_days": 365,
    "review_after_days": 365,
}


async def test_tiers_go_up_at_once_and_multiply_later_earnings(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(client, provision, tiers=TIERS, pending_days=0)
    key = shop.secret_key
    await send(client, key, action("lou", "review_written"))
    assert (await account(client, key, "lou"))["tier"]["name"] == "bronze"
    await send(client, key, purchase("lou", "o-1", 10_000, NOW))
    body = await account(client, key, "lou")
    assert body["tier"] == {
        "name": "silver",
        "since": body["tier"]["since"],
        "multiplier_percent": 150,
        "review_at": body["tier"]["review_at"],
        "basis": "points_earned",
        "value": 150,
        "next_tier": "gold",
        "next_threshold": 400,
        "remaining_to_next": 250,
    }
    await send(client, key, purchase("lou", "o-2", 10_000, NOW))
    assert await balance(db, shop, "lou") == (300, 0, 300)  # 150 = 100 x 150 %
    # Spending never lowers a tier.
    assert (await redeem(client, key, "lou", 300)).status_code == 201
    assert (await account(client, key, "lou"))["tier"]["name"] == "silver"
    changes = await outbox(db, shop, "loyalty.tier_changed")
    assert [(c["from"], c["to"]) for c in changes] == [(None, "bronze"), ("bronze", "silver")]


@pytest.mark.parametrize(
    ("downgrade", "tiers_after_reviews"),
    [("one_step", ["silver", "bronze"]), ("to_qualified", ["bronze", "bronze"])],
)
async def test_tiers_go_down_only_at_review(
    client: httpx.AsyncClient,
    provision: ProvisionFactory,
    db: Database,
    downgrade: str,
    tiers_after_reviews: list[str],
) -> None:
    shop = await shop_with(
        client, provision, tiers={**TIERS, "downgrade": downgrade}, pending_days=0
    )
    key = shop.secret_key
    await send(client, key, purchase("max", "o-1", 50_000, NOW))
    assert (await account(client, key, "max"))["tier"]["name"] == "gold"
    # Before the review date nothing changes, whatever the window says.
    seen = []
    for days in (364, 366, 2 * 366):
        await run_jobs(db, shop, NOW + days * DAY)
        async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
            seen.append(await conn.fetchval("SELECT tier FROM loyalty_accounts"))
    assert seen == ["gold", *tiers_after_reviews]


async def test_a_tier_can_move_the_journey_stage_on_the_same_touchpoint(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(client, provision, tiers=TIERS, pending_days=0)
    key = shop.secret_key
    rules = {
        "stages": {
            "acquisition": {"orders": {"at_least": 1}},
            "loyalty": {"loyalty_tier": {"in": ["gold"]}},
        }
    }
    saved = await client.put("/v1/config/journey", json=rules, headers=bearer(key))
    assert saved.status_code == 200, saved.text
    await send(client, key, purchase("ned", "o-1", 10_000, NOW))
    journey = await client.get("/v1/customers/ned/journey", headers=bearer(key))
    assert journey.json()["stage"] == "acquisition"
    await send(client, key, purchase("ned", "o-2", 40_000, NOW))
    journey = await client.get("/v1/customers/ned/journey", headers=bearer(key))
    assert journey.json()["stage"] == "loyalty"


# --- the programme ----------------------------------------------------------------------------


def error_paths(body: dict[str, Any]) -> set[str]:
    return {error["path"] for error in body["errors"]}


@pytest.mark.parametrize(
    ("program", "paths"),
    [
        ({"time_zone": "Mars/Olympus"}, {"$.time_zone"}),
        (
            {"actions": {"purchase": 10, "hug": 5, "x_birthday_card": 5}},
            {
                "$.actions.purchase",
                "$.actions.hug",
            },
        ),
        (
            {
                "tiers": {
                    "levels": [
                        {"name": "gold", "threshold": 10},
                        {"name": "silver", "threshold": 5},
                    ]
                }
            },
            {"$.tiers.levels[1].threshold"},
        ),
        (
            {
                "tiers": {
                    "levels": [{"name": "gold", "threshold": 1}, {"name": "gold", "threshold": 5}]
                }
            },
            {"$.tiers.levels[1].name"},
        ),
        ({"spend": {"per_minor_units": 0}}, {"$.spend.per_minor_units"}),
        ({"refund_policy": "never"}, {"$.refund_policy"}),
        ({"pending_days": -1}, {"$.pending_days"}),
        ({"expiry": {"months": 0}}, {"$.expiry.months"}),
        ({"colour": "red"}, {"$"}),
    ],
)
async def test_a_bad_programme_names_the_failing_fields_and_saves_nothing(
    client: httpx.AsyncClient,
    provision: ProvisionFactory,
    program: dict[str, Any],
    paths: set[str],
) -> None:
    shop = await provision(unique("Bad programme"))
    response = await client.put("/v1/config/loyalty", json=program, headers=bearer(shop.secret_key))
    body = assert_problem(response, 422, "validation")
    assert error_paths(body) == paths
    current = await client.get("/v1/config/loyalty", headers=bearer(shop.secret_key))
    assert current.json()["version"] == 0


async def test_programme_versions_and_who_may_change_them(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await shop_with(client, provision)
    key = shop.secret_key
    saved = await client.get("/v1/config/loyalty", headers=bearer(key))
    assert saved.json()["version"] == 1
    assert saved.json()["program"]["actions"] == PROGRAM["actions"]
    assert saved.json()["program"]["spend"]["rounding"] == "floor"
    again = await client.put(
        "/v1/config/loyalty",
        json={"pending_days": 0},
        headers={**bearer(key), "Idempotency-Key": "p-1"},
    )
    replay = await client.put(
        "/v1/config/loyalty",
        json={"pending_days": 0},
        headers={**bearer(key), "Idempotency-Key": "p-1"},
    )
    assert again.json()["version"] == replay.json()["version"] == 2
    assert replay.headers["idempotency-replayed"] == "true"
    reader = await restricted_key(client, shop, "loyalty:read")
    denied = await client.put("/v1/config/loyalty", json={}, headers=bearer(reader))
    assert_problem(denied, 403, "insufficient-scope")
    assert (await client.get("/v1/config/loyalty", headers=bearer(reader))).status_code == 200
    assert_problem(await client.get("/v1/config/loyalty"), 401, "unauthenticated")
    publishable = await client.get("/v1/config/loyalty", headers=bearer(shop.publishable_key))
    assert publishable.status_code == 403
    malformed = await client.put("/v1/config/loyalty", content=b"{not json", headers=bearer(key))
    assert_problem(malformed, 400, "malformed-body")


# --- who may do what, and bad input -----------------------------------------------------------


async def restricted_key(client: httpx.AsyncClient, shop: ProvisionedShop, *scopes: str) -> str:
    response = await client.post(
        "/v1/api-keys",
        json={"kind": "restricted", "scopes": list(scopes)},
        headers=bearer(shop.secret_key),
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


async def test_customer_loyalty_endpoints_check_credentials_and_scopes(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await shop_with(client, provision)
    await send(client, shop.secret_key, action("oli", "review_written"))
    reader = await restricted_key(client, shop, "loyalty:read")
    writer = await restricted_key(client, shop, "loyalty:write")
    reads = [loyalty_url("oli"), loyalty_url("oli", "/transactions")]
    for url in reads:
        assert_problem(await client.get(url), 401, "unauthenticated")
        assert_problem(await client.get(url, headers=bearer(writer)), 403, "insufficient-scope")
        assert (await client.get(url, headers=bearer(reader))).status_code == 200
        assert (await client.get(url, headers=bearer(shop.publishable_key))).status_code == 403
    for suffix, body in (
        ("/redemptions", {"points": 1, "reason": "r"}),
        ("/adjustments", {"points": 1, "reason": "r"}),
    ):
        url = loyalty_url("oli", suffix)
        assert_problem(await client.post(url, json=body), 401, "unauthenticated")
        denied = await client.post(url, json=body, headers=bearer(reader))
        assert_problem(denied, 403, "insufficient-scope")
        assert (await client.post(url, json=body, headers=bearer(writer))).status_code == 201
    analytics = "/v1/analytics/loyalty"
    assert_problem(await client.get(analytics, headers=bearer(reader)), 403, "insufficient-scope")


@pytest.mark.parametrize(
    ("suffix", "body", "path"),
    [
        ("/redemptions", {"points": 0, "reason": "r"}, "$.points"),
        ("/redemptions", {"points": -5, "reason": "r"}, "$.points"),
        ("/redemptions", {"points": 5, "reason": "   "}, "$.reason"),
        ("/redemptions", {"points": 5}, "$"),
        ("/redemptions", {"points": 5.5, "reason": "r"}, "$.points"),
        ("/redemptions", {"points": 5, "reason": "r", "extra": 1}, "$"),
        ("/adjustments", {"points": 0, "reason": "r"}, "$.points"),
        ("/adjustments", {"points": 5, "reason": ""}, "$.reason"),
        ("/adjustments", {"points": 10**10, "reason": "r"}, "$.points"),
    ],
)
async def test_bad_ledger_writes_are_422s_naming_the_field(
    client: httpx.AsyncClient,
    provision: ProvisionFactory,
    db: Database,
    suffix: str,
    body: dict[str, Any],
    path: str,
) -> None:
    shop = await shop_with(client, provision)
    await send(client, shop.secret_key, action("pat", "review_written"))
    response = await client.post(
        loyalty_url("pat", suffix), json=body, headers=bearer(shop.secret_key)
    )
    problem = assert_problem(response, 422, "validation")
    assert path in error_paths(problem) or path == "$", problem
    assert await balance(db, shop, "pat") == (50, 0, 50)


async def test_spending_more_than_is_available_is_a_409_that_writes_nothing(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(client, provision)
    key = shop.secret_key
    await send(client, key, action("quin", "review_written"), purchase("quin", "o-1", 9_000, NOW))
    # 50 available, 90 pending: pending points cannot be spent.
    short = await redeem(client, key, "quin", 51)
    problem = assert_problem(short, 409, "insufficient-points")
    assert "50 available" in str(problem["detail"])
    assert_problem(await adjust(client, key, "quin", -51), 409, "insufficient-points")
    assert await balance(db, shop, "quin") == (50, 90, 140)
    assert len(await entries(client, key, "quin")) == 2
    unknown = await redeem(client, key, "nobody", 1)
    assert_problem(unknown, 404, "not-found")


async def test_redemptions_and_adjustments_are_recorded_with_their_actor(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(client, provision)
    key = shop.secret_key
    await send(client, key, action("rae", "account_created"))
    spent = await redeem(client, key, "rae", 40, reason="free coffee")
    assert spent.status_code == 201
    body = spent.json()
    assert (body["object"], body["points"], body["available"]) == ("loyalty_redemption", 40, 60)
    assert body["id"].startswith("red_")
    removed = await adjust(client, key, "rae", -10, reason="duplicate account")
    assert removed.status_code == 201
    assert (removed.json()["kind"], removed.json()["available_after"]) == ("adjust", 50)
    added = await adjust(client, key, "rae", 25, reason="apology")
    assert added.json()["available_after"] == 75
    history = await entries(client, key, "rae")
    assert [(e["kind"], e["points"]) for e in history] == [
        ("earn", 100),
        ("redeem", -40),
        ("adjust", -10),
        ("adjust", 25),
    ]
    assert history[1]["redemption_id"] == body["id"]
    assert history[1]["actor"] == history[2]["actor"] and history[1]["actor"].startswith("key:")
    assert history[3]["reason"] == "apology"
    # Adjustments are not earnings.
    assert await balance(db, shop, "rae") == (75, 0, 100)


async def test_the_ledger_pages_newest_first(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await shop_with(client, provision)
    key = shop.secret_key
    await send(client, key, *(action("sam", "review_written") for _ in range(5)))
    first = await client.get(
        loyalty_url("sam", "/transactions"), params={"limit": 2}, headers=bearer(key)
    )
    page = first.json()
    assert page["has_more"] is True and len(page["data"]) == 2
    after = page["data"][-1]["id"]
    rest = await client.get(
        loyalty_url("sam", "/transactions"),
        params={"limit": 10, "starting_after": after},
        headers=bearer(key),
    )
    ids = [e["id"] for e in page["data"]] + [e["id"] for e in rest.json()["data"]]
    assert ids == sorted(ids, reverse=True) and len(ids) == 5
    assert rest.json()["has_more"] is False
    bad = await client.get(
        loyalty_url("sam", "/transactions"), params={"limit": 0}, headers=bearer(key)
    )
    assert_problem(bad, 422, "validation")


async def test_shops_never_see_or_spend_each_others_points(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    one = await shop_with(client, provision)
    other = await shop_with(client, provision)
    await send(client, one.secret_key, action("tess", "account_created"))
    assert_problem(
        await client.get(loyalty_url("tess"), headers=bearer(other.secret_key)), 404, "not-found"
    )
    assert_problem(await redeem(client, other.secret_key, "tess", 10), 404, "not-found")
    await send(client, other.secret_key, action("tess", "review_written"))
    assert (await account(client, other.secret_key, "tess"))["available"] == 50
    assert (await redeem(client, other.secret_key, "tess", 50)).status_code == 201
    assert await balance(db, one, "tess") == (100, 0, 100)
    figures = await client.get("/v1/analytics/loyalty", headers=bearer(one.secret_key))
    assert figures.json()["period"]["redeemed"] == 0


# --- analytics, merges, erasure ---------------------------------------------------------------


async def test_loyalty_analytics_add_up_exactly(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(client, provision, tiers=TIERS, expiry={"months": 1})
    key = shop.secret_key
    start = NOW - 10 * DAY
    await send(client, key, action("uma", "account_created", start))  # 100 now: silver
    await send(client, key, purchase("uma", "o-1", 20_000, start + DAY))  # 200 x 150 % pending
    await send(client, key, refund("uma", "o-1", 5_000, start + 2 * DAY))  # a quarter reversed
    await send(client, key, action("vic", "review_written", start))  # 50 now
    assert (await redeem(client, key, "uma", 30)).status_code == 201
    assert (await adjust(client, key, "vic", -20)).status_code == 201
    assert (await adjust(client, key, "vic", 5)).status_code == 201
    await run_jobs(db, shop, NOW + 40 * DAY)  # activates 150, expires what is left
    response = await client.get(
        "/v1/analytics/loyalty",
        params={"from": iso(start - DAY), "to": iso(NOW + 50 * DAY)},
        headers=bearer(key),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["period"] == {
        "issued": 100 + 300 + 50,
        "redeemed": 30,
        "expired": (100 - 30) + (300 - 75) + (50 - 20 + 5),
        "reversed": 75,
        "given_back": 0,
        "adjusted_up": 5,
        "adjusted_down": 20,
    }
    assert (body["outstanding_available"], body["outstanding_pending"]) == (0, 0)
    # 400 earned reached gold; the refund does not lower it before the review.
    assert body["tiers"] == [{"tier": "bronze", "customers": 1}, {"tier": "gold", "customers": 1}]
    await invariant_holds(db, shop)
    bad = await client.get(
        "/v1/analytics/loyalty", params={"from": "yesterday"}, headers=bearer(key)
    )
    assert_problem(bad, 422, "validation")


async def test_a_merge_moves_the_points_and_keeps_every_sum(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(client, provision, pending_days=0)
    key = shop.secret_key
    await send(client, key, action("wes", "account_created"), action("wes-old", "review_written"))
    assert (await redeem(client, key, "wes-old", 20)).status_code == 201
    merged = await client.post(
        "/v1/customers/wes/merge", json={"customer_id": "wes-old"}, headers=bearer(key)
    )
    assert merged.status_code == 200, merged.text
    body = await account(client, key, "wes")
    assert (body["available"], body["lifetime_earned"]) == (130, 150)
    assert len(await entries(client, key, "wes")) == 3
    assert (await redeem(client, key, "wes-old", 130)).status_code == 201  # the same customer now
    await invariant_holds(db, shop)


async def test_export_includes_the_ledger_and_erasure_removes_it(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(client, provision)
    key = shop.secret_key
    await send(client, key, action("xan", "account_created"), purchase("xan", "o-1", 900, NOW))
    exported = await client.get("/v1/customers/xan/export", headers=bearer(key))
    assert [e["kind"] for e in exported.json()["loyalty_transactions"]] == ["earn", "earn"]
    erased = await client.delete("/v1/customers/xan", headers=bearer(key))
    assert erased.status_code == 200, erased.text
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        for table in ("loyalty_accounts", "loyalty_entries", "loyalty_lots"):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
        # Only the erasure's own notice is left in the outbox; the points events went.
        assert await conn.fetchval("SELECT array_agg(type) FROM outbox") == ["customer.deleted"]


async def test_the_same_order_sent_twice_at_once_earns_once(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with(client, provision)
    key = shop.secret_key
    await send(client, key, action("zed", "page_view"))
    copies = [purchase("zed", "o-race", 5_000, NOW, event_id=f"race-{i}") for i in range(6)]
    await asyncio.gather(*(send(client, key, copy) for copy in copies))
    assert await balance(db, shop, "zed") == (0, 50, 50)
    await invariant_holds(db, shop)
