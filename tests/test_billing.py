"""Billing end to end against a local fake Stripe (``tests/stripe_fake.py``) that the official
library talks to over HTTP: the subscription's whole life through Checkout and Stripe's webhooks,
replayed and out-of-order events, plan changes, the endpoints' success, auth and input failures.

Webhooks are signed with Stripe's scheme and posted to the app; the worker's job is called
directly (``deliver``), as the worker would call it. Time moves by passing ``now``, never by
sleeping.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from litestar import Litestar

from api.auth.secrets import Keyring
from api.billing import lifecycle
from api.billing.inbox import PROCESS_ENTRYPOINT, process_event
from api.billing.limits import ensure_room
from api.billing.plans import plan_book
from api.billing.stripe_client import API_VERSION, gateway_for
from api.config import Settings
from api.db import Database
from api.db.queue import connect_queue_pool
from api.errors import Problem
from api.jobs import JobContext, periodic_jobs, queued_jobs
from api.tenants.lifecycle import ProvisionedShop
from api.worker import run_worker
from tests.conftest import ProvisionFactory, bearer, http_client, make_app, settings_for_tests
from tests.stripe_fake import API_KEY, FakeStripe, running_fake, sign
from tests.test_http import assert_problem
from tests.test_touchpoints import touchpoint
from tests.test_worker import eventually

# stripe-python's httpx client posts its form body as ``data=<str>``, which httpx deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")

WEBHOOK_SECRET = "whsec_test_0123456789abcdef0123456789abcdef"
GRACE_DAYS = 3
PLANS: dict[str, Any] = {
    "free": {"touchpoints_per_month": 20},
    "growth": {
        "price_id": "price_growth_fee",
        "overage_price_id": "price_growth_overage",
        "touchpoints_per_month": 50,
        "rate_limit_per_second": 100,
        "rate_limit_burst": 600,
    },
    "scale": {
        "price_id": "price_scale_fee",
        "overage_price_id": "price_scale_overage",
        "touchpoints_per_month": 500,
        "trial_days": 14,
    },
}


def billing_overrides(fake: FakeStripe, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "stripe_api_key": API_KEY,
        "stripe_api_base": fake.url,
        "stripe_webhook_secret": WEBHOOK_SECRET,
        "stripe_meter_id": fake.meter_id,
        "billing_plans": json.dumps(PLANS),
        "billing_grace_days": GRACE_DAYS,
        "billing_return_url": "https://shop-admin.example/billing",
        # The credential's bucket roomy, so responses show the shop's (the plan's) bucket.
        "rate_limit_per_second": 1000.0,
        "rate_limit_burst": 5000,
        "shop_rate_limit_per_second": 50.0,
        "shop_rate_limit_burst": 300,
    }
    values.update(overrides)
    return values


@pytest.fixture(scope="module")
def stripe() -> Iterator[FakeStripe]:
    with running_fake() as fake:
        for plan in ("growth", "scale"):
            fake.add_price(f"price_{plan}_fee", "licensed")
            fake.add_price(f"price_{plan}_overage", "metered")
        yield fake


@pytest.fixture(scope="module")
def settings(stripe: FakeStripe) -> Settings:
    return settings_for_tests(**billing_overrides(stripe))


@pytest.fixture(scope="module")
def billing_app(db: Database, stripe: FakeStripe) -> Litestar:
    return make_app(db, **billing_overrides(stripe))


@pytest.fixture
async def bill(billing_app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(billing_app) as client:
        yield client


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


def signed(event: dict[str, Any], secret: str = WEBHOOK_SECRET, **sign_args: Any) -> dict[str, Any]:
    body = json.dumps(event).encode()
    return {
        "content": body,
        "headers": {"Stripe-Signature": sign(body, secret, **sign_args), **JSON},
    }


JSON = {"Content-Type": "application/json"}


async def post_event(client: httpx.AsyncClient, event: dict[str, Any]) -> httpx.Response:
    return await client.post("/billing/stripe/webhook", **signed(event))


async def deliver(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    events: list[dict[str, Any]],
    *,
    now: datetime | None = None,
) -> list[str]:
    """Stripe sends the events (signed, in this order), the worker processes each."""
    outcomes = []
    for event in events:
        response = await post_event(client, event)
        assert response.status_code == 200, response.text
        outcomes.append(await process(db, settings, event["id"], now=now))
    return outcomes


async def process(
    db: Database, settings: Settings, event_id: str, *, now: datetime | None = None
) -> str:
    gateway = gateway_for(settings)
    assert gateway is not None
    return await process_event(
        db,
        gateway,
        plan_book(settings),
        timedelta(days=settings.billing_grace_days),
        event_id,
        now=now,
    )


async def billing(client: httpx.AsyncClient, key: str) -> dict[str, Any]:
    response = await client.get("/v1/billing", headers=bearer(key))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def checkout(
    client: httpx.AsyncClient, key: str, plan: str = "growth", **extra: Any
) -> httpx.Response:
    headers = {**bearer(key), **extra.pop("headers", {})}
    return await client.post("/v1/billing/checkout", json={"plan": plan, **extra}, headers=headers)


async def subscribe(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    stripe: FakeStripe,
    shop: ProvisionedShop,
    plan: str = "growth",
) -> str:
    """Checkout, paid: returns the subscription's id once the shop is on ``plan``."""
    response = await checkout(client, shop.secret_key, plan)
    assert response.status_code == 201, response.text
    events = stripe.complete_checkout(response.json()["id"])
    await deliver(client, db, settings, events)
    body = await billing(client, shop.secret_key)
    assert body["plan"]["id"] == plan, body
    return str(body["subscription"]["id"])


