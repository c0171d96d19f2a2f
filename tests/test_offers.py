"""Offers end to end: campaigns, deciding on request and on a trigger (through the worker),
redemption by API and by purchase, budgets under concurrency, holdouts and uplift, against the
real database. Every test provisions its own shop."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from api.auth.secrets import Keyring
from api.db import Database, tenant_tx
from api.jobs import QueuedJob
from api.offers.campaigns import Campaign, CampaignCounts, CampaignSpec, Reward
from api.offers.decide import assignment
from api.offers.triggers import DECIDE_ENTRYPOINT, decide_job, decide_trigger
from api.tenants.lifecycle import ProvisionedShop
from tests.conftest import ProvisionFactory, bearer, http_client, make_app
from tests.test_http import assert_problem
from tests.test_loyalty import action, purchase, refund, shop_with, unique
from tests.test_touchpoints import NOW, iso, send, touchpoint
from tests.test_worker import eventually, running_worker

DAY = timedelta(days=1)


def campaign_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "Ten percent",
        "status": "active",
        "reward": {"type": "percent_off", "percent": 10},
    }
    body.update(changes)
    return body


async def create_campaign(client: httpx.AsyncClient, key: str, **changes: Any) -> dict[str, Any]:
    response = await client.post(
        "/v1/campaigns", json=campaign_body(**changes), headers=bearer(key)
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def trigger(
    client: httpx.AsyncClient, key: str, customer_id: str, **body: Any
) -> dict[str, Any]:
    response = await client.post(
        f"/v1/customers/{customer_id}/offers/trigger", json=body, headers=bearer(key)
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def known(client: httpx.AsyncClient, key: str, *customer_ids: str) -> None:
    await send(client, key, *(action(c, "page_view") for c in customer_ids))


async def shop(provision: ProvisionFactory) -> ProvisionedShop:
    return await provision(unique("Offer shop"))


# --- campaigns ----------------------------------------------------------------------------------


async def test_campaigns_are_created_listed_read_and_changed(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    key = (await shop(provision)).secret_key
    draft = await create_campaign(client, key, status="draft", priority=5)
    assert draft["id"].startswith("cmp_") and draft["spec"]["status"] == "draft"
    assert draft["spec"]["limits"] == {
        "per_customer": 1,
        "cooldown_days": 0,
        "max_issued": None,
        "max_redeemed": None,
        "max_discount": None,
        "stackable": False,
    }
    assert draft["counts"] == {"issued": 0, "redeemed": 0, "discount": 0}
    url = f"/v1/campaigns/{draft['id']}"
    moved = await client.patch(url, json={"status": "active", "priority": 7}, headers=bearer(key))
    assert moved.status_code == 200, moved.text
    assert (moved.json()["spec"]["status"], moved.json()["spec"]["priority"]) == ("active", 7)
    assert moved.json()["spec"]["reward"] == {"type": "percent_off", "percent": 10}
    back = await client.patch(url, json={"status": "draft"}, headers=bearer(key))
    assert_problem(back, 422, "validation")
    listed = await client.get("/v1/campaigns", params={"status": "active"}, headers=bearer(key))
    assert [c["id"] for c in listed.json()["data"]] == [draft["id"]]
    assert (await client.get(url, headers=bearer(key))).json()["spec"]["priority"] == 7


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"reward": {"type": "percent_off"}}, "$.reward.percent"),
        ({"reward": {"type": "amount_off", "amount": 500}}, "$.reward.currency"),
        ({"reward": {"type": "free_shipping", "percent": 5}}, "$.reward.percent"),
        ({"reward": {"type": "percent_off", "percent": 101}}, "$.reward.percent"),
        ({"trigger": {"event": "hug"}}, "$.trigger.event"),
        ({"trigger": {"event": "cart_abandoned", "cancel_on": ["nap"]}}, "$.trigger.cancel_on[0]"),
        ({"holdout_percent": 95}, "$.holdout_percent"),
        ({"targeting": {"stages": ["bored"]}}, "$.targeting.stages[0]"),
        ({"targeting": {"orders": {"at_least": 5, "at_most": 2}}}, "$.targeting.orders.at_most"),
        (
            {"variants": [{"name": "a"}, {"name": "a"}]},
            "$.variants[1].name",
        ),
        ({"starts_at": "2026-12-01T00:00:00Z", "ends_at": "2026-11-01T00:00:00Z"}, "$.ends_at"),
        ({"colour": "red"}, "$"),
    ],
)
async def test_a_bad_campaign_names_the_failing_field(
    client: httpx.AsyncClient, provision: ProvisionFactory, changes: dict[str, Any], path: str
) -> None:
    key = (await shop(provision)).secret_key
    response = await client.post(
        "/v1/campaigns", json=campaign_body(**changes), headers=bearer(key)
    )
    problem = assert_problem(response, 422, "validation")
    assert path in {e["path"] for e in problem["errors"]}, problem


async def test_who_may_read_and_change_campaigns(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    one, other = await shop(provision), await shop(provision)
    made = await create_campaign(client, one.secret_key)
    reader = (
        await client.post(
            "/v1/api-keys",
            json={"kind": "restricted", "scopes": ["offers:read"]},
            headers=bearer(one.secret_key),
        )
    ).json()["key"]
    assert_problem(await client.get("/v1/campaigns"), 401, "unauthenticated")
    assert (await client.get("/v1/campaigns", headers=bearer(reader))).status_code == 200
    denied = await client.post("/v1/campaigns", json=campaign_body(), headers=bearer(reader))
    assert_problem(denied, 403, "insufficient-scope")
    stranger = await client.get(f"/v1/campaigns/{made['id']}", headers=bearer(other.secret_key))
    assert_problem(stranger, 404, "not-found")
    patched = await client.patch(
        f"/v1/campaigns/{made['id']}", json={"status": "ended"}, headers=bearer(other.secret_key)
    )
    assert_problem(patched, 404, "not-found")


# --- deciding on request ------------------------------------------------------------------------


async def test_the_highest_priority_eligible_campaign_wins_and_the_others_say_why(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    key = (await shop(provision)).secret_key
    await known(client, key, "ann")
    low = await create_campaign(client, key, name="low", priority=1)
    high = await create_campaign(client, key, name="high", priority=9)
    buyers = await create_campaign(
        client, key, name="buyers", priority=20, targeting={"orders": {"at_least": 1}}
    )
    auto = await create_campaign(client, key, name="auto", trigger={"event": "cart_abandoned"})
    dry = await trigger(client, key, "ann", dry_run=True)
    outcomes = {d["campaign_id"]: (d["outcome"], d["reason"]) for d in dry["decisions"]}
    assert outcomes[high["id"]] == ("would_issue", "eligible")
    assert outcomes[low["id"]][0] == "not_chosen"
    assert outcomes[buyers["id"]] == ("not_eligible", "orders (0) out of range")
    assert outcomes[auto["id"]] == ("not_eligible", "fires only on a cart_abandoned touchpoint")
    assert dry["offers"] == []
    listed = await client.get("/v1/customers/ann/offers", headers=bearer(key))
    assert listed.json() == []  # a dry run consumes nothing

    result = await trigger(client, key, "ann")
    [offer] = result["offers"]
    assert offer["campaign_id"] == high["id"] and offer["status"] == "active"
    assert len(offer["code"]) == 10 and offer["code"].isalnum()
    # The winner does not stack, and the customer holds its offer now: the next one waits.
    again = await trigger(client, key, "ann")
    assert again["offers"] == []
    assert {d["campaign_id"]: d["reason"] for d in again["decisions"]}[low["id"]] == (
        "customer holds another offer that does not stack"
    )
    unknown = await client.post("/v1/customers/nobody/offers/trigger", json={}, headers=bearer(key))
    assert_problem(unknown, 404, "not-found")


async def test_per_customer_limit_and_cooldown(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop_ = await shop(provision)
    key = shop_.secret_key
    await known(client, key, "bob")
    made = await create_campaign(
        client, key, limits={"per_customer": 2, "cooldown_days": 7, "stackable": True}
    )
    assert len((await trigger(client, key, "bob"))["offers"]) == 1
    second = await trigger(client, key, "bob")
    assert second["offers"] == []
    assert second["decisions"][0]["reason"] == "cooldown of 7 days since the last offer"
    async with tenant_tx(db, shop_.tenant.as_tenant()) as conn:
        await conn.execute("UPDATE offers SET issued_at = issued_at - interval '8 days'")
    assert len((await trigger(client, key, "bob"))["offers"]) == 1
    async with tenant_tx(db, shop_.tenant.as_tenant()) as conn:
        await conn.execute("UPDATE offers SET issued_at = issued_at - interval '8 days'")
    third = await trigger(client, key, "bob")
    assert third["decisions"][0]["reason"] == "customer already received 2 (limit 2)"
    campaign = await client.get(f"/v1/campaigns/{made['id']}", headers=bearer(key))
    assert campaign.json()["counts"]["issued"] == 2


async def test_a_trigger_replayed_with_its_key_returns_the_same_offer(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    key = (await shop(provision)).secret_key
    await known(client, key, "cat")
    await create_campaign(client, key, limits={"per_customer": 5, "stackable": True})
    headers = {**bearer(key), "Idempotency-Key": "t-1"}
    first = await client.post("/v1/customers/cat/offers/trigger", json={}, headers=headers)
    again = await client.post("/v1/customers/cat/offers/trigger", json={}, headers=headers)
    assert first.json()["offers"] == again.json()["offers"]
    assert len((await client.get("/v1/customers/cat/offers", headers=bearer(key))).json()) == 1


def test_holdout_assignment_is_stable_and_near_the_share() -> None:
    spec = CampaignSpec(name="x", reward=Reward(type="free_shipping"), holdout_percent=20)
    campaign = Campaign(
        id="cmp_fixed",
        spec=spec,
        counts=CampaignCounts(issued=0, redeemed=0, discount=0),
        created_at=NOW,
        updated_at=NOW,
        created_by="test",
    )
    arms = [assignment(campaign, ref)[0] for ref in range(20_000)]
    share = arms.count("holdout") / len(arms)
    assert 0.19 < share < 0.21
    assert arms == [assignment(campaign, ref)[0] for ref in range(20_000)]


async def test_the_holdout_gets_nothing_but_is_recorded(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop_ = await shop(provision)
    key = shop_.secret_key
    customers = [f"h{i}" for i in range(40)]
    await known(client, key, *customers)
    made = await create_campaign(client, key, holdout_percent=50)
    outcomes = [(await trigger(client, key, c))["decisions"][0]["outcome"] for c in customers]
    assert set(outcomes) == {"issued", "holdout"}
    async with tenant_tx(db, shop_.tenant.as_tenant()) as conn:
        arms = dict(
            await conn.fetch(
                "SELECT arm, count(*) FROM campaign_assignments WHERE campaign_id = $1"
                " GROUP BY arm",
                made["id"],
            )
        )
        offers = await conn.fetchval("SELECT count(*) FROM offers")
    assert arms["holdout"] == outcomes.count("holdout")
    assert offers == outcomes.count("issued") == arms["treatment"]


# --- redeeming ----------------------------------------------------------------------------------


async def redeem(
    client: httpx.AsyncClient, key: str, code: str, customer_id: str, **order: Any
) -> httpx.Response:
    return await client.post(
        f"/v1/offers/{code}/redeem",
        json={"customer_id": customer_id, **order},
        headers=bearer(key),
    )


async def test_a_code_is_redeemed_once_by_its_owner(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    key = (await shop(provision)).secret_key
    await known(client, key, "dan", "eve")
    await create_campaign(client, key)
    [offer] = (await trigger(client, key, "dan"))["offers"]
    code = offer["code"]
    assert_problem(await redeem(client, key, code, "eve"), 404, "not-found")
    assert_problem(await redeem(client, key, "NOPE", "dan"), 404, "not-found")
    done = await redeem(client, key, code, "dan", order_id="o-1", amount=5_000, currency="EUR")
    assert done.status_code == 200, done.text
    assert (done.json()["status"], done.json()["discount"]) == ("redeemed", 500)
    same = await redeem(client, key, code, "dan", order_id="o-1", amount=5_000, currency="EUR")
    assert same.json()["redeemed_at"] == done.json()["redeemed_at"]
    assert_problem(
        await redeem(client, key, code, "dan", order_id="o-2"), 409, "offer-not-redeemable"
    )
    bad = await client.post(f"/v1/offers/{code}/redeem", json={}, headers=bearer(key))
    assert_problem(bad, 422, "validation")
    listed = await client.get(
        "/v1/customers/dan/offers", params={"status": "redeemed"}, headers=bearer(key)
    )
    assert [o["code"] for o in listed.json()] == [code]


async def test_an_expired_code_is_refused(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop_ = await shop(provision)
    key = shop_.secret_key
    await known(client, key, "fay")
    await create_campaign(client, key, offer_valid_days=1)
    [offer] = (await trigger(client, key, "fay"))["offers"]
    async with tenant_tx(db, shop_.tenant.as_tenant()) as conn:
        await conn.execute("UPDATE offers SET expires_at = now() - interval '1 second'")
    assert_problem(await redeem(client, key, offer["code"], "fay"), 409, "offer-not-redeemable")
    listed = await client.get("/v1/customers/fay/offers", headers=bearer(key))
    assert listed.json()[0]["status"] == "expired"


async def test_the_redemption_budget_holds_under_50_concurrent_redemptions(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    key = (await shop(provision)).secret_key
    customers = [f"c{i}" for i in range(50)]
    await known(client, key, *customers)
    made = await create_campaign(client, key, limits={"max_redeemed": 10})
    codes = [(await trigger(client, key, c))["offers"][0]["code"] for c in customers]
    answers = await asyncio.gather(
        *(redeem(client, key, code, c) for code, c in zip(codes, customers, strict=True))
    )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 10 + [409] * 40
    campaign = await client.get(f"/v1/campaigns/{made['id']}", headers=bearer(key))
    assert campaign.json()["counts"]["redeemed"] == 10


async def test_a_purchase_with_the_code_redeems_it_and_a_whole_refund_gives_it_back(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop_ = await shop_with(client, provision, pending_days=0)
    key = shop_.secret_key
    await known(client, key, "gus")
    await create_campaign(client, key, reward={"type": "bonus_points", "points": 200})
    [offer] = (await trigger(client, key, "gus"))["offers"]
    bought = purchase("gus", "o-7", 4_000, NOW, coupon_codes=[offer["code"]])
    await send(client, key, bought)
    [now_] = (await client.get("/v1/customers/gus/offers", headers=bearer(key))).json()
    assert (now_["status"], now_["redeemed_order_id"]) == ("redeemed", "o-7")
    points = (await client.get("/v1/customers/gus/loyalty", headers=bearer(key))).json()
    assert points["available"] == 40 + 200
    await send(client, key, refund("gus", "o-7", 2_000, NOW))
    assert (await client.get("/v1/customers/gus/offers", headers=bearer(key))).json()[0][
        "status"
    ] == "redeemed"
    await send(client, key, refund("gus", "o-7", 2_000, NOW))
    assert (await client.get("/v1/customers/gus/offers", headers=bearer(key))).json()[0][
        "status"
    ] == "active"


# --- triggers through the worker ----------------------------------------------------------------

CART = {"event": "cart_abandoned", "delay_minutes": 60, "cancel_on": ["purchase"]}


async def trigger_state(db: Database, shop_: ProvisionedShop) -> list[tuple[str, str | None]]:
    async with tenant_tx(db, shop_.tenant.as_tenant()) as conn:
        rows = await conn.fetch("SELECT state, outcome FROM offer_triggers ORDER BY id")
    return [(r["state"], r["outcome"]) for r in rows]


async def test_an_abandoned_cart_is_reminded_after_the_delay_unless_a_purchase_comes_first(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop_ = await shop(provision)
    key = shop_.secret_key
    await create_campaign(client, key, trigger=CART, limits={"per_customer": 5})
    abandoned_at = NOW - timedelta(minutes=2)
    cart = touchpoint(
        unique("cart"),
        type="cart_abandoned",
        customer_id="hal",
        anonymous_id=None,
        occurred_at=iso(abandoned_at),
    )
    await send(client, key, cart)
    async with db.control() as conn:
        job = await conn.fetchrow(
            "SELECT execute_after, payload FROM sjaak.pgqueuer WHERE entrypoint = $1"
            " AND convert_from(payload, 'UTF8') LIKE $2",
            DECIDE_ENTRYPOINT,
            f"%{shop_.tenant.schema_name}%",
        )
    assert job is not None
    # Decided an hour after the cart was abandoned, not before.
    assert job["execute_after"] >= datetime.now(UTC) + timedelta(minutes=55)
    [(state, _)] = await trigger_state(db, shop_)
    assert state == "scheduled"
    async with tenant_tx(db, shop_.tenant.as_tenant()) as conn:
        trigger_id = await conn.fetchval("SELECT id FROM offer_triggers")
    assert await decide_trigger(db, shop_.tenant.as_tenant(), trigger_id) == "issued"
    assert await decide_trigger(db, shop_.tenant.as_tenant(), trigger_id) == "issued"
    offers = (await client.get("/v1/customers/hal/offers", headers=bearer(key))).json()
    assert len(offers) == 1

    # A second cart, then a purchase before the reminder is due: cancelled.
    await send(
        client,
        key,
        touchpoint(
            unique("cart"),
            type="cart_abandoned",
            customer_id="hal",
            anonymous_id=None,
            occurred_at=iso(NOW - timedelta(minutes=1)),
        ),
    )
    await send(client, key, purchase("hal", "o-1", 1_000, NOW))
    async with tenant_tx(db, shop_.tenant.as_tenant()) as conn:
        second = await conn.fetchval("SELECT max(id) FROM offer_triggers")
    assert await decide_trigger(db, shop_.tenant.as_tenant(), second) == "cancelled"
    assert len((await client.get("/v1/customers/hal/offers", headers=bearer(key))).json()) == 1


async def test_the_worker_runs_a_due_trigger(
    client: httpx.AsyncClient,
    provision: ProvisionFactory,
    db: Database,
    db_url: str,
    keyring: Keyring,
) -> None:
    shop_ = await shop(provision)
    key = shop_.secret_key
    await create_campaign(client, key, trigger={"event": "cart_abandoned"})
    cart = touchpoint(unique("cart"), type="cart_abandoned", customer_id="ivy", anonymous_id=None)
    await send(client, key, cart)
    async with running_worker(
        db, db_url, keyring, queued=[QueuedJob(DECIDE_ENTRYPOINT, decide_job)]
    ):

        async def issued() -> bool:
            return [s for s, _ in await trigger_state(db, shop_)] == ["issued"]

        await eventually(issued)
    [offer] = (await client.get("/v1/customers/ivy/offers", headers=bearer(key))).json()
    assert offer["status"] == "active"


# --- results ------------------------------------------------------------------------------------


async def test_campaign_results_match_a_hand_computed_fixture(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop_ = await shop(provision)
    key = shop_.secret_key
    made = await create_campaign(client, key)
    start = NOW - 10 * DAY
    # Treatment: 10 customers, 3 buy within the window (one twice), 1 buys too late.
    # Holdout: 5 customers, 1 buys. Offers: 10 issued, 2 redeemed.
    async with tenant_tx(db, shop_.tenant.as_tenant()) as conn:
        refs = [
            await conn.fetchval(
                "INSERT INTO customers (customer_id) VALUES ($1) RETURNING id", f"r{i}"
            )
            for i in range(15)
        ]
        for i, ref in enumerate(refs):
            arm = "treatment" if i < 10 else "holdout"
            await conn.execute(
                "INSERT INTO campaign_assignments (campaign_id, customer_ref, arm, variant,"
                " assigned_at) VALUES ($1, $2, $3, $4, $5)",
                made["id"],
                ref,
                arm,
                ("a" if i % 2 else "b") if arm == "treatment" else None,
                start,
            )
            if arm == "treatment":
                await conn.execute(
                    "INSERT INTO offers (id, campaign_id, customer_ref, code, reward, stackable,"
                    " issued_at, expires_at, redeemed_at, cause) VALUES ($1, $2, $3, $4, '{}',"
                    " false, $5, $6, $7, $1)",
                    f"ofr_{i}",
                    made["id"],
                    ref,
                    f"CODE{i}",
                    start,
                    start + 14 * DAY,
                    start + DAY if i in (1, 2) else None,
                )
        buys = [(1, 2), (1, 3), (2, 4), (3, 5), (4, 40), (10, 1)]  # (customer index, day)
        for n, (i, day) in enumerate(buys):
            await conn.execute(
                "INSERT INTO touchpoints (event_id, customer_ref, type, channel, occurred_at,"
                " received_at, amount, currency, order_id) VALUES ($1, $2, 'purchase', 'web',"
                " $3, $3, 1000, 'EUR', $1)",
                f"buy-{n}",
                refs[i],
                start + day * DAY,
            )
    response = await client.get(f"/v1/analytics/campaigns/{made['id']}", headers=bearer(key))
    assert response.status_code == 200, response.text
    body = response.json()
    treated, holdout = body["treatment"], body["holdout"]
    assert (treated["customers"], treated["issued"], treated["redeemed"]) == (10, 10, 2)
    assert (treated["converted"], treated["revenue"]) == (3, {"EUR": 4000})
    assert treated["revenue_per_customer"] == {"EUR": 400.0}
    assert (holdout["customers"], holdout["converted"], holdout["revenue"]) == (5, 1, {"EUR": 1000})
    se = math.sqrt(0.3 * 0.7 / 10 + 0.2 * 0.8 / 5)
    uplift = body["uplift"]
    assert uplift["absolute"] == pytest.approx(0.1)
    assert uplift["ci_low"] == pytest.approx(0.1 - 1.959963984540054 * se)
    assert uplift["ci_high"] == pytest.approx(0.1 + 1.959963984540054 * se)
    assert uplift["relative"] == pytest.approx(0.5)
    variants = {v["variant"]: (v["customers"], v["converted"]) for v in body["variants"]}
    assert variants == {"a": (5, 2), "b": (5, 1)}  # buyers 1 and 3 got a, buyer 2 got b
    missing = await client.get("/v1/analytics/campaigns/cmp_nope", headers=bearer(key))
    assert_problem(missing, 404, "not-found")


async def test_stackable_campaigns_are_issued_together(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    key = (await shop(provision)).secret_key
    await known(client, key, "jon")
    stack = {"stackable": True}
    first = await create_campaign(client, key, name="one", priority=2, limits=stack)
    second = await create_campaign(
        client, key, name="two", priority=1, limits=stack, reward={"type": "free_shipping"}
    )
    alone = await create_campaign(client, key, name="alone", priority=0)
    result = await trigger(client, key, "jon")
    assert [o["campaign_id"] for o in result["offers"]] == [first["id"], second["id"]]
    assert {d["campaign_id"]: d["outcome"] for d in result["decisions"]}[alone["id"]] == (
        "not_chosen"
    )


async def test_the_issue_budget_holds_under_concurrent_triggers(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    key = (await shop(provision)).secret_key
    customers = [f"k{i}" for i in range(30)]
    await known(client, key, *customers)
    made = await create_campaign(client, key, limits={"max_issued": 7})
    results = await asyncio.gather(*(trigger(client, key, c) for c in customers))
    assert sum(len(r["offers"]) for r in results) == 7
    campaign = await client.get(f"/v1/campaigns/{made['id']}", headers=bearer(key))
    assert campaign.json()["counts"]["issued"] == 7


async def test_a_trigger_can_require_touchpoint_properties_and_a_cart_value(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop_ = await shop(provision)
    key = shop_.secret_key
    await create_campaign(
        client,
        key,
        trigger={"event": "cart_abandoned", "properties": {"category": "shoes"}},
        targeting={"min_cart_value": 5_000},
        limits={"per_customer": 5},
    )

    def cart(customer_id: str, **properties: Any) -> dict[str, Any]:
        return touchpoint(
            unique("cart"),
            type="cart_abandoned",
            customer_id=customer_id,
            anonymous_id=None,
            properties=properties,
        )

    await send(
        client,
        key,
        cart("lea", category="hats", cart_value=9_000),
        cart("lea", category="shoes", cart_value=1_000),
        cart("lea", category="shoes", cart_value=6_000),
    )
    async with tenant_tx(db, shop_.tenant.as_tenant()) as conn:
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM offer_triggers ORDER BY id")]
    assert len(ids) == 2  # the hats cart does not match
    states = [await decide_trigger(db, shop_.tenant.as_tenant(), i) for i in ids]
    assert states == ["ineligible", "issued"]
    assert (await trigger_state(db, shop_))[0][1] == "cart value 1000 below 5000"


async def test_a_points_multiplier_multiplies_the_redeeming_orders_points(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop_ = await shop_with(client, provision, pending_days=0)
    key = shop_.secret_key
    await known(client, key, "max")
    await create_campaign(
        client, key, reward={"type": "points_multiplier", "multiplier_percent": 300}
    )
    [offer] = (await trigger(client, key, "max"))["offers"]
    await send(client, key, purchase("max", "o-3", 2_500, NOW, coupon_codes=[offer["code"]]))
    # 25 points for the order, and twice that again for the triple.
    points = (await client.get("/v1/customers/max/loyalty", headers=bearer(key))).json()
    assert (points["available"], points["lifetime_earned"]) == (75, 75)


async def test_merges_move_offers_and_erasure_removes_them(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop_ = await shop(provision)
    key = shop_.secret_key
    await known(client, key, "ned", "ned-old")
    await create_campaign(client, key, limits={"per_customer": 3, "stackable": True})
    await trigger(client, key, "ned")
    await trigger(client, key, "ned-old")
    merged = await client.post(
        "/v1/customers/ned/merge", json={"customer_id": "ned-old"}, headers=bearer(key)
    )
    assert merged.status_code == 200, merged.text
    assert len((await client.get("/v1/customers/ned/offers", headers=bearer(key))).json()) == 2
    erased = await client.delete("/v1/customers/ned", headers=bearer(key))
    assert erased.status_code == 200, erased.text
    async with tenant_tx(db, shop_.tenant.as_tenant()) as conn:
        for table in ("offers", "campaign_assignments", "offer_triggers"):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table


async def test_the_plan_caps_campaigns_that_have_not_ended(
    db: Database, provision: ProvisionFactory
) -> None:
    async with http_client(make_app(db, billing_plans="")) as client:  # the real plans
        key = (await shop(provision)).secret_key
        first = await create_campaign(client, key)
        refused = await client.post("/v1/campaigns", json=campaign_body(), headers=bearer(key))
        problem = assert_problem(refused, 403, "plan-limit-reached")
        assert "Free plan allows 1 campaign" in str(problem["detail"])
        ended = await client.patch(
            f"/v1/campaigns/{first['id']}", json={"status": "ended"}, headers=bearer(key)
        )
        assert ended.status_code == 200
        await create_campaign(client, key)
