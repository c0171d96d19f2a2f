"""Loyalty end to end: the programme, earning on ingest, the ledger's operations over HTTP, the
jobs, tiers and refunds, against the real database. Every test provisions its own shops.

Time is passed in, never slept: touchpoints carry their own ``occurred_at`` and the jobs and
ledger operations take ``now``.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import httpx

from api.db import Database, tenant_tx
from api.loyalty import jobs
from api.tenants.lifecycle import ProvisionedShop
from tests.conftest import ProvisionFactory, bearer
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
