"""Customer profiles, trait updates and timelines, end to end over HTTP against the real database.

Ingest is not wired yet, so profiles, identities and touchpoints are seeded with plain SQL inside
the shop's tenant transaction, exactly as ingest leaves them. Every test provisions its own
shops; the isolation tests give two shops the same customer id.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from litestar import Litestar

from api.customers import profiles, timeline, traits
from api.customers.routes import CustomerController
from api.customers.schemas import TraitsUpdate
from api.customers.traits import TraitWrites, apply_writes, validated_writes
from api.db import Database, tenant_tx
from api.errors import Problem
from api.tenants.lifecycle import ProvisionedShop
from tests.conftest import ProvisionFactory, bearer, http_client, make_app
from tests.test_http import assert_problem

CUSTOMERS = "/v1/customers"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


def customer_url(customer_id: str, suffix: str = "") -> str:
    return f"{CUSTOMERS}/{customer_id}{suffix}"


# --- the app with this package's controller --------------------------------------------------

TIMELINE_ROUTE = "/v1/customers/{customer_id:str}/touchpoints"


@pytest.fixture(scope="module")
def customers_app(db: Database) -> Litestar:
    """The app with :class:`CustomerController`, whether or not ``create_app`` registers it."""
    app = make_app(db)
    if TIMELINE_ROUTE not in {route.path for route in app.routes}:
        app.register(CustomerController)
    return app


@pytest.fixture
async def api(customers_app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(customers_app) as client:
        yield client


# --- seeding, as ingest would leave the data -------------------------------------------------


@dataclass(frozen=True)
class Touch:
    event_id: str
    type: str = "page_view"
    channel: str = "web"
    occurred_at: datetime = T0
    order_id: str | None = None
    amount: int | None = None
    currency: str | None = None
    order_details: dict[str, Any] | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    anonymous_id: str | None = None


async def seed_customer(
    db: Database,
    shop: ProvisionedShop,
    customer_id: str | None,
    *,
    email: str | None = None,
    name: str | None = None,
    traits: dict[str, Any] | None = None,
    trait_times: dict[str, Any] | None = None,
    anonymous_ids: Sequence[str] = (),
    touches: Sequence[Touch] = (),
) -> int:
    """A profile with its identities, touchpoints and the aggregates ingest keeps; its id."""
    types = Counter(t.type for t in touches)
    channels = Counter(t.channel for t in touches)
    orders = [t for t in touches if t.type == "purchase"]
    revenue: Counter[str] = Counter()
    for order in orders:
        revenue[order.currency or "EUR"] += order.amount or 0
    seen = [t.occurred_at for t in touches]
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        ref: int = await conn.fetchval(
            "INSERT INTO customers (customer_id, email, name, traits, trait_times,"
            " first_seen_at, last_seen_at, touchpoint_count, counts_by_type, counts_by_channel,"
            " order_count, revenue, last_purchase_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING id",
            customer_id,
            email,
            name,
            traits or {},
            trait_times or {},
            min(seen, default=None),
            max(seen, default=None),
            len(touches),
            dict(types),
            dict(channels),
            len(orders),
            dict(revenue),
            max((o.occurred_at for o in orders), default=None),
        )
        ids = [("anonymous_id", anon) for anon in anonymous_ids]
        if customer_id is not None:
            ids.insert(0, ("customer_id", customer_id))
        for offset, (kind, value) in enumerate(ids):
            await conn.execute(
                "INSERT INTO identities (kind, value, customer_ref, created_at)"
                " VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
                kind,
                value,
                ref,
                offset,
            )
        for touch in touches:
            await conn.execute(
                "INSERT INTO touchpoints (event_id, customer_ref, type, channel, customer_id,"
                " anonymous_id, occurred_at, sent_at, received_at, email, order_id, amount,"
                " currency, order_details, properties, context)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
                touch.event_id,
                ref,
                touch.type,
                touch.channel,
                customer_id if touch.anonymous_id is None else None,
                touch.anonymous_id,
                touch.occurred_at,
                touch.occurred_at,
                touch.occurred_at + timedelta(seconds=2),
                email,
                touch.order_id,
                touch.amount,
                touch.currency,
                touch.order_details,
                touch.properties,
                {"ip": "192.0.2.1"},
            )
    return ref


async def merge_in_sql(
    db: Database, shop: ProvisionedShop, absorbed: int, survivor: int, *, repoint: bool = True
) -> None:
    """What the merge endpoint will do: mark the absorbed profile, then move its ids and its
    touchpoints to the survivor (``repoint=False``: a merge caught half-way)."""
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        await conn.execute(
            "UPDATE customers SET merged_into = $2 WHERE id = $1", absorbed, survivor
        )
        if repoint:
            for table in ("identities", "touchpoints"):
                await conn.execute(
                    f"UPDATE {table} SET customer_ref = $2 WHERE customer_ref = $1",
                    absorbed,
                    survivor,
                )


async def stored_traits(
    db: Database, shop: ProvisionedShop, ref: int
) -> tuple[dict[str, Any], dict[str, Any], str | None, str | None]:
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        row = await conn.fetchrow(
            "SELECT traits, trait_times, email, name FROM customers WHERE id = $1", ref
        )
    assert row is not None
    return row["traits"], row["trait_times"], row["email"], row["name"]


async def restricted_key(api: httpx.AsyncClient, shop: ProvisionedShop, *scopes: str) -> str:
    response = await api.post(
        "/v1/api-keys",
        json={"kind": "restricted", "scopes": list(scopes)},
        headers=bearer(shop.secret_key),
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


def error_paths(problem: dict[str, Any]) -> list[str]:
    return [error["path"] for error in problem["errors"]]


# --- reading a profile -----------------------------------------------------------------------


async def test_a_profile_shows_traits_activity_channels_and_every_id(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Profile shop"))
    customer_id = unique("cust")
    anon = unique("anon")
    await seed_customer(
        db,
        shop,
        customer_id,
        email="Ada@Example.com",
        name="Ada Lovelace",
        traits={"plan": "gold", "address": {"city": "Utrecht"}},
        anonymous_ids=[anon],
        touches=[
            Touch(unique("ev"), "page_view", "web", at(0), anonymous_id=anon),
            Touch(unique("ev"), "email_click", "email", at(10)),
            Touch(
                unique("ev"),
                "purchase",
                "web",
                at(20),
                order_id="o-1",
                amount=12950,
                currency="EUR",
            ),
            Touch(unique("ev"), "store_visit", "store", at(30)),
        ],
    )

    response = await api.get(customer_url(customer_id), headers=bearer(shop.secret_key))

    assert response.status_code == 200, response.text
    body = response.json()
    created, updated = body.pop("created_at"), body.pop("updated_at")
    assert datetime.fromisoformat(created) <= datetime.fromisoformat(updated)
    assert body == {
        "customer_id": customer_id,
        "object": "customer",
        "email": "Ada@Example.com",
        "name": "Ada Lovelace",
        "traits": {"plan": "gold", "address": {"city": "Utrecht"}},
        "first_seen_at": "2025-03-01T12:00:00Z",
        "last_seen_at": "2025-03-01T12:30:00Z",
        "touchpoint_count": 4,
        "counts_by_type": {"page_view": 1, "email_click": 1, "purchase": 1, "store_visit": 1},
        "counts_by_channel": {"web": 2, "email": 1, "store": 1},
        "channels": ["email", "store", "web"],
        "order_count": 1,
        "revenue": {"EUR": 12950},
        "last_purchase_at": "2025-03-01T12:20:00Z",
        "ids": {"customer_ids": [customer_id], "anonymous_ids": [anon]},
        "stage": "awareness",
        "rfm": None,
    }


async def test_a_channel_counted_zero_is_not_among_the_channels_used(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Channel shop"))
    customer_id = unique("cust")
    ref = await seed_customer(db, shop, customer_id, touches=[Touch(unique("ev"), channel="sms")])
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        await conn.execute(
            "UPDATE customers SET counts_by_channel = $2 WHERE id = $1", ref, {"sms": 1, "web": 0}
        )
    response = await api.get(customer_url(customer_id), headers=bearer(shop.secret_key))
    assert response.status_code == 200, response.text
    assert response.json()["channels"] == ["sms"]


async def test_a_customer_without_activity_has_empty_aggregates(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Quiet shop"))
    customer_id = unique("cust")
    await seed_customer(db, shop, customer_id)
    response = await api.get(customer_url(customer_id), headers=bearer(shop.secret_key))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["touchpoint_count"] == 0
    assert body["first_seen_at"] is None and body["last_seen_at"] is None
    assert body["channels"] == [] and body["revenue"] == {} and body["last_purchase_at"] is None
    assert body["email"] is None and body["traits"] == {}


# --- credentials and scopes ------------------------------------------------------------------

ENDPOINTS = [
    pytest.param("GET", "", None, id="get"),
    pytest.param("PATCH", "", {"set": {"plan": "gold"}}, id="patch"),
    pytest.param("GET", "/touchpoints", None, id="timeline"),
]


@pytest.mark.parametrize(("method", "suffix", "body"), [*ENDPOINTS, ("LIST", "", None)])
async def test_every_endpoint_needs_a_credential(
    db: Database,
    api: httpx.AsyncClient,
    provision: ProvisionFactory,
    method: str,
    suffix: str,
    body: dict[str, Any] | None,
) -> None:
    shop = await provision(unique("Closed shop"))
    customer_id = unique("cust")
    await seed_customer(db, shop, customer_id, email="secret@example.com")
    if method == "LIST":
        response = await api.get(CUSTOMERS)
    else:
        response = await api.request(method, customer_url(customer_id, suffix), json=body)
    assert_problem(response, 401, "unauthenticated")
    assert "secret@example.com" not in response.text


async def test_reads_need_customers_read_and_updates_need_customers_write(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Scoped shop"))
    customer_id = unique("cust")
    await seed_customer(db, shop, customer_id, email="scoped@example.com")
    reader = await restricted_key(api, shop, "customers:read")
    writer = await restricted_key(api, shop, "customers:write")
    neither = await restricted_key(api, shop, "touchpoints:write", "loyalty:read")
    patch = {"set": {"plan": "gold"}}

    for key in (writer, neither):
        for response in (
            await api.get(CUSTOMERS, headers=bearer(key)),
            await api.get(customer_url(customer_id), headers=bearer(key)),
            await api.get(customer_url(customer_id, "/touchpoints"), headers=bearer(key)),
        ):
            assert_problem(response, 403, "insufficient-scope")
            assert 'scope="customers:read"' in response.headers["www-authenticate"]
            assert "scoped@example.com" not in response.text
    for key in (reader, neither):
        response = await api.patch(customer_url(customer_id), json=patch, headers=bearer(key))
        assert_problem(response, 403, "insufficient-scope")
        assert 'scope="customers:write"' in response.headers["www-authenticate"]

    assert (await api.get(customer_url(customer_id), headers=bearer(reader))).status_code == 200
    written = await api.patch(customer_url(customer_id), json=patch, headers=bearer(writer))
    assert written.status_code == 200, written.text
    assert written.json()["traits"] == {"plan": "gold"}


async def test_a_publishable_key_cannot_read_customers(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Browser shop"))
    customer_id = unique("cust")
    await seed_customer(db, shop, customer_id)
    response = await api.get(customer_url(customer_id), headers=bearer(shop.publishable_key))
    assert_problem(response, 403, "forbidden")


# --- not found, and shop isolation -----------------------------------------------------------


@pytest.mark.parametrize(("method", "suffix", "body"), ENDPOINTS)
async def test_an_unknown_customer_is_not_found(
    api: httpx.AsyncClient,
    provision: ProvisionFactory,
    method: str,
    suffix: str,
    body: dict[str, Any] | None,
) -> None:
    shop = await provision(unique("Empty shop"))
    response = await api.request(
        method, customer_url("nobody", suffix), json=body, headers=bearer(shop.secret_key)
    )
    problem = assert_problem(response, 404, "not-found")
    assert problem["detail"] == "No customer nobody."


async def test_an_anonymous_id_is_not_a_customer_id(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Anonymous shop"))
    anon = unique("anon")
    await seed_customer(db, shop, unique("cust"), anonymous_ids=[anon])
    await seed_customer(db, shop, None, anonymous_ids=[unique("anon")])
    response = await api.get(customer_url(anon), headers=bearer(shop.secret_key))
    assert_problem(response, 404, "not-found")


async def test_an_update_never_creates_a_customer(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("No-create shop"))
    response = await api.patch(
        customer_url("ghost"), json={"set": {"plan": "gold"}}, headers=bearer(shop.secret_key)
    )
    assert_problem(response, 404, "not-found")
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        assert await conn.fetchval("SELECT count(*) FROM customers") == 0


async def test_two_shops_with_the_same_customer_id_each_see_only_their_own(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop_a = await provision(unique("Shop A"))
    shop_b = await provision(unique("Shop B"))
    shared = unique("cust")
    await seed_customer(
        db,
        shop_a,
        shared,
        email="a@example.com",
        traits={"plan": "gold"},
        touches=[Touch(unique("ev-a"), "page_view", "web", at(1))],
    )
    await seed_customer(
        db,
        shop_b,
        shared,
        email="b@example.com",
        traits={"plan": "basic"},
        touches=[Touch(unique("ev-b"), "store_visit", "store", at(2))],
    )
    only_b = unique("cust-b")
    await seed_customer(db, shop_b, only_b, email="only-b@example.com")

    seen = {}
    for shop, email in ((shop_a, "a@example.com"), (shop_b, "b@example.com")):
        headers = bearer(shop.secret_key)
        profile = (await api.get(customer_url(shared), headers=headers)).json()
        assert profile["email"] == email
        events = (await api.get(customer_url(shared, "/touchpoints"), headers=headers)).json()
        listed = (await api.get(CUSTOMERS, headers=headers)).json()
        seen[email] = (profile, events, listed)
    a_profile, a_events, a_listed = seen["a@example.com"]
    b_profile, b_events, b_listed = seen["b@example.com"]
    assert a_profile != b_profile
    assert a_profile["traits"] == {"plan": "gold"} and b_profile["traits"] == {"plan": "basic"}
    assert [e["channel"] for e in a_events["data"]] == ["web"]
    assert [e["channel"] for e in b_events["data"]] == ["store"]
    assert [c["customer_id"] for c in a_listed["data"]] == [shared]
    assert {c["customer_id"] for c in b_listed["data"]} == {shared, only_b}

    # B's other customer does not exist for A, on any endpoint, and A cannot change B's data.
    headers_a = bearer(shop_a.secret_key)
    for response in (
        await api.get(customer_url(only_b), headers=headers_a),
        await api.get(customer_url(only_b, "/touchpoints"), headers=headers_a),
        await api.patch(customer_url(only_b), json={"set": {"x": 1}}, headers=headers_a),
    ):
        assert_problem(response, 404, "not-found")
        assert "only-b@example.com" not in response.text
    changed = await api.patch(
        customer_url(shared), json={"set": {"plan": "platinum"}}, headers=headers_a
    )
    assert changed.json()["traits"] == {"plan": "platinum"}
    b_after = await api.get(customer_url(shared), headers=bearer(shop_b.secret_key))
    assert b_after.json()["traits"] == {"plan": "basic"}
    # A cursor naming B's customer is as unknown to A as any other id.
    response = await api.get(CUSTOMERS, params={"starting_after": only_b}, headers=headers_a)
    assert error_paths(assert_problem(response, 422, "validation")) == ["query.starting_after"]


# --- merged profiles -------------------------------------------------------------------------


async def test_a_merged_customer_id_leads_to_the_survivor(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Merge shop"))
    headers = bearer(shop.secret_key)
    old_id, new_id = unique("old"), unique("new")
    absorbed_event = unique("ev-old")
    absorbed = await seed_customer(
        db, shop, old_id, email="old@example.com", touches=[Touch(absorbed_event)]
    )
    survivor_event = unique("ev-new")
    survivor = await seed_customer(
        db,
        shop,
        new_id,
        email="new@example.com",
        traits={"plan": "gold"},
        touches=[Touch(survivor_event, "purchase", "web", at(5), amount=500, currency="EUR")],
    )
    await merge_in_sql(db, shop, absorbed, survivor)

    via_old = await api.get(customer_url(old_id), headers=headers)
    via_new = await api.get(customer_url(new_id), headers=headers)
    assert via_old.status_code == 200, via_old.text
    assert via_old.json() == via_new.json()
    assert via_old.json()["customer_id"] == new_id
    assert via_old.json()["email"] == "new@example.com"
    assert via_old.json()["ids"]["customer_ids"] == [old_id, new_id]

    listed = (await api.get(CUSTOMERS, headers=headers)).json()
    assert [c["customer_id"] for c in listed["data"]] == [new_id]

    events = await api.get(customer_url(old_id, "/touchpoints"), headers=headers)
    assert [e["id"] for e in events.json()["data"]] == [survivor_event, absorbed_event]

    patched = await api.patch(customer_url(old_id), json={"set": {"vip": True}}, headers=headers)
    assert patched.json()["customer_id"] == new_id
    assert (await stored_traits(db, shop, survivor))[0] == {"plan": "gold", "vip": True}
    assert (await stored_traits(db, shop, absorbed))[0] == {}


async def test_a_merge_whose_ids_are_not_re_pointed_yet_is_followed(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Half-merged shop"))
    first, middle, last = unique("first"), unique("middle"), unique("last")
    a = await seed_customer(db, shop, first)
    b = await seed_customer(db, shop, middle)
    c = await seed_customer(db, shop, last, name="Survivor")
    await merge_in_sql(db, shop, a, b, repoint=False)
    await merge_in_sql(db, shop, b, c, repoint=False)
    for customer_id in (first, middle, last):
        response = await api.get(customer_url(customer_id), headers=bearer(shop.secret_key))
        assert response.status_code == 200, response.text
        assert response.json()["customer_id"] == last
        assert response.json()["name"] == "Survivor"
    patched = await api.patch(
        customer_url(first), json={"set": {"tier": "silver"}}, headers=bearer(shop.secret_key)
    )
    assert patched.json()["traits"] == {"tier": "silver"}
    assert (await stored_traits(db, shop, c))[0] == {"tier": "silver"}


async def test_a_merge_loop_fails_loudly_instead_of_hanging(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Loop shop"))
    one, two = unique("one"), unique("two")
    a = await seed_customer(db, shop, one)
    b = await seed_customer(db, shop, two)
    await merge_in_sql(db, shop, a, b, repoint=False)
    await merge_in_sql(db, shop, b, a, repoint=False)
    response = await api.get(customer_url(one), headers=bearer(shop.secret_key))
    assert_problem(response, 500, "internal")
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        with pytest.raises(profiles.BrokenMergeChain):
            await profiles.resolve_customer_ref(conn, two)


# --- the list --------------------------------------------------------------------------------


async def seed_list_shop(db: Database, shop: ProvisionedShop) -> dict[str, str]:
    """Five known customers (one never seen), an anonymous profile and a merged one."""
    names = {
        "early": ("early@example.com", "Erik Early", 10),
        "middle": ("MID@Example.org", "Mia Middle", 20),
        "late": ("late@example.com", "Lars 100% Late", 30),
        "latest": ("latest@example.net", "Lena Latest", 40),
        "never": ("never@example.com", None, None),
    }
    ids = {}
    for label, (email, name, minute) in names.items():
        ids[label] = unique(label)
        touches = [] if minute is None else [Touch(unique("ev"), occurred_at=at(minute))]
        await seed_customer(db, shop, ids[label], email=email, name=name, touches=touches)
    await seed_customer(
        db, shop, None, email="anon@example.com", touches=[Touch(unique("ev"), occurred_at=at(50))]
    )
    gone_id = unique("gone")
    gone = await seed_customer(
        db,
        shop,
        gone_id,
        email="gone@example.com",
        touches=[Touch(unique("ev"), occurred_at=at(60))],
    )
    survivor = await seed_customer(db, shop, unique("survivor-of-gone"))
    await merge_in_sql(db, shop, gone, survivor, repoint=False)
    ids["survivor"] = (await api_id_of(db, shop, survivor)) or ""
    return ids


async def api_id_of(db: Database, shop: ProvisionedShop, ref: int) -> str | None:
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        customer_id: str | None = await conn.fetchval(
            "SELECT customer_id FROM customers WHERE id = $1", ref
        )
    return customer_id


async def list_ids(api: httpx.AsyncClient, shop: ProvisionedShop, **params: Any) -> list[str]:
    response = await api.get(CUSTOMERS, params=params, headers=bearer(shop.secret_key))
    assert response.status_code == 200, response.text
    return [c["customer_id"] for c in response.json()["data"]]


async def test_the_list_is_known_unmerged_customers_most_recently_seen_first(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("List shop"))
    ids = await seed_list_shop(db, shop)
    assert await list_ids(api, shop) == [
        ids["latest"],
        ids["late"],
        ids["middle"],
        ids["early"],
        # never seen: last, newest profile first
        ids["survivor"],
        ids["never"],
    ]


async def test_the_list_pages_without_overlap_or_gaps(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Paging shop"))
    ids = await seed_list_shop(db, shop)
    everything = await list_ids(api, shop, limit=100)
    headers = bearer(shop.secret_key)

    first = (await api.get(CUSTOMERS, params={"limit": 2}, headers=headers)).json()
    assert first["has_more"] is True
    seen = [c["customer_id"] for c in first["data"]]
    assert seen == [ids["latest"], ids["late"]]
    page = first
    while page["has_more"]:
        response = await api.get(
            CUSTOMERS, params={"limit": 2, "starting_after": seen[-1]}, headers=headers
        )
        assert response.status_code == 200, response.text
        page = response.json()
        assert 1 <= len(page["data"]) <= 2
        seen.extend(c["customer_id"] for c in page["data"])
    assert seen == everything
    assert len(seen) == len(set(seen)) == 6

    # The page boundary can be a customer without activity (in the never-seen tail).
    tail = await list_ids(api, shop, limit=5, starting_after=ids["survivor"])
    assert tail == [ids["never"]]
    # Or a profile merged away since the previous page: its place in the order still holds.
    gone_cursor = await list_ids(api, shop, starting_after=everything[0])
    assert gone_cursor == everything[1:]


async def test_the_list_filters_by_text_case_insensitively(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Search shop"))
    ids = await seed_list_shop(db, shop)
    assert await list_ids(api, shop, q="example.org") == [ids["middle"]]
    assert await list_ids(api, shop, q="mid@EXAMPLE") == [ids["middle"]]
    assert await list_ids(api, shop, q="lena lat") == [ids["latest"]]
    assert await list_ids(api, shop, q="LATE") == [ids["latest"], ids["late"]]
    # LIKE wildcards are plain characters.
    assert await list_ids(api, shop, q="100%") == [ids["late"]]
    assert await list_ids(api, shop, q="%") == [ids["late"]]
    assert await list_ids(api, shop, q="_") == []
    # Anonymous and merged profiles are not found by text either.
    assert await list_ids(api, shop, q="anon@") == []
    assert await list_ids(api, shop, q="gone@") == []


async def test_the_list_filters_by_when_customers_were_last_seen(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Recency shop"))
    ids = await seed_list_shop(db, shop)
    # Half-open: at or after `after`, strictly before `before`.
    assert await list_ids(
        api, shop, last_seen_after=rfc3339(at(20)), last_seen_before=rfc3339(at(40))
    ) == [ids["late"], ids["middle"]]
    assert await list_ids(api, shop, last_seen_after=rfc3339(at(30))) == [
        ids["latest"],
        ids["late"],
    ]
    assert await list_ids(api, shop, last_seen_before="2025-03-01T13:15:00+01:00") == [ids["early"]]
    assert await list_ids(api, shop, q="example.com", last_seen_before=rfc3339(at(35))) == [
        ids["late"],
        ids["early"],
    ]


async def test_the_stage_filter_matches_the_current_stage(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Stage shop"))
    ids = await seed_list_shop(db, shop)
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        await conn.execute(
            "UPDATE customers SET stage = 'loyalty' WHERE customer_id = $1", ids["middle"]
        )
    response = await api.get(
        CUSTOMERS, params={"stage": "loyalty"}, headers=bearer(shop.secret_key)
    )
    assert response.status_code == 200, response.text
    assert [c["customer_id"] for c in response.json()["data"]] == [ids["middle"]]
    everyone = (await api.get(CUSTOMERS, headers=bearer(shop.secret_key))).json()["data"]
    assert {c["stage"] for c in everyone} == {"awareness", "loyalty"}


@pytest.mark.parametrize(
    ("params", "path"),
    [
        pytest.param({"limit": 0}, "query.limit", id="limit-0"),
        pytest.param({"limit": 101}, "query.limit", id="limit-101"),
        pytest.param({"starting_after": "nobody"}, "query.starting_after", id="unknown-cursor"),
        pytest.param({"starting_after": ""}, "query.starting_after", id="empty-cursor"),
        pytest.param({"q": ""}, "query.q", id="empty-q"),
        pytest.param({"q": "x" * 101}, "query.q", id="long-q"),
        pytest.param({"last_seen_after": "yesterday"}, "query.last_seen_after", id="bad-time"),
        pytest.param(
            {"last_seen_before": "2025-03-01T12:00:00"}, "query.last_seen_before", id="naive"
        ),
        pytest.param(
            {"last_seen_after": "2025-03-02T00:00:00Z", "last_seen_before": "2025-03-01T00:00:00Z"},
            "query.last_seen_before",
            id="before-not-after-after",
        ),
        pytest.param({"stage": "bored"}, "query.stage", id="unknown-stage"),
    ],
)
async def test_bad_list_parameters_are_422_naming_the_parameter(
    api: httpx.AsyncClient, provision: ProvisionFactory, params: dict[str, Any], path: str
) -> None:
    shop = await provision(unique("Strict shop"))
    response = await api.get(CUSTOMERS, params=params, headers=bearer(shop.secret_key))
    assert error_paths(assert_problem(response, 422, "validation")) == [path]


# --- trait updates ---------------------------------------------------------------------------


async def test_set_overwrites_and_set_once_only_fills_absent_traits(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Traits shop"))
    customer_id = unique("cust")
    event_time = "2025-03-01T12:00:00Z"
    ref = await seed_customer(
        db,
        shop,
        customer_id,
        email="old@example.com",
        name="Old Name",
        traits={"plan": "basic", "source": "ads", "nickname": None, "email": "old@example.com"},
        trait_times={"plan": event_time, "source": event_time, "email": event_time},
    )
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        before: datetime = await conn.fetchval("SELECT now()")

    response = await api.patch(
        customer_url(customer_id),
        json={
            "set": {"plan": "gold", "address": {"city": "Kraków", "zip": "30-001"}},
            "set_once": {"source": "referral", "first_order": "o-1", "nickname": "Ada"},
        },
        headers=bearer(shop.secret_key),
    )

    assert response.status_code == 200, response.text
    body = response.json()
    expected = {
        "plan": "gold",
        "address": {"city": "Kraków", "zip": "30-001"},
        "source": "ads",  # present: set_once leaves it
        "nickname": None,  # present (as null): set_once leaves it too
        "first_order": "o-1",  # absent: set_once fills it
        "email": "old@example.com",
    }
    assert body["traits"] == expected
    assert body["email"] == "old@example.com" and body["name"] == "Old Name"
    assert datetime.fromisoformat(body["updated_at"]) >= before
    stored, times, _, _ = await stored_traits(db, shop, ref)
    assert stored == expected
    # Written keys are stamped with this request's time; the others keep the event's time.
    assert set(times) == {"plan", "source", "email", "address", "first_order"}
    assert times["source"] == times["email"] == event_time
    stamps = {datetime.fromisoformat(times[key]) for key in ("plan", "address", "first_order")}
    assert len(stamps) == 1
    assert stamps.pop() >= before


async def test_email_and_name_traits_update_the_profile_columns(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Columns shop"))
    customer_id = unique("cust")
    ref = await seed_customer(db, shop, customer_id, email="old@example.com")
    headers = bearer(shop.secret_key)

    renamed = await api.patch(
        customer_url(customer_id),
        json={"set": {"email": "New@Example.com"}, "set_once": {"name": "Ada"}},
        headers=headers,
    )
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["email"] == "New@Example.com"
    assert renamed.json()["name"] == "Ada"
    assert (await stored_traits(db, shop, ref))[2:] == ("New@Example.com", "Ada")
    # Searchable by the new address at once.
    assert await list_ids(api, shop, q="new@example") == [customer_id]

    # set_once does not replace a name the customer has; set can clear the e-mail address.
    again = await api.patch(
        customer_url(customer_id),
        json={"set": {"email": None}, "set_once": {"name": "Someone Else"}},
        headers=headers,
    )
    assert again.json()["email"] is None and again.json()["name"] == "Ada"
    assert again.json()["traits"] == {"email": None, "name": "Ada"}


async def test_an_update_that_writes_nothing_changes_nothing(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Idle shop"))
    customer_id = unique("cust")
    ref = await seed_customer(db, shop, customer_id, traits={"plan": "gold"}, trait_times={})
    before = (await api.get(customer_url(customer_id), headers=bearer(shop.secret_key))).json()
    response = await api.patch(
        customer_url(customer_id),
        json={"set_once": {"plan": "basic"}},
        headers=bearer(shop.secret_key),
    )
    assert response.json() == before
    assert (await stored_traits(db, shop, ref))[:2] == ({"plan": "gold"}, {})


async def test_concurrent_set_once_updates_agree_on_one_winner(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    """The profile row is locked for the update, so exactly one `set_once` fills the trait and
    every response shows that winner."""
    shop = await provision(unique("Racing shop"))
    customer_id = unique("cust")
    ref = await seed_customer(db, shop, customer_id)
    responses = await asyncio.gather(
        *(
            api.patch(
                customer_url(customer_id),
                json={"set_once": {"referrer": f"r{index}"}, "set": {f"seen_{index}": True}},
                headers=bearer(shop.secret_key),
            )
            for index in range(6)
        )
    )
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    winners = {r.json()["traits"]["referrer"] for r in responses}
    assert len(winners) == 1
    stored = (await stored_traits(db, shop, ref))[0]
    assert stored["referrer"] == winners.pop()
    assert {key for key in stored if key.startswith("seen_")} == {f"seen_{i}" for i in range(6)}


def many(count: int, prefix: str = "t") -> dict[str, int]:
    return {f"{prefix}{index}": index for index in range(count)}


@pytest.mark.parametrize(
    ("body", "paths"),
    [
        pytest.param({}, ["$"], id="empty-body"),
        pytest.param({"set": {}}, ["$"], id="no-traits"),
        pytest.param({"set": None, "set_once": {}}, ["$"], id="null-and-empty"),
        pytest.param({"unset": ["plan"]}, ["$"], id="unknown-field"),
        pytest.param({"set": ["plan"]}, ["$.set"], id="set-not-an-object"),
        pytest.param({"set": many(60), "set_once": many(41, "u")}, ["$"], id="101-traits"),
        pytest.param({"set": {"blob": "x" * 16_400}}, ["$"], id="over-16kb"),
        pytest.param(
            {"set": {"Plan": 1, "ok": 2, "2fa": 3, "a-b": 4, "x" * 65: 5}},
            ['$.set["Plan"]', '$.set["2fa"]', '$.set["a-b"]', f'$.set["{"x" * 65}"]'],
            id="bad-names",
        ),
        pytest.param({"set_once": {"tags": ["a", "b"]}}, ["$.set_once.tags"], id="array-value"),
        pytest.param(
            {"set": {"plan": "gold", "tier": 1}, "set_once": {"tier": 2, "plan": "basic"}},
            ["$.set_once.plan", "$.set_once.tier"],
            id="in-both",
        ),
        pytest.param(
            {"set": {"email": 42}, "set_once": {"name": ""}},
            ["$.set.email", "$.set_once.name"],
            id="email-and-name-not-strings",
        ),
        pytest.param({"set": {"email": "x" * 321}}, ["$.set.email"], id="email-too-long"),
    ],
)
async def test_an_invalid_update_is_422_naming_each_failing_trait(
    db: Database,
    api: httpx.AsyncClient,
    provision: ProvisionFactory,
    body: dict[str, Any],
    paths: list[str],
) -> None:
    shop = await provision(unique("Validating shop"))
    customer_id = unique("cust")
    ref = await seed_customer(db, shop, customer_id, traits={"plan": "basic"})
    response = await api.patch(
        customer_url(customer_id), json=body, headers=bearer(shop.secret_key)
    )
    assert error_paths(assert_problem(response, 422, "validation")) == paths
    assert (await stored_traits(db, shop, ref))[:2] == ({"plan": "basic"}, {})


async def test_the_limits_themselves_are_accepted(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Roomy shop"))
    customer_id = unique("cust")
    await seed_customer(db, shop, customer_id)
    longest = "k" + "x" * 63
    body = {"set": {**many(99), longest: {"nested": [1, {"deep": True}]}}}
    response = await api.patch(
        customer_url(customer_id), json=body, headers=bearer(shop.secret_key)
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["traits"]) == 100


# --- the timeline ----------------------------------------------------------------------------


async def seed_timeline(db: Database, shop: ProvisionedShop, customer_id: str) -> list[Touch]:
    """Seven touchpoints over three channels; two share an occurred_at (the later insert is
    listed first)."""
    touches = [
        Touch(unique("ev1"), "page_view", "web", at(0), anonymous_id="anon-1"),
        Touch(unique("ev2"), "product_view", "web", at(5)),
        Touch(unique("ev3"), "email_click", "email", at(10)),
        Touch(
            unique("ev4"),
            "purchase",
            "web",
            at(20),
            order_id="o-1",
            amount=4999,
            currency="EUR",
            order_details={"items": 2, "coupon": "WELCOME", "amount": "ignored"},
            properties={"path": "/checkout"},
        ),
        Touch(unique("ev5"), "store_visit", "store", at(20)),
        Touch(unique("ev6"), "page_view", "web", at(30)),
        Touch(unique("ev7"), "email_open", "email", at(40)),
    ]
    await seed_customer(db, shop, customer_id, touches=touches, anonymous_ids=["anon-1"])
    return touches


async def timeline_ids(
    api: httpx.AsyncClient, shop: ProvisionedShop, customer_id: str, **params: Any
) -> list[str]:
    response = await api.get(
        customer_url(customer_id, "/touchpoints"), params=params, headers=bearer(shop.secret_key)
    )
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["data"]]


async def test_the_timeline_is_newest_first_with_every_field(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Timeline shop"))
    customer_id = unique("cust")
    touches = await seed_timeline(db, shop, customer_id)
    await seed_customer(db, shop, unique("other"), touches=[Touch(unique("not-mine"))])
    ids = [t.event_id for t in touches]

    response = await api.get(
        customer_url(customer_id, "/touchpoints"), headers=bearer(shop.secret_key)
    )
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["has_more"] is False
    assert [t["id"] for t in page["data"]] == [
        ids[6],
        ids[5],
        ids[4],
        ids[3],
        ids[2],
        ids[1],
        ids[0],
    ]
    by_id = {t["id"]: t for t in page["data"]}
    assert by_id[ids[3]] == {
        "id": ids[3],
        "object": "touchpoint",
        "type": "purchase",
        "channel": "web",
        "occurred_at": "2025-03-01T12:20:00Z",
        "received_at": "2025-03-01T12:20:02Z",
        "sent_at": "2025-03-01T12:20:00Z",
        "customer_id": customer_id,
        "anonymous_id": None,
        "email": None,
        "order": {
            "order_id": "o-1",
            "amount": 4999,
            "currency": "EUR",
            "items": 2,
            "coupon": "WELCOME",
        },
        "properties": {"path": "/checkout"},
        "context": {"ip": "192.0.2.1"},
    }
    earliest = by_id[ids[0]]
    assert earliest["order"] is None
    assert earliest["anonymous_id"] == "anon-1" and earliest["customer_id"] is None


async def test_the_timeline_pages_without_overlap_or_gaps(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Timeline paging shop"))
    customer_id = unique("cust")
    await seed_timeline(db, shop, customer_id)
    everything = await timeline_ids(api, shop, customer_id, limit=100)
    headers = bearer(shop.secret_key)
    url = customer_url(customer_id, "/touchpoints")

    seen: list[str] = []
    pages = []
    params: dict[str, Any] = {"limit": 3}
    while True:
        page = (await api.get(url, params=params, headers=headers)).json()
        pages.append(len(page["data"]))
        seen.extend(t["id"] for t in page["data"])
        if not page["has_more"]:
            break
        params["starting_after"] = seen[-1]
    assert pages == [3, 3, 1]
    assert seen == everything
    assert len(set(seen)) == 7


async def test_the_timeline_filters_by_type_channel_and_time(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Timeline filter shop"))
    customer_id = unique("cust")
    ids = [t.event_id for t in await seed_timeline(db, shop, customer_id)]
    assert await timeline_ids(api, shop, customer_id, type="page_view") == [ids[5], ids[0]]
    assert await timeline_ids(api, shop, customer_id, channel="email") == [ids[6], ids[2]]
    assert await timeline_ids(api, shop, customer_id, channel="sms") == []
    assert await timeline_ids(api, shop, customer_id, type="x_unboxing") == []
    # Half-open: at or after `after`, strictly before `before`.
    assert await timeline_ids(
        api, shop, customer_id, occurred_after=rfc3339(at(10)), occurred_before=rfc3339(at(30))
    ) == [ids[4], ids[3], ids[2]]
    assert await timeline_ids(
        api, shop, customer_id, channel="web", occurred_after="2025-03-01T13:20:00+01:00"
    ) == [ids[5], ids[3]]
    # Filters and the cursor combine.
    assert await timeline_ids(
        api, shop, customer_id, channel="web", starting_after=ids[5], limit=1
    ) == [ids[3]]


@pytest.mark.parametrize(
    ("params", "path"),
    [
        pytest.param({"limit": 0}, "query.limit", id="limit-0"),
        pytest.param({"starting_after": "no-such-event"}, "query.starting_after", id="cursor"),
        pytest.param({"channel": "pigeon"}, "query.channel", id="unknown-channel"),
        pytest.param({"type": ""}, "query.type", id="empty-type"),
        pytest.param({"occurred_after": "2025-13-01T00:00:00Z"}, "query.occurred_after", id="bad"),
        pytest.param({"occurred_before": "2025-03-01"}, "query.occurred_before", id="date-only"),
        pytest.param(
            {"occurred_after": "2025-03-01T12:00:00Z", "occurred_before": "2025-03-01T12:00:00Z"},
            "query.occurred_before",
            id="empty-range",
        ),
    ],
)
async def test_bad_timeline_parameters_are_422_naming_the_parameter(
    db: Database,
    api: httpx.AsyncClient,
    provision: ProvisionFactory,
    params: dict[str, Any],
    path: str,
) -> None:
    shop = await provision(unique("Strict timeline shop"))
    customer_id = unique("cust")
    await seed_customer(db, shop, customer_id, touches=[Touch(unique("ev"))])
    response = await api.get(
        customer_url(customer_id, "/touchpoints"), params=params, headers=bearer(shop.secret_key)
    )
    assert error_paths(assert_problem(response, 422, "validation")) == [path]


async def test_a_cursor_from_another_customers_timeline_is_422(
    db: Database, api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Cursor shop"))
    mine, theirs = unique("mine"), unique("theirs")
    await seed_customer(db, shop, mine, touches=[Touch(unique("ev"))])
    their_event = unique("their-ev")
    await seed_customer(db, shop, theirs, touches=[Touch(their_event)])
    response = await api.get(
        customer_url(mine, "/touchpoints"),
        params={"starting_after": their_event},
        headers=bearer(shop.secret_key),
    )
    problem = assert_problem(response, 422, "validation")
    assert problem["errors"] == [
        {"path": "query.starting_after", "message": "no such touchpoint for this customer"}
    ]


# --- the SQL, checked against a migrated shop schema -----------------------------------------


async def test_every_query_prepares_against_a_shop_schema(
    db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Prepared shop"))
    queries = {
        f"{module.__name__}.{name}": value
        for module in (profiles, traits, timeline)
        for name, value in vars(module).items()
        if name.endswith("_SQL") and isinstance(value, str)
    }
    assert len(queries) >= 8
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        for name, sql in queries.items():
            assert "*" not in sql.replace("/*", "").replace("*/", ""), name
            assert "shop_" not in sql and "sjaak." not in sql, name
            await conn.prepare(sql)


# --- the trait rules, without a database -----------------------------------------------------


def writes(
    set_: dict[str, Any] | None = None, set_once: dict[str, Any] | None = None
) -> TraitWrites:
    return validated_writes(TraitsUpdate(set_=set_, set_once=set_once))


def test_set_once_fills_only_absent_keys_and_stamps_only_what_it_writes() -> None:
    change = apply_writes(
        {"a": 1, "b": None},
        {"a": "2025-01-01T00:00:00Z"},
        writes(set_={"c": 3}, set_once={"a": 9, "b": 9, "d": 4}),
        T0,
    )
    assert change.traits == {"a": 1, "b": None, "c": 3, "d": 4}
    assert change.written == {"c": 3, "d": 4}
    assert change.trait_times == {"a": "2025-01-01T00:00:00Z", "c": T0, "d": T0}


def test_set_overwrites_and_restamps() -> None:
    change = apply_writes({"a": 1}, {"a": "2099-01-01T00:00:00Z"}, writes(set_={"a": 2}), T0)
    assert change.traits == {"a": 2}
    assert change.trait_times == {"a": T0}


def test_validation_reports_a_key_in_both_maps_once() -> None:
    with pytest.raises(Problem) as caught:
        writes(set_={"a": 1}, set_once={"a": 2})
    assert [e.path for e in caught.value.errors or []] == ["$.set_once.a"]