async def ingest(
    client: httpx.AsyncClient, key: str, event_id: str | None = None
) -> httpx.Response:
    return await client.post(
        "/v1/touchpoints", json=touchpoint(event_id or unique("evt")), headers=bearer(key)
    )


async def audit_actions(db: Database, shop: ProvisionedShop) -> list[tuple[str, dict[str, Any]]]:
    async with db.control() as conn:
        rows = await conn.fetch(
            "SELECT action, details FROM sjaak.audit_log WHERE tenant_id = $1"
            " AND action LIKE 'billing.%' ORDER BY id",
            shop.tenant.id,
        )
    return [(r["action"], r["details"]) for r in rows]


# -- the whole life --------------------------------------------------------------------------


async def test_free_to_growth_through_checkout_then_failure_restriction_recovery_and_cancel(
    bill: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    stripe: FakeStripe,
    provision: ProvisionFactory,
) -> None:
    shop = await provision(unique("Lifecycle shop"))
    other = await provision(unique("Bystander shop"))
    key = shop.secret_key

    start = await billing(bill, key)
    assert (start["plan"]["id"], start["status"], start["subscription"]) == ("free", "free", None)
    assert start["usage"]["quota"] == 20
    assert [p["id"] for p in start["plans"]] == ["free", "growth", "scale"]

    response = await checkout(bill, key)
    assert response.status_code == 201, response.text
    session = response.json()
    assert session["object"] == "checkout_session"
    assert session["url"].startswith("https://checkout.stripe.test/")
    created = stripe.sessions[session["id"]]
    customer = created["customer"]
    assert stripe.customers[customer]["metadata"] == {"tenant_id": str(shop.tenant.id)}
    assert created["client_reference_id"] == str(shop.tenant.id)
    assert created["_line_items"] == [
        {"price": "price_growth_fee", "quantity": "1"},
        {"price": "price_growth_overage"},
    ]
    assert created["success_url"] == "https://shop-admin.example/billing?checkout=success"
    # The library sent the pinned version, and an idempotency key made from our ids.
    [call] = [c for c in stripe.calls("POST", "/v1/checkout/sessions") if c.status == 200][-1:]
    assert call.stripe_version == API_VERSION
    assert call.idempotency_key is not None
    assert call.idempotency_key.startswith(f"sjaak-checkout-{shop.tenant.id}-")

    # Paid: Stripe sends its events; the worker applies the subscription it fetches.
    events = stripe.complete_checkout(session["id"])
    outcomes = await deliver(bill, db, settings, events)
    assert outcomes == ["applied", "unchanged", "unchanged"]
    active = await billing(bill, key)
    assert (active["plan"]["id"], active["status"]) == ("growth", "active")
    assert active["plan"]["over_quota"] == "billed"
    assert active["usage"]["quota"] == 50
    subscription = active["subscription"]
    assert subscription["status"] == "active"
    assert subscription["current_period_end"] is not None
    sub_id = subscription["id"]

    # The renewal fails: past due, ingest still works during the grace period.
    now = datetime.now(UTC)
    await deliver(bill, db, settings, stripe.fail_payment(sub_id), now=now)
    past_due = await billing(bill, key)
    assert past_due["status"] == "past_due"
    assert past_due["status_reason"].startswith("The latest payment failed")
    grace_until = datetime.fromisoformat(past_due["grace_until"])
    assert abs(grace_until - (now + timedelta(days=GRACE_DAYS))) < timedelta(seconds=2)
    assert (await ingest(bill, key)).status_code == 201

    # The grace period ends: restricted. Reads work; ingest is 402 and says what to do.
    assert await lifecycle.restrict_overdue(db, plan_book(settings), now + timedelta(days=4)) >= 1
    response = await ingest(bill, key)
    body = assert_problem(response, 402, "payment-required")
    assert "grace period ended" in str(body["detail"])
    assert "POST /v1/billing/portal" in str(body["detail"])
    restricted = await billing(bill, key)
    assert restricted["status"] == "restricted"
    assert restricted["plan"]["id"] == "growth"
    read = await bill.get("/v1/customers", headers=bearer(key))
    assert read.status_code == 200, read.text
    # The other shop never noticed.
    assert (await ingest(bill, other.secret_key)).status_code == 201

    # Paid after all: active again, ingest resumes.
    await deliver(bill, db, settings, stripe.pay(sub_id))
    recovered = await billing(bill, key)
    assert (recovered["status"], recovered["grace_until"]) == ("active", None)
    assert (await ingest(bill, key)).status_code == 201

    # Cancelled in the portal: back to Free limits.
    await deliver(bill, db, settings, stripe.cancel(sub_id))
    canceled = await billing(bill, key)
    assert (canceled["plan"]["id"], canceled["status"]) == ("free", "canceled")
    assert canceled["usage"]["quota"] == 20
    assert canceled["subscription"]["status"] == "canceled"

    moves = [
        (d["from"]["status"], d["to"]["status"])
        for action, d in await audit_actions(db, shop)
        if action == "billing.status_changed"
    ]
    assert moves == [
        ("free", "active"),
        ("active", "past_due"),
        ("past_due", "restricted"),
        ("restricted", "active"),
        ("active", "canceled"),
    ]
    actions = [action for action, _ in await audit_actions(db, shop)]
    assert actions[:2] == ["billing.customer_created", "billing.checkout_started"]
    assert await audit_actions(db, other) == []


