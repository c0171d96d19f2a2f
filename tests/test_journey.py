"""Journey stages end to end: touchpoints through ingest, the journey view, the explicit stage move
and the drift job, against the real database. Every test provisions its own shops.

Drift is about time: a purchase becomes old either because the drift job is given a later ``now``
or because :func:`travel_back` moves a profile's whole past (touchpoints, aggregates, transitions)
back by some days, as if it had all happened then. Nothing sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from litestar import Litestar

from api.customers.profiles import resolve_customer_ref
from api.db import Database, TenantConn, tenant_tx
from api.journey import drift, history
from api.journey.drift import apply_drift, apply_drift_all_shops
from api.journey.routes import journey_routes
from api.tenants import fanout
from api.tenants.lifecycle import ProvisionedShop, suspend_tenant
from tests.conftest import ProvisionFactory, bearer, http_client, make_app
from tests.test_http import assert_problem
from tests.test_touchpoints import NOW, iso, send, touchpoint

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


def journey_url(customer_id: str, suffix: str = "") -> str:
    return f"/v1/customers/{customer_id}/journey{suffix}"


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- the app with this package's routes ------------------------------------------------------


@pytest.fixture(scope="module")
def journey_app(db: Database) -> Litestar:
    """The app with the journey routes, whether or not ``create_app`` registers them already."""
    app = make_app(db)
    registered = {route.path for route in app.routes}
    for handler in journey_routes:
        if not handler.paths & registered:
            app.register(handler)
    return app


@pytest.fixture
async def api(journey_app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(journey_app) as client:
        yield client


# --- helpers ---------------------------------------------------------------------------------


def event(
    customer_id: str, event_id: str, type_: str, at: datetime, channel: str = "web"
) -> dict[str, Any]:
    """A touchpoint of a known customer; a purchase carries an order."""
    fields: dict[str, Any] = {
        "type": type_,
        "channel": channel,
        "occurred_at": iso(at),
        "customer_id": customer_id,
        "anonymous_id": None,
    }
    if type_ == "purchase":
        fields["order"] = {"order_id": f"order-{event_id}", "amount": 2500, "currency": "EUR"}
    return touchpoint(event_id, **fields)


async def journey(api: httpx.AsyncClient, key: str, customer_id: str) -> dict[str, Any]:
    response = await api.get(journey_url(customer_id), headers=bearer(key))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["object"] == "customer_journey"
    return body


async def move(
    api: httpx.AsyncClient,
    key: str,
    customer_id: str,
    stage: str,
    reason: str,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return await api.post(
        journey_url(customer_id, "/stage"),
        json={"stage": stage, "reason": reason},
        headers={**bearer(key), **(headers or {})},
    )


async def ref_of(db: Database, shop: ProvisionedShop, customer_id: str) -> int:
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        ref = await resolve_customer_ref(conn, customer_id)
    assert ref is not None
    return ref


async def stored_transitions(
    db: Database, shop: ProvisionedShop, customer_id: str
) -> list[dict[str, Any]]:
    ref = await ref_of(db, shop, customer_id)
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        rows = await conn.fetch(
            "SELECT from_stage, to_stage, occurred_at, cause, touchpoint_event_id, actor, reason"
            " FROM stage_transitions WHERE customer_ref = $1 ORDER BY occurred_at, id",
            ref,
        )
    return [dict(row) for row in rows]


async def travel_back(db: Database, shop: ProvisionedShop, customer_id: str, days: int) -> None:
    """Move everything that happened to the customer ``days`` earlier."""
    ref = await ref_of(db, shop, customer_id)
    shift = timedelta(days=days)
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        await conn.execute(
            "UPDATE customers SET first_seen_at = first_seen_at - $2::interval,"
            " last_seen_at = last_seen_at - $2::interval,"
            " last_purchase_at = last_purchase_at - $2::interval,"
            " stage_since = stage_since - $2::interval WHERE id = $1",
            ref,
            shift,
        )
        await conn.execute(
            "UPDATE touchpoints SET occurred_at = occurred_at - $2::interval,"
            " received_at = received_at - $2::interval WHERE customer_ref = $1",
            ref,
            shift,
        )
        await conn.execute(
            "UPDATE stage_transitions SET occurred_at = occurred_at - $2::interval"
            " WHERE customer_ref = $1",
            ref,
            shift,
        )


async def run_drift(db: Database, shop: ProvisionedShop, now: datetime | None = None) -> int:
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        return await apply_drift(conn, shop.tenant.schema_name, now)


async def buyer(
    api: httpx.AsyncClient, shop: ProvisionedShop, customer_id: str, purchases: int = 1
) -> None:
    """A customer who viewed a page, then bought ``purchases`` times in the last hours."""
    items = [event(customer_id, f"{customer_id}-view", "page_view", NOW - 10 * HOUR)]
    items += [
        event(customer_id, f"{customer_id}-buy-{n}", "purchase", NOW - (5 - n) * HOUR)
        for n in range(purchases)
    ]
    await send(api, shop.secret_key, *items)


async def secret_actor(api: httpx.AsyncClient, shop: ProvisionedShop) -> str:
    """The credential id under which the shop's secret key acts."""
    response = await api.get("/v1/api-keys", headers=bearer(shop.secret_key))
    assert response.status_code == 200, response.text
    [key_id] = [k["id"] for k in response.json()["data"] if k["kind"] == "secret"]
    return f"key:{key_id}"