async def test_a_trial_then_a_subscription_the_customer_never_paid_for(
    bill: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    stripe: FakeStripe,
    provision: ProvisionFactory,
) -> None:
    shop = await provision(unique("Trial shop"))
    response = await checkout(bill, shop.secret_key, "scale")
    assert response.status_code == 201, response.text
    assert stripe.sessions[response.json()["id"]]["_subscription_data"]["trial_period_days"] == "14"
    await deliver(bill, db, settings, stripe.complete_checkout(response.json()["id"]))
    body = await billing(bill, shop.secret_key)
    assert (body["plan"]["id"], body["status"]) == ("scale", "trialing")
    assert body["subscription"]["trial_end"] is not None
    assert body["status_reason"].startswith("Trial of Scale until ")

    # The trial ends without a payment method: Stripe pauses it, ingest stops.
    await deliver(bill, db, settings, stripe.set_status(body["subscription"]["id"], "paused"))
    paused = await billing(bill, shop.secret_key)
    assert paused["status"] == "restricted"
    problem = assert_problem(await ingest(bill, shop.secret_key), 402, "payment-required")
    assert "trial ended without a payment method" in str(problem["detail"])

    # Unpaid after failed retries is restricted too.
    await deliver(bill, db, settings, stripe.set_status(body["subscription"]["id"], "unpaid"))
    assert (await billing(bill, shop.secret_key))["status"] == "restricted"


async def test_a_plan_change_through_checkout_replaces_the_old_subscription(
    bill: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    stripe: FakeStripe,
    provision: ProvisionFactory,
) -> None:
    shop = await provision(unique("Upgrading shop"))
    old = await subscribe(bill, db, settings, stripe, shop, "growth")

    same = await checkout(bill, shop.secret_key, "growth")
    assert_problem(same, 409, "conflict")

    response = await checkout(bill, shop.secret_key, "scale")
    assert response.status_code == 201, response.text
    # No second trial for a shop that subscribed before.
    assert "trial_period_days" not in stripe.sessions[response.json()["id"]]["_subscription_data"]
    await deliver(bill, db, settings, stripe.complete_checkout(response.json()["id"]))
    body = await billing(bill, shop.secret_key)
    assert (body["plan"]["id"], body["status"]) == ("scale", "active")
    assert body["subscription"]["id"] != old
    # The old subscription was cancelled in Stripe, invoicing what it owed.
    assert stripe.subscriptions[old]["status"] == "canceled"
    [cancel] = stripe.calls("DELETE", f"/v1/subscriptions/{old}")
    assert cancel.params == {"invoice_now": "true", "prorate": "true"}
    # Its deletion event changes nothing.
    [deleted] = [e for e in stripe.events if e["data"]["object"]["id"] == old][-1:]
    assert deleted["type"] == "customer.subscription.deleted"
    [outcome] = await deliver(bill, db, settings, [deleted])
    assert outcome.startswith("ignored:")
    assert (await billing(bill, shop.secret_key))["plan"]["id"] == "scale"
    actions = [action for action, _ in await audit_actions(db, shop)]
    assert "billing.subscription_superseded" in actions


# -- webhooks: replays, order ----------------------------------------------------------------


async def test_a_replayed_webhook_is_stored_once_and_applied_once(
    bill: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    stripe: FakeStripe,
    provision: ProvisionFactory,
) -> None:
    shop = await provision(unique("Replay shop"))
    sub_id = await subscribe(bill, db, settings, stripe, shop)
    [failed, updated] = stripe.fail_payment(sub_id)

    first = await post_event(bill, updated)
    again = await post_event(bill, updated)
    assert (first.status_code, first.json()) == (200, {"received": True, "duplicate": False})
    assert (again.status_code, again.json()) == (200, {"received": True, "duplicate": True})
    async with db.control() as conn:
        row = await conn.fetchrow(
            "SELECT deliveries, processed_at FROM sjaak.stripe_events WHERE event_id = $1",
            updated["id"],
        )
        jobs = await conn.fetchval(
            "SELECT count(*) FROM sjaak.pgqueuer WHERE entrypoint = $1 AND payload = $2",
            PROCESS_ENTRYPOINT,
            updated["id"].encode(),
        )
    assert row is not None
    assert (row["deliveries"], row["processed_at"]) == (2, None)
    assert jobs == 1  # one job however often Stripe delivers

    assert await process(db, settings, updated["id"]) == "applied"
    assert await process(db, settings, updated["id"]) == "applied"  # the stored outcome
    assert (await billing(bill, shop.secret_key))["status"] == "past_due"
    # Delivered again after processing: acknowledged, not applied again.
    assert (await post_event(bill, updated)).json()["duplicate"] is True
    assert await process(db, settings, failed["id"]) == "ignored: no such event"
    moves = [a for a, _ in await audit_actions(db, shop) if a == "billing.status_changed"]
    assert len(moves) == 2  # free -> active, active -> past_due


async def test_out_of_order_webhooks_converge_on_stripes_state(
    bill: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    stripe: FakeStripe,
    provision: ProvisionFactory,
) -> None:
    shop = await provision(unique("Disorder shop"))
    sub_id = await subscribe(bill, db, settings, stripe, shop)
    failure = stripe.fail_payment(sub_id)
    recovery = stripe.pay(sub_id)
    # The recovery arrives before the failure it recovers from.
    await deliver(bill, db, settings, recovery + failure)
    assert (await billing(bill, shop.secret_key))["status"] == "active"

    # A subscription created and cancelled, its events delivered newest first.
    second = await provision(unique("Disorder shop 2"))
    response = await checkout(bill, second.secret_key)
    created = stripe.complete_checkout(response.json()["id"])
    sub2 = created[0]["data"]["object"]["id"]
    deleted = stripe.cancel(sub2)
    outcomes = await deliver(bill, db, settings, deleted + list(reversed(created)))
    body = await billing(bill, second.secret_key)
    assert (body["status"], body["plan"]["id"]) == ("canceled", "free")
    assert outcomes[0] == "applied"
    assert all(o == "unchanged" for o in outcomes[1:]), outcomes