async def restricted_key(api: httpx.AsyncClient, shop: ProvisionedShop, *scopes: str) -> str:
    response = await api.post(
        "/v1/api-keys",
        json={"kind": "restricted", "scopes": list(scopes)},
        headers=bearer(shop.secret_key),
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


# --- forward on ingest -----------------------------------------------------------------------


async def test_default_rules_take_a_customer_from_awareness_to_advocacy(
    api: httpx.AsyncClient, db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Journey shop"))
    key, customer = shop.secret_key, "walker"
    steps = [
        ("w-1", "page_view", "awareness"),
        ("w-2", "product_view", "consideration"),
        ("w-3", "purchase", "acquisition"),
        ("w-4", "purchase", "service"),
        ("w-5", "purchase", "loyalty"),
        ("w-6", "review_written", "advocacy"),
    ]
    previous = "awareness"
    for minutes, (event_id, type_, expected) in zip(range(60, 0, -10), steps, strict=True):
        at = NOW - timedelta(minutes=minutes)
        await send(api, key, event(customer, event_id, type_, at))
        body = await journey(api, key, customer)
        assert (body["stage"], body["reached_stage"]) == (expected, expected), event_id
        assert parse(body["stage_since"]) == at
        if expected == "awareness":
            assert body["history"] == []
            continue
        assert body["history"][-1] == {
            "from_stage": previous,
            "to_stage": expected,
            "occurred_at": body["history"][-1]["occurred_at"],
            "cause": "touchpoint",
            "touchpoint_id": event_id,
            "actor": None,
            "reason": None,
        }
        assert parse(body["history"][-1]["occurred_at"]) == at
        previous = expected

    stored = await stored_transitions(db, shop, customer)
    assert [(t["from_stage"], t["to_stage"]) for t in stored] == [
        ("awareness", "consideration"),
        ("consideration", "acquisition"),
        ("acquisition", "service"),
        ("service", "loyalty"),
        ("loyalty", "advocacy"),
    ]
    assert [t["touchpoint_event_id"] for t in stored] == ["w-2", "w-3", "w-4", "w-5", "w-6"]
    assert {t["cause"] for t in stored} == {"touchpoint"}
    assert [t["occurred_at"] for t in stored] == [
        NOW - timedelta(minutes=m) for m in (50, 40, 30, 20, 10)
    ]


async def test_a_late_page_view_never_demotes_a_purchaser(
    api: httpx.AsyncClient, db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Late shop"))
    key, customer = shop.secret_key, "late"
    await send(
        api,
        key,
        event(customer, "l-1", "page_view", NOW - 2 * HOUR),
        event(customer, "l-2", "purchase", NOW - HOUR),
    )
    before = await journey(api, key, customer)
    assert before["stage"] == "acquisition"

    await send(api, key, event(customer, "l-3", "page_view", NOW - 3 * DAY, "mobile_app"))
    after = await journey(api, key, customer)
    assert (after["stage"], after["reached_stage"]) == ("acquisition", "acquisition")
    assert after["history"] == before["history"]
    assert after["stage_since"] == before["stage_since"]
    assert len(await stored_transitions(db, shop, customer)) == 1
    # It did happen before the purchase: it counts there, in the awareness it belongs to.
    assert after["touchpoints_before_first_purchase"] == 2
    assert after["channels_by_stage"]["awareness"] == ["mobile_app", "web"]


# --- drift -----------------------------------------------------------------------------------


async def test_the_drift_job_moves_idle_buyers_once_and_a_purchase_brings_them_back(
    api: httpx.AsyncClient, db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Drift shop"))
    key = shop.secret_key
    await buyer(api, shop, "idle", purchases=3)
    await buyer(api, shop, "recent")
    await send(api, key, event("browser", "b-1", "product_view", NOW - HOUR))
    assert (await journey(api, key, "idle"))["stage"] == "loyalty"
    await travel_back(db, shop, "idle", 100)
    await travel_back(db, shop, "browser", 300)

    assert await run_drift(db, shop) == 1
    idle = await journey(api, key, "idle")
    assert (idle["stage"], idle["reached_stage"]) == ("at_risk", "loyalty")
    drifted = idle["history"][-1]
    assert {k: v for k, v in drifted.items() if k != "occurred_at"} == {
        "from_stage": "loyalty",
        "to_stage": "at_risk",
        "cause": "drift",
        "touchpoint_id": None,
        "actor": None,
        "reason": "no purchase in 90 days",
    }
    assert parse(drifted["occurred_at"]) == parse(idle["stage_since"])
    assert datetime.now(UTC) - parse(drifted["occurred_at"]) < HOUR

    count = len(await stored_transitions(db, shop, "idle"))
    assert await run_drift(db, shop) == 0
    assert len(await stored_transitions(db, shop, "idle")) == count

    await travel_back(db, shop, "idle", 100)
    assert await run_drift(db, shop) == 1
    idle = await journey(api, key, "idle")
    assert (idle["stage"], idle["reached_stage"]) == ("lapsed", "loyalty")
    assert idle["history"][-1]["from_stage"] == "at_risk"
    assert idle["history"][-1]["reason"] == "no purchase in 180 days"
    assert await run_drift(db, shop) == 0
    assert len(await stored_transitions(db, shop, "idle")) == count + 1

    # Those who never bought, or bought lately, are not touched.
    assert (await journey(api, key, "browser"))["stage"] == "consideration"
    assert (await journey(api, key, "recent"))["stage"] == "acquisition"
    assert len(await stored_transitions(db, shop, "recent")) == 1

    # A new purchase ends the drift: back to the furthest stage reached.
    await send(api, key, event("idle", "idle-back", "purchase", NOW - timedelta(minutes=1)))
    idle = await journey(api, key, "idle")
    assert (idle["stage"], idle["reached_stage"]) == ("loyalty", "loyalty")
    back = idle["history"][-1]
    assert (back["from_stage"], back["to_stage"]) == ("lapsed", "loyalty")
    assert (back["cause"], back["touchpoint_id"]) == ("touchpoint", "idle-back")
    assert await run_drift(db, shop) == 0


async def test_drift_is_dated_at_the_time_it_is_run_for(
    api: httpx.AsyncClient, db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Clock shop"))
    await buyer(api, shop, "fixed")
    later = NOW + timedelta(days=100)
    assert await run_drift(db, shop, now=NOW + timedelta(days=89)) == 0
    assert await run_drift(db, shop, now=later) == 1
    assert await run_drift(db, shop, now=later) == 0
    [*_, drifted] = await stored_transitions(db, shop, "fixed")
    assert (drifted["to_stage"], drifted["occurred_at"]) == ("at_risk", later)
    lapsed_at = NOW + timedelta(days=181)
    assert await run_drift(db, shop, now=lapsed_at) == 1
    assert (await journey(api, shop.secret_key, "fixed"))["stage"] == "lapsed"
    assert (await stored_transitions(db, shop, "fixed"))[-1]["occurred_at"] == lapsed_at


async def test_two_drift_runs_at_once_move_each_customer_once(
    api: httpx.AsyncClient, db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Race shop"))
    customers = [f"racer-{n}" for n in range(3)]
    for customer in customers:
        await buyer(api, shop, customer)
        await travel_back(db, shop, customer, 100)

    async def one_run() -> int:
        return await run_drift(db, shop)

    assert sum(await asyncio.gather(one_run(), one_run())) == 3
    for customer in customers:
        stored = await stored_transitions(db, shop, customer)
        assert [t["cause"] for t in stored] == ["touchpoint", "drift"], customer
        assert (await journey(api, shop.secret_key, customer))["stage"] == "at_risk"
    assert await run_drift(db, shop) == 0


async def test_a_late_purchase_drifts_on_ingest_and_a_new_one_returns_to_the_reached_stage(
    api: httpx.AsyncClient, db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Returning shop"))
    key, customer = shop.secret_key, "returner"
    await send(
        api,
        key,
        event(customer, "r-1", "purchase", NOW - 100 * DAY),
        event(customer, "r-2", "review_written", NOW - 99 * DAY),
    )
    body = await journey(api, key, customer)
    assert (body["stage"], body["reached_stage"]) == ("at_risk", "advocacy")
    assert body["history"][-1]["touchpoint_id"] == "r-2"
    assert await run_drift(db, shop) == 0

    await send(api, key, event(customer, "r-3", "purchase", NOW - timedelta(minutes=1)))
    body = await journey(api, key, customer)
    # Two orders alone earn service; the customer had got as far as advocacy.
    assert (body["stage"], body["reached_stage"]) == ("advocacy", "advocacy")
    back = body["history"][-1]
    assert (back["from_stage"], back["to_stage"], back["cause"], back["touchpoint_id"]) == (
        "at_risk",
        "advocacy",
        "touchpoint",
        "r-3",
    )
    assert await run_drift(db, shop) == 0


async def test_apply_drift_all_shops_runs_in_every_active_shop_and_survives_a_failing_one(
    api: httpx.AsyncClient,
    db: Database,
    provision: ProvisionFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Created first, so it is visited before the others.
    broken = await provision(unique("Broken shop"))
    active = await provision(unique("Active shop"))
    suspended = await provision(unique("Suspended shop"))
    for shop in (broken, active, suspended):
        await buyer(api, shop, "sleeper")
        await travel_back(db, shop, "sleeper", 100)
    await suspend_tenant(db, suspended.tenant.id, reason="test", actor="test")

    real = drift.apply_drift

    async def failing(conn: TenantConn, schema: str, now: datetime | None = None) -> int:
        if schema == broken.tenant.schema_name:
            raise RuntimeError("this shop's drift fails")
        return await real(conn, schema, now)

    monkeypatch.setattr(drift, "apply_drift", failing)
    with caplog.at_level(logging.ERROR, logger=fanout.log.name):
        moved = await apply_drift_all_shops(db)
    assert moved >= 1
    failed = {getattr(r, "schema", None) for r in caplog.records if r.name == fanout.log.name}
    assert broken.tenant.schema_name in failed
    assert not failed & {active.tenant.schema_name, suspended.tenant.schema_name}

    assert (await journey(api, active.secret_key, "sleeper"))["stage"] == "at_risk"
    for untouched in (broken, suspended):
        stored = await stored_transitions(db, untouched, "sleeper")
        assert [t["to_stage"] for t in stored] == ["acquisition"]
    monkeypatch.undo()
    assert await run_drift(db, active) == 0


# --- the explicit move -----------------------------------------------------------------------


async def test_a_manual_move_backwards_is_audited_and_shown_in_the_history(
    api: httpx.AsyncClient, db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Manual shop"))
    key, customer = shop.secret_key, "mover"
    await buyer(api, shop, customer, purchases=3)
    assert (await journey(api, key, customer))["stage"] == "loyalty"
    actor = await secret_actor(api, shop)

    response = await move(api, key, customer, "consideration", "  Refunded every order.  ")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "customer_journey"
    assert (body["stage"], body["reached_stage"]) == ("consideration", "consideration")
    manual = body["history"][-1]
    assert {k: v for k, v in manual.items() if k != "occurred_at"} == {
        "from_stage": "loyalty",
        "to_stage": "consideration",
        "cause": "manual",
        "touchpoint_id": None,
        "actor": actor,
        "reason": "Refunded every order.",
    }
    assert body["stage_since"] == manual["occurred_at"]
    assert await journey(api, key, customer) | {"time_in_stage_seconds": None} == body | {
        "time_in_stage_seconds": None
    }
    stored = await stored_transitions(db, shop, customer)
    assert (stored[-1]["cause"], stored[-1]["actor"]) == ("manual", actor)

    # The same stage again changes nothing.
    again = await move(api, key, customer, "consideration", "Just making sure.")
    assert again.status_code == 200, again.text
    assert again.json()["history"] == body["history"]
    # How far the customer got was reset, so the drift job has nothing to undo.
    assert await run_drift(db, shop) == 0

    # A drift state keeps the reached stage; the rules disagree (a recent buyer), so the drift
    # job moves the customer back.
    risky = await move(api, key, customer, "at_risk", "Complained on the phone.")
    assert risky.status_code == 200, risky.text
    assert (risky.json()["stage"], risky.json()["reached_stage"]) == ("at_risk", "consideration")
    assert await run_drift(db, shop) == 1
    body = await journey(api, key, customer)
    assert body["stage"] == "consideration"
    assert (body["history"][-1]["cause"], body["history"][-1]["reason"]) == (
        "drift",
        "a purchase within 90 days",
    )

    # Forward is allowed too.
    forward = await move(api, key, customer, "advocacy", "Won the ambassador programme.")
    assert forward.status_code == 200, forward.text
    assert (forward.json()["stage"], forward.json()["reached_stage"]) == ("advocacy", "advocacy")
    assert [t["cause"] for t in await stored_transitions(db, shop, customer)] == [
        "touchpoint",
        "manual",
        "manual",
        "drift",
        "manual",
    ]


async def test_a_manual_move_honours_idempotency_keys(
    api: httpx.AsyncClient, db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Idempotent shop"))
    key, customer = shop.secret_key, "retried"
    await buyer(api, shop, customer)
    retry = {"Idempotency-Key": "move-1"}

    first = await move(api, key, customer, "awareness", "Test order.", retry)
    assert first.status_code == 200, first.text
    assert "idempotency-replayed" not in first.headers
    replay = await move(api, key, customer, "awareness", "Test order.", retry)
    assert replay.status_code == 200
    assert replay.headers["idempotency-replayed"] == "true"
    assert replay.json() == first.json()
    assert len(await stored_transitions(db, shop, customer)) == 2

    reused = await move(api, key, customer, "loyalty", "Another request.", retry)
    assert_problem(reused, 422, "idempotency-key-reused")
    assert (await journey(api, key, customer))["stage"] == "awareness"


# --- the numbers of the view -----------------------------------------------------------------


async def test_time_in_stage_channels_and_touchpoints_before_the_first_purchase(
    api: httpx.AsyncClient, db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Numbers shop"))
    key, customer = shop.secret_key, "counted"
    t0 = NOW - 10 * DAY
    for item in (
        event(customer, "n-1", "page_view", t0),
        event(customer, "n-2", "email_open", t0 + 1 * HOUR, "email"),
        event(customer, "n-3", "product_view", t0 + 2 * HOUR),  # -> consideration
        event(customer, "n-4", "search", t0 + 3 * HOUR, "mobile_app"),
        event(customer, "n-5", "purchase", t0 + 5 * HOUR),  # -> acquisition
        event(customer, "n-6", "page_view", t0 + 6 * HOUR, "sms"),
        # Sent last, but it happened before the purchase.
        event(customer, "n-7", "page_view", t0 + 4 * HOUR, "social"),
    ):
        await send(api, key, item)

    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        view = await history.customer_journey(conn, customer, now=t0 + 10 * HOUR)
    assert view.stage == "acquisition"
    assert view.stage_since == t0 + 5 * HOUR
    assert view.time_in_stage_seconds == {
        "awareness": 2 * 3600,
        "consideration": 3 * 3600,
        "acquisition": 5 * 3600,
    }
    assert view.touchpoints_before_first_purchase == 5
    assert view.channels_by_stage == {
        "awareness": ["email", "web"],
        "consideration": ["mobile_app", "social", "web"],
        "acquisition": ["sms", "web"],
    }

    # Over HTTP the current stage runs to the real now.
    body = await journey(api, key, customer)
    spent = body["time_in_stage_seconds"]
    assert (spent["awareness"], spent["consideration"]) == (7200, 10800)
    so_far = int((datetime.now(UTC) - (t0 + 5 * HOUR)).total_seconds())
    assert so_far - 60 <= spent["acquisition"] <= so_far
    assert body["touchpoints_before_first_purchase"] == 5
    assert body["channels_by_stage"] == view.channels_by_stage

    # A second stay in a stage adds to the first.
    moved = await move(api, key, customer, "consideration", "Back to browsing.")
    assert moved.status_code == 200, moved.text
    at = parse(moved.json()["history"][-1]["occurred_at"])
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        view = await history.customer_journey(conn, customer, now=at + HOUR)
    assert view.time_in_stage_seconds == {
        "awareness": 7200,
        "consideration": 10800 + 3600,
        "acquisition": int((at - (t0 + 5 * HOUR)).total_seconds()),
    }
    assert [(t.from_stage, t.to_stage) for t in view.history] == [
        ("awareness", "consideration"),
        ("consideration", "acquisition"),
        ("acquisition", "consideration"),
    ]


async def test_a_customer_who_never_moved_or_bought(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Quiet shop"))
    first = NOW - 3 * HOUR
    await send(
        api,
        shop.secret_key,
        event("quiet", "q-1", "page_view", first),
        event("quiet", "q-2", "email_open", NOW - HOUR, "email"),
    )
    body = await journey(api, shop.secret_key, "quiet")
    assert body["customer_id"] == "quiet"
    assert (body["stage"], body["reached_stage"], body["history"]) == ("awareness", "awareness", [])
    assert parse(body["stage_since"]) == first
    assert list(body["time_in_stage_seconds"]) == ["awareness"]
    assert body["time_in_stage_seconds"]["awareness"] >= 3 * 3600
    assert body["touchpoints_before_first_purchase"] is None
    assert body["channels_by_stage"] == {"awareness": ["email", "web"]}


# --- refusals --------------------------------------------------------------------------------


async def test_the_journey_needs_a_credential_with_the_right_scope(
    api: httpx.AsyncClient, db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Scoped shop"))
    await buyer(api, shop, "guarded")
    reader = await restricted_key(api, shop, "customers:read")
    writer = await restricted_key(api, shop, "customers:write")
    body = {"stage": "awareness", "reason": "Because."}

    assert_problem(await api.get(journey_url("guarded")), 401, "unauthenticated")
    assert_problem(
        await api.post(journey_url("guarded", "/stage"), json=body), 401, "unauthenticated"
    )
    for key in (writer, shop.publishable_key):
        response = await api.get(journey_url("guarded"), headers=bearer(key))
        assert response.status_code == 403, response.text
        assert "acquisition" not in response.text
    assert_problem(
        await api.get(journey_url("guarded"), headers=bearer(writer)), 403, "insufficient-scope"
    )
    for key in (reader, shop.publishable_key):
        response = await api.post(journey_url("guarded", "/stage"), json=body, headers=bearer(key))
        assert response.status_code == 403, response.text
    assert_problem(await move(api, reader, "guarded", "awareness", "x"), 403, "insufficient-scope")

    assert (await journey(api, reader, "guarded"))["stage"] == "acquisition"
    assert (await move(api, writer, "guarded", "awareness", "x")).status_code == 200
    assert [t["cause"] for t in await stored_transitions(db, shop, "guarded")] == [
        "touchpoint",
        "manual",
    ]


async def test_unknown_customers_are_404(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Empty shop"))
    missing = await api.get(journey_url("nobody"), headers=bearer(shop.secret_key))
    assert "nobody" in str(assert_problem(missing, 404, "not-found")["detail"])
    assert_problem(
        await move(api, shop.secret_key, "nobody", "awareness", "Who?"), 404, "not-found"
    )


@pytest.mark.parametrize(
    ("body", "path"),
    [
        pytest.param({"stage": "bored", "reason": "x"}, "$.stage", id="unknown-stage"),
        pytest.param({"stage": "loyalty"}, "$", id="no-reason"),
        pytest.param({"reason": "x"}, "$", id="no-stage"),
        pytest.param({"stage": "loyalty", "reason": ""}, "$.reason", id="empty-reason"),
        pytest.param({"stage": "loyalty", "reason": "   "}, "$.reason", id="blank-reason"),
        pytest.param({"stage": "loyalty", "reason": "x" * 501}, "$.reason", id="long-reason"),
        pytest.param({"stage": "loyalty", "reason": "x", "by": "me"}, "$", id="unknown-field"),
    ],
)
async def test_a_bad_move_is_a_422_naming_the_field(
    api: httpx.AsyncClient,
    db: Database,
    provision: ProvisionFactory,
    body: dict[str, Any],
    path: str,
) -> None:
    shop = await provision(unique("Strict shop"))
    await buyer(api, shop, "strict")
    response = await api.post(
        journey_url("strict", "/stage"), json=body, headers=bearer(shop.secret_key)
    )
    problem = assert_problem(response, 422, "validation")
    errors = problem["errors"]
    assert isinstance(errors, list)
    assert errors[0]["path"] == path, errors
    assert len(await stored_transitions(db, shop, "strict")) == 1


async def test_a_reason_of_500_characters_is_fine(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Verbose shop"))
    await buyer(api, shop, "verbose")
    response = await move(api, shop.secret_key, "verbose", "awareness", "x" * 500)
    assert response.status_code == 200, response.text
    assert response.json()["history"][-1]["reason"] == "x" * 500


# --- isolation -------------------------------------------------------------------------------


async def test_two_shops_never_mix(
    api: httpx.AsyncClient, db: Database, provision: ProvisionFactory
) -> None:
    first = await provision(unique("First shop"))
    second = await provision(unique("Second shop"))
    customer = "shared-customer"
    # The same customer id and the same event ids in both shops, different journeys.
    await send(
        api,
        first.secret_key,
        event(customer, "s-1", "page_view", NOW - 3 * HOUR),
        event(customer, "s-2", "purchase", NOW - 2 * HOUR),
    )
    await send(
        api,
        second.secret_key,
        event(customer, "s-1", "page_view", NOW - 3 * HOUR, "email"),
        event(customer, "s-2", "product_view", NOW - 2 * HOUR, "mobile_app"),
    )
    await send(api, first.secret_key, event("only-first", "o-1", "page_view", NOW - HOUR))

    one = await journey(api, first.secret_key, customer)
    two = await journey(api, second.secret_key, customer)
    assert (one["stage"], two["stage"]) == ("acquisition", "consideration")
    assert one["channels_by_stage"] == {"awareness": ["web"], "acquisition": ["web"]}
    assert two["channels_by_stage"] == {"awareness": ["email"], "consideration": ["mobile_app"]}
    assert (one["touchpoints_before_first_purchase"], two["touchpoints_before_first_purchase"]) == (
        1,
        None,
    )
    assert_problem(
        await api.get(journey_url("only-first"), headers=bearer(second.secret_key)),
        404,
        "not-found",
    )
    assert_problem(
        await move(api, second.secret_key, "only-first", "loyalty", "Nope."), 404, "not-found"
    )

    moved = await move(api, first.secret_key, customer, "awareness", "Only in the first shop.")
    assert moved.status_code == 200, moved.text
    assert await journey(api, second.secret_key, customer) | {"time_in_stage_seconds": 0} == two | {
        "time_in_stage_seconds": 0
    }

    await send(
        api, second.secret_key, event(customer, "s-3", "purchase", NOW - timedelta(minutes=30))
    )
    await travel_back(db, second, customer, 100)
    assert await run_drift(db, first) == 0
    assert (await journey(api, second.secret_key, customer))["stage"] == "acquisition"
    assert await run_drift(db, second) == 1
    assert (await journey(api, second.secret_key, customer))["stage"] == "at_risk"
    assert (await journey(api, first.secret_key, customer))["stage"] == "awareness"
    assert [t["cause"] for t in await stored_transitions(db, first, customer)] == [
        "touchpoint",
        "manual",
    ]


async def test_a_hand_set_stage_holds_until_the_rules_earn_more(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Held shop"))
    key, customer = shop.secret_key, "held"
    await buyer(api, shop, customer, purchases=3)
    moved = await move(api, key, customer, "consideration", "Returned everything.")
    assert moved.status_code == 200, moved.text

    # Nothing new: a page view and even a fourth order earn loyalty, which the move overruled.
    await send(api, key, event(customer, "held-view-2", "page_view", NOW - HOUR))
    await send(api, key, event(customer, "held-buy-4", "purchase", NOW - HOUR / 2))
    assert (await journey(api, key, customer))["stage"] == "consideration"

    # New evidence: a review earns advocacy, more than the rules gave at the move.
    await send(api, key, event(customer, "held-review", "review_written", NOW - HOUR / 4))
    body = await journey(api, key, customer)
    assert body["stage"] == "advocacy"
    assert body["history"][-1]["touchpoint_id"] == "held-review"


# --- events -------------------------------------------------------------------------------------


async def test_stage_changes_of_known_customers_and_erasures_become_events(
    api: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision(unique("Eventful shop"))
    await send(api, shop.secret_key, touchpoint(unique("anon"), anonymous_id="just-looking"))
    await buyer(api, shop, "eve")
    await travel_back(db, shop, "eve", 100)
    assert await run_drift(db, shop) == 1

    async def events(kind: str) -> list[dict[str, Any]]:
        async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
            rows = await conn.fetch("SELECT payload FROM outbox WHERE type = $1 ORDER BY id", kind)
        return [r["payload"] for r in rows]

    moves = [
        (e["customer_id"], e["from"], e["to"], e["cause"])
        for e in await events("customer.stage_changed")
    ]
    assert moves == [
        ("eve", "awareness", "acquisition", "touchpoint"),
        ("eve", "acquisition", "at_risk", "drift"),
    ]
    erased = await api.delete("/v1/customers/eve", headers=bearer(shop.secret_key))
    assert erased.status_code == 200, erased.text
    assert await events("customer.stage_changed") == []  # they named the person
    assert await events("customer.deleted") == [{"customer_ids": ["eve"]}]