# -- the webhook endpoint --------------------------------------------------------------------


def a_event(**fields: Any) -> dict[str, Any]:
    event = {
        "id": unique("evt"),
        "object": "event",
        "type": "invoice.paid",
        "created": int(datetime.now(UTC).timestamp()),
        "livemode": False,
        "data": {"object": {"id": "in_x", "object": "invoice", "customer": "cus_nobody"}},
    }
    event.update(fields)
    return event


async def test_the_webhook_refuses_what_stripe_did_not_sign(bill: httpx.AsyncClient) -> None:
    event = a_event()
    body = json.dumps(event).encode()
    missing = await bill.post("/billing/stripe/webhook", content=body, headers=JSON)
    assert "missing" in str(assert_problem(missing, 400, "http-error")["detail"])
    forged = await bill.post("/billing/stripe/webhook", **signed(event, "whsec_someone_else"))
    assert "does not verify" in str(assert_problem(forged, 400, "http-error")["detail"])
    stale = await bill.post(
        "/billing/stripe/webhook",
        **signed(event, timestamp=int(datetime.now(UTC).timestamp()) - 600),
    )
    assert "tolerance" in str(assert_problem(stale, 400, "http-error")["detail"])
    garbled = await bill.post(
        "/billing/stripe/webhook",
        content=body,
        headers={**JSON, "Stripe-Signature": "t=abc,v9=zzz"},
    )
    assert_problem(garbled, 400, "http-error")
    tampered = signed(event)
    tampered["content"] = tampered["content"].replace(b"cus_nobody", b"cus_somebody")
    assert_problem(await bill.post("/billing/stripe/webhook", **tampered), 400, "http-error")
    not_an_event = await bill.post("/billing/stripe/webhook", **signed({"hello": "world"}))
    assert_problem(not_an_event, 400, "malformed-body")


async def test_the_webhook_is_not_there_without_a_secret(client: httpx.AsyncClient) -> None:
    response = await client.post("/billing/stripe/webhook", **signed(a_event()))
    assert_problem(response, 404, "not-found")


async def test_events_for_nobody_and_of_other_types_are_kept_and_ignored(
    bill: httpx.AsyncClient, db: Database, settings: Settings
) -> None:
    unknown_customer = a_event()
    other_type = a_event(type="charge.refunded")
    outcomes = await deliver(bill, db, settings, [unknown_customer, other_type])
    assert outcomes == [
        "ignored: no shop has the Stripe customer cus_nobody",
        "ignored: charge.refunded does not concern subscriptions",
    ]


async def test_a_failing_stripe_leaves_the_event_for_a_retry(
    bill: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    stripe: FakeStripe,
    provision: ProvisionFactory,
) -> None:
    shop = await provision(unique("Retry shop"))
    sub_id = await subscribe(bill, db, settings, stripe, shop)
    [_, updated] = stripe.fail_payment(sub_id)
    assert (await post_event(bill, updated)).status_code == 200
    stripe.fail_next("GET", f"/v1/subscriptions/{sub_id}", status=503)
    with pytest.raises(Exception, match="unknown error"):
        await process(db, settings, updated["id"])
    async with db.control() as conn:
        row = await conn.fetchrow(
            "SELECT attempts, last_error, processed_at FROM sjaak.stripe_events"
            " WHERE event_id = $1",
            updated["id"],
        )
    assert row is not None
    assert (row["attempts"], row["processed_at"]) == (1, None)
    assert "StripeUnavailable" in row["last_error"]
    assert (await billing(bill, shop.secret_key))["status"] == "active"
    assert await process(db, settings, updated["id"]) == "applied"
    assert (await billing(bill, shop.secret_key))["status"] == "past_due"


async def test_the_worker_processes_stored_events(
    bill: httpx.AsyncClient,
    db: Database,
    db_url: str,
    settings: Settings,
    stripe: FakeStripe,
    provision: ProvisionFactory,
    keyring: Keyring,
) -> None:
    shop = await provision(unique("Worker shop"))
    response = await checkout(bill, shop.secret_key)
    events = stripe.complete_checkout(response.json()["id"])
    for event in events:
        assert (await post_event(bill, event)).status_code == 200
    [job] = [j for j in queued_jobs() if j.entrypoint == PROCESS_ENTRYPOINT]

    async def applied() -> bool:
        async with db.control() as conn:
            done = await conn.fetchval(
                "SELECT count(*) FROM sjaak.stripe_events WHERE event_id = ANY($1::text[])"
                " AND processed_at IS NOT NULL",
                [e["id"] for e in events],
            )
        return bool(done == len(events))

    pool = await connect_queue_pool(db_url)
    stop = asyncio.Event()
    worker = asyncio.create_task(
        run_worker(
            JobContext(settings, db, keyring),
            pool,
            stop,
            periodic=[],
            queued=[job],
            dequeue_timeout=timedelta(seconds=1),
        )
    )
    try:
        await eventually(applied)
    finally:
        stop.set()
        await asyncio.wait_for(worker, timeout=30)
        await pool.close()
    assert (await billing(bill, shop.secret_key))["status"] == "active"


def test_billing_jobs_are_registered() -> None:
    names = {job.name for job in periodic_jobs()}
    assert {"billing-meter", "billing-sweep", "billing-reconcile"} <= names
    assert PROCESS_ENTRYPOINT in {job.entrypoint for job in queued_jobs()}


# -- the endpoints: success, auth, input -----------------------------------------------------


async def restricted_key(client: httpx.AsyncClient, shop: ProvisionedShop, *scopes: str) -> str:
    response = await client.post(
        "/v1/api-keys",
        json={"kind": "restricted", "name": "billing test", "scopes": list(scopes)},
        headers=bearer(shop.secret_key),
    )
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


async def test_billing_endpoints_need_credentials_and_scopes(
    bill: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Scoped shop"))
    reader = await restricted_key(bill, shop, "billing:read")
    stranger = await restricted_key(bill, shop, "customers:read")
    for method, path in (
        ("GET", "/v1/billing"),
        ("POST", "/v1/billing/checkout"),
        ("POST", "/v1/billing/portal"),
    ):
        body = {"plan": "growth"} if path.endswith("checkout") else None
        anonymous = await bill.request(method, path, json=body)
        assert_problem(anonymous, 401, "unauthenticated")
        bad = await bill.request(method, path, json=body, headers=bearer("sjk_sk_live_nonsense"))
        assert_problem(bad, 401, "unauthenticated")
        wrong = await bill.request(method, path, json=body, headers=bearer(stranger))
        assert_problem(wrong, 403, "insufficient-scope")
        public = await bill.request(method, path, json=body, headers=bearer(shop.publishable_key))
        assert_problem(public, 403, "forbidden")
    assert (await bill.get("/v1/billing", headers=bearer(reader))).status_code == 200
    writes = await bill.post("/v1/billing/portal", headers=bearer(reader))
    assert_problem(writes, 403, "insufficient-scope")


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"plan": "free"}, "$.plan"),
        ({"plan": "platinum"}, "$.plan"),
        ({}, "$"),
        ({"plan": "growth", "coupon": "X"}, "$"),
        ({"plan": "growth", "success_url": "javascript:alert(1)"}, "$.success_url"),
        ({"plan": "growth", "cancel_url": 7}, "$.cancel_url"),
    ],
)
async def test_checkout_refuses_bad_input(
    bill: httpx.AsyncClient, provision: ProvisionFactory, body: dict[str, Any], path: str
) -> None:
    shop = await provision(unique("Input shop"))
    response = await bill.post("/v1/billing/checkout", json=body, headers=bearer(shop.secret_key))
    problem = assert_problem(response, 422, "validation")
    assert [e["path"] for e in problem["errors"]] == [path]  # type: ignore[union-attr]
    broken = await bill.post(
        "/v1/billing/checkout", content=b"{not json", headers={**bearer(shop.secret_key), **JSON}
    )
    assert_problem(broken, 400, "malformed-body")


async def test_checkout_and_portal_make_one_customer_and_honour_idempotency_keys(
    bill: httpx.AsyncClient, stripe: FakeStripe, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Idempotent shop"))
    key = {"Idempotency-Key": unique("idem")}
    first = await checkout(bill, shop.secret_key, headers=key)
    again = await checkout(bill, shop.secret_key, headers=key)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    other = await checkout(bill, shop.secret_key, "scale", headers=key)
    assert_problem(other, 422, "idempotency-key-reused")
    fresh = await checkout(bill, shop.secret_key)
    assert fresh.json()["id"] != first.json()["id"]

    portal = await bill.post(
        "/v1/billing/portal",
        json={"return_url": "https://shop-admin.example/done"},
        headers=bearer(shop.secret_key),
    )
    assert portal.status_code == 201, portal.text
    session = stripe.portal_sessions[portal.json()["id"]]
    assert portal.json()["object"] == "billing_portal_session"
    assert session["return_url"] == "https://shop-admin.example/done"
    assert session["customer"] == stripe.sessions[first.json()["id"]]["customer"]
    plain = await bill.post("/v1/billing/portal", headers=bearer(shop.secret_key))
    assert plain.status_code == 201, plain.text
    assert stripe.portal_sessions[plain.json()["id"]]["return_url"] == (
        "https://shop-admin.example/billing"
    )
    named = [
        c for c in stripe.customers.values() if c["metadata"] == {"tenant_id": str(shop.tenant.id)}
    ]
    assert len(named) == 1
    bad = await bill.post(
        "/v1/billing/portal", json={"return_url": "nope"}, headers=bearer(shop.secret_key)
    )
    assert_problem(bad, 422, "validation")


async def test_checkout_answers_503_when_stripe_fails_or_is_not_configured(
    bill: httpx.AsyncClient,
    client: httpx.AsyncClient,
    stripe: FakeStripe,
    provision: ProvisionFactory,
) -> None:
    shop = await provision(unique("Down shop"))
    stripe.fail_next("POST", "/v1/checkout/sessions", status=500)
    down = await checkout(bill, shop.secret_key)
    assert "cannot be reached" in str(assert_problem(down, 503, "unavailable")["detail"])
    assert (await checkout(bill, shop.secret_key)).status_code == 201
    unconfigured = await checkout(client, shop.secret_key)
    assert "not set up" in str(assert_problem(unconfigured, 503, "unavailable")["detail"])
    portal = await client.post("/v1/billing/portal", headers=bearer(shop.secret_key))
    assert_problem(portal, 503, "unavailable")
    # Reading works everywhere.
    assert (await client.get("/v1/billing", headers=bearer(shop.secret_key))).status_code == 200


async def test_the_shop_rate_limit_is_the_plans(
    bill: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    stripe: FakeStripe,
    provision: ProvisionFactory,
) -> None:
    free = await provision(unique("Free limits"))
    paid = await provision(unique("Paid limits"))
    await subscribe(bill, db, settings, stripe, paid)
    on_free = await bill.get("/v1/billing", headers=bearer(free.secret_key))
    on_growth = await bill.get("/v1/billing", headers=bearer(paid.secret_key))
    assert on_free.headers["ratelimit-limit"] == "300"  # Free: SJAAK_SHOP_RATE_LIMIT_BURST
    assert on_growth.headers["ratelimit-limit"] == "600"
    assert on_growth.json()["plan"]["rate_limit"] == {"per_second": 100.0, "burst": 600}


async def test_plan_limits_on_campaigns_and_webhook_endpoints(
    billing_app: Litestar,
    bill: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    stripe: FakeStripe,
    provision: ProvisionFactory,
) -> None:
    shop = await provision(unique("Limited shop"))
    tenant = shop.tenant.as_tenant()
    state = billing_app.state
    await ensure_room(state, tenant, "campaigns", 0)
    with pytest.raises(Problem) as refused:
        await ensure_room(state, tenant, "campaigns", 1)
    assert (refused.value.status, refused.value.slug) == (403, "plan-limit-reached")
    assert "Free plan allows 1 campaign;" in refused.value.detail
    with pytest.raises(Problem):
        await ensure_room(state, tenant, "webhook_endpoints", 1)
    await subscribe(bill, db, settings, stripe, shop, "scale")
    await ensure_room(state, tenant, "campaigns", 10_000)  # Scale: no limit
    await ensure_room(state, tenant, "webhook_endpoints", 24)
    with pytest.raises(Problem):
        await ensure_room(state, tenant, "webhook_endpoints", 25)
