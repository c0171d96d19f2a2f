"""Touchpoint ingest: validation, dedupe, time, identity, aggregates, isolation."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from api.db import Database, Tenant, tenant_tx
from tests.conftest import ProvisionFactory, bearer

NOW = datetime.now(UTC).replace(microsecond=0)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def touchpoint(event_id: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": event_id,
        "type": "page_view",
        "channel": "web",
        "occurred_at": iso(NOW - timedelta(minutes=5)),
        "anonymous_id": "anon-1",
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


async def profile(db: Database, tenant: Tenant, kind: str, value: str) -> dict[str, Any] | None:
    async with tenant_tx(db, tenant) as conn:
        row = await conn.fetchrow(
            "SELECT c.id, c.customer_id, c.email, c.touchpoint_count, c.counts_by_type,"
            " c.counts_by_channel, c.order_count, c.revenue, c.first_seen_at, c.last_seen_at,"
            " c.last_purchase_at FROM identities i JOIN customers c ON c.id = i.customer_ref"
            " WHERE i.kind = $1 AND i.value = $2",
            kind,
            value,
        )
    return dict(row) if row else None


async def send(client: httpx.AsyncClient, key: str, *items: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(
        "/v1/touchpoints/batch", json={"touchpoints": list(items)}, headers=bearer(key)
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_one_touchpoint_is_stored_once(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    first = await client.post(
        "/v1/touchpoints", json=touchpoint("evt-1"), headers=bearer(shop.secret_key)
    )
    assert first.status_code == 201, first.text
    assert first.json()["status"] == "accepted"
    again = await client.post(
        "/v1/touchpoints", json=touchpoint("evt-1"), headers=bearer(shop.secret_key)
    )
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate"
    found = await profile(db, shop.tenant.as_tenant(), "anonymous_id", "anon-1")
    assert found is not None
    assert found["touchpoint_count"] == 1


async def test_a_batch_reports_every_item(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    await send(client, shop.secret_key, touchpoint("seen-before"))
    body = await send(
        client,
        shop.secret_key,
        touchpoint("good-1"),
        touchpoint("seen-before"),
        touchpoint(
            "bad-amount",
            type="purchase",
            order={"order_id": "o1", "amount": "ten", "currency": "EUR"},
        ),
        touchpoint("good-1"),
        touchpoint("bad-type", type="clicked"),
        touchpoint("no-person", anonymous_id=None),
        touchpoint("placeholder", anonymous_id="undefined"),
        touchpoint("bad-channel", channel="pigeon"),
        touchpoint("good-2", type="x_wishlist_add", channel="mobile_app"),
    )
    statuses = [(r["index"], r["status"]) for r in body["results"]]
    assert statuses == [
        (0, "accepted"),
        (1, "duplicate"),
        (2, "rejected"),
        (3, "duplicate"),
        (4, "rejected"),
        (5, "rejected"),
        (6, "rejected"),
        (7, "rejected"),
        (8, "accepted"),
    ]
    assert (body["accepted"], body["duplicate"], body["rejected"]) == (2, 2, 5)
    errors = {r["index"]: r["errors"][0] for r in body["results"] if r["status"] == "rejected"}
    assert errors[2]["path"] == "$.order.amount"
    assert errors[4]["path"] == "$.type"
    assert errors[5]["path"] == "$"
    assert errors[6]["path"] == "$.anonymous_id"
    assert errors[7]["path"] == "$.channel"


async def test_a_bad_single_touchpoint_is_a_422_naming_the_field(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    response = await client.post(
        "/v1/touchpoints",
        json=touchpoint("e", occurred_at="yesterday"),
        headers=bearer(shop.secret_key),
    )
    assert response.status_code == 422
    assert response.json()["type"] == "/problems/validation"
    assert response.json()["errors"][0]["path"] == "$.occurred_at"


async def test_limits_are_413_naming_the_limit(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    too_many = [touchpoint(f"e{i}") for i in range(1001)]
    response = await client.post(
        "/v1/touchpoints/batch", json={"touchpoints": too_many}, headers=bearer(shop.secret_key)
    )
    assert response.status_code == 413
    assert "1,000" in response.json()["detail"]

    padding = "x" * 2000
    heavy = [touchpoint(f"h{i}", properties={"p": padding}) for i in range(600)]
    response = await client.post(
        "/v1/touchpoints/batch", json={"touchpoints": heavy}, headers=bearer(shop.secret_key)
    )
    assert response.status_code == 413
    assert response.json()["type"] == "/problems/payload-too-large"
    assert "1,048,576 bytes" in response.json()["detail"]

    huge = touchpoint("big", properties={f"k{i}": "y" * 200 for i in range(180)})
    body = await send(client, shop.secret_key, huge, touchpoint("small"))
    assert [r["status"] for r in body["results"]] == ["rejected", "accepted"]
    assert "32 KB" in body["results"][0]["errors"][0]["message"]


async def test_client_clock_skew_is_corrected(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    # The client's clock is two hours fast: it says it sent at 17:00 what happened at 16:59.
    fast = NOW + timedelta(hours=2)
    response = await client.post(
        "/v1/touchpoints",
        json=touchpoint("skewed", occurred_at=iso(fast - timedelta(minutes=1)), sent_at=iso(fast)),
        headers=bearer(shop.secret_key),
    )
    assert response.status_code == 201, response.text
    body = response.json()
    received = datetime.fromisoformat(body["received_at"])
    occurred = datetime.fromisoformat(body["occurred_at"])
    assert received - occurred == timedelta(minutes=1)
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        stored = await conn.fetchrow(
            "SELECT occurred_at, received_at FROM touchpoints WHERE event_id = 'skewed'"
        )
    assert stored["received_at"] - stored["occurred_at"] == timedelta(minutes=1)


async def test_events_far_in_the_future_are_rejected(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    body = await send(
        client,
        shop.secret_key,
        touchpoint("future", occurred_at=iso(NOW + timedelta(hours=25))),
        touchpoint("soon", occurred_at=iso(NOW + timedelta(hours=23))),
        touchpoint("backwards", occurred_at=iso(NOW), sent_at=iso(NOW - timedelta(hours=1))),
    )
    assert [r["status"] for r in body["results"]] == ["rejected", "accepted", "rejected"]
    assert body["results"][0]["errors"][0]["path"] == "$.occurred_at"
    assert body["results"][2]["errors"][0]["path"] == "$.sent_at"


async def test_a_late_event_does_not_overwrite_a_newer_trait(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    await send(
        client,
        shop.secret_key,
        touchpoint(
            "new",
            customer_id="c1",
            email="new@example.com",
            occurred_at=iso(NOW - timedelta(minutes=1)),
        ),
    )
    await send(
        client,
        shop.secret_key,
        touchpoint(
            "old",
            customer_id="c1",
            email="old@example.com",
            occurred_at=iso(NOW - timedelta(days=3)),
        ),
    )
    found = await profile(db, shop.tenant.as_tenant(), "customer_id", "c1")
    assert found is not None
    assert found["email"] == "new@example.com"
    assert found["first_seen_at"] == NOW - timedelta(days=3)
    assert found["last_seen_at"] == NOW - timedelta(minutes=1)


async def test_aggregates_follow_every_touchpoint(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    order = {"order_id": "o-1", "amount": 12950, "currency": "EUR"}
    await send(
        client,
        shop.secret_key,
        touchpoint("a", customer_id="c1", type="product_view"),
        touchpoint("b", customer_id="c1", type="product_view", channel="email"),
        touchpoint(
            "c",
            customer_id="c1",
            type="purchase",
            order=order,
            occurred_at=iso(NOW - timedelta(minutes=2)),
        ),
        touchpoint(
            "d",
            customer_id="c1",
            type="purchase",
            channel="store",
            order={**order, "order_id": "o-2", "amount": 1000},
        ),
        touchpoint("e", customer_id="c1", type="refund", order={**order, "amount": 2950}),
    )
    found = await profile(db, shop.tenant.as_tenant(), "customer_id", "c1")
    assert found is not None
    assert found["touchpoint_count"] == 5
    assert found["counts_by_type"] == {"product_view": 2, "purchase": 2, "refund": 1}
    assert found["counts_by_channel"] == {"web": 3, "email": 1, "store": 1}
    assert found["order_count"] == 2
    assert found["revenue"] == {"EUR": 12950 + 1000 - 2950}
    assert found["last_purchase_at"] == NOW - timedelta(minutes=2)


async def test_anonymous_history_joins_the_customer_before_and_after(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    tenant = shop.tenant.as_tenant()
    await send(
        client,
        shop.secret_key,
        touchpoint("v1", anonymous_id="device-9"),
        touchpoint("v2", anonymous_id="device-9", type="add_to_cart"),
    )
    anonymous = await profile(db, tenant, "anonymous_id", "device-9")
    assert anonymous is not None
    assert anonymous["customer_id"] is None

    # The visitor logs in: an event with both ids ties the device to the customer.
    await send(
        client,
        shop.secret_key,
        touchpoint("login", anonymous_id="device-9", customer_id="cust-9", type="account_created"),
    )
    # Later events under the old anonymous id still reach the customer.
    await send(client, shop.secret_key, touchpoint("v3", anonymous_id="device-9"))

    known = await profile(db, tenant, "customer_id", "cust-9")
    assert known is not None
    assert known["id"] == anonymous["id"], "the anonymous profile became the customer"
    assert known["touchpoint_count"] == 4
    async with tenant_tx(db, tenant) as conn:
        refs = await conn.fetch("SELECT DISTINCT customer_ref FROM touchpoints")
    assert [r["customer_ref"] for r in refs] == [known["id"]]


async def test_a_known_customers_device_joins_another_known_customer_only_explicitly(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    tenant = shop.tenant.as_tenant()
    await send(
        client, shop.secret_key, touchpoint("a1", anonymous_id="shared-tablet", customer_id="alice")
    )
    await send(
        client, shop.secret_key, touchpoint("b1", anonymous_id="shared-tablet", customer_id="bob")
    )
    alice = await profile(db, tenant, "customer_id", "alice")
    bob = await profile(db, tenant, "customer_id", "bob")
    assert alice is not None
    assert bob is not None
    assert alice["id"] != bob["id"], "two known customers are never merged implicitly"
    assert alice["touchpoint_count"] == 1
    assert bob["touchpoint_count"] == 1


async def test_shops_never_mix_even_with_the_same_ids(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop_a = await provision("Shop A")
    shop_b = await provision("Shop B")
    await send(client, shop_a.secret_key, touchpoint("same-event", customer_id="same-customer"))
    body = await send(
        client,
        shop_b.secret_key,
        touchpoint("same-event", customer_id="same-customer"),
        touchpoint("b-only", customer_id="same-customer"),
    )
    assert [r["status"] for r in body["results"]] == ["accepted", "accepted"]
    a = await profile(db, shop_a.tenant.as_tenant(), "customer_id", "same-customer")
    b = await profile(db, shop_b.tenant.as_tenant(), "customer_id", "same-customer")
    assert a is not None
    assert b is not None
    assert (a["touchpoint_count"], b["touchpoint_count"]) == (1, 2)


async def test_concurrent_batches_about_a_new_person_make_one_profile(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    batches = [
        [
            touchpoint(f"p{n}-{i}", customer_id="newcomer", anonymous_id=f"dev-{n}")
            for i in range(20)
        ]
        for n in range(6)
    ]
    await asyncio.gather(*(send(client, shop.secret_key, *batch) for batch in batches))
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        profiles = await conn.fetchval("SELECT count(*) FROM customers WHERE merged_into IS NULL")
        counted = await conn.fetchval("SELECT sum(touchpoint_count) FROM customers")
    assert profiles == 1
    assert counted == 120


async def test_who_may_ingest(client: httpx.AsyncClient, provision: ProvisionFactory) -> None:
    shop = await provision(allowed_origins=("https://shop.example",))
    unauthenticated = await client.post("/v1/touchpoints", json=touchpoint("x"))
    assert unauthenticated.status_code == 401
    from_browser = await client.post(
        "/v1/touchpoints",
        json=touchpoint("from-browser"),
        headers={**bearer(shop.publishable_key), "Origin": "https://shop.example"},
    )
    assert from_browser.status_code == 201, from_browser.text
    assert from_browser.headers["access-control-allow-origin"] == "https://shop.example"
    elsewhere = await client.post(
        "/v1/touchpoints",
        json=touchpoint("elsewhere"),
        headers={**bearer(shop.publishable_key), "Origin": "https://evil.example"},
    )
    assert elsewhere.status_code == 403
    restricted = await client.post(
        "/v1/api-keys",
        json={"kind": "restricted", "scopes": ["customers:read"]},
        headers=bearer(shop.secret_key),
    )
    response = await client.post(
        "/v1/touchpoints", json=touchpoint("r"), headers=bearer(restricted.json()["key"])
    )
    assert response.status_code == 403
    assert response.json()["type"] == "/problems/insufficient-scope"


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"touchpoints": 5}', b'{"items": []}'])
async def test_a_broken_envelope_is_a_clear_error(
    client: httpx.AsyncClient, provision: ProvisionFactory, body: bytes
) -> None:
    shop = await provision()
    response = await client.post(
        "/v1/touchpoints/batch",
        content=body,
        headers={**bearer(shop.secret_key), "Content-Type": "application/json"},
    )
    assert response.status_code in (400, 422)
    assert response.headers["content-type"] == "application/problem+json"


async def test_an_idempotency_key_replays_the_first_answer(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    headers = {**bearer(shop.secret_key), "Idempotency-Key": "batch-2026-11-23-001"}
    batch = {
        "touchpoints": [touchpoint("k1", customer_id="c7"), touchpoint("k2", customer_id="c7")]
    }
    first = await client.post("/v1/touchpoints/batch", json=batch, headers=headers)
    again = await client.post("/v1/touchpoints/batch", json=batch, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json(), "the replay is the first answer, not 'duplicate'"
    assert again.headers["idempotency-replayed"] == "true"
    other = await client.post(
        "/v1/touchpoints/batch",
        json={"touchpoints": [touchpoint("k3", customer_id="c7")]},
        headers=headers,
    )
    assert other.status_code == 422
    assert other.json()["type"] == "/problems/idempotency-key-reused"
    found = await profile(db, shop.tenant.as_tenant(), "customer_id", "c7")
    assert found is not None
    assert found["touchpoint_count"] == 2


async def test_the_benchmark_echo_exists_only_when_asked_for(db: Database) -> None:
    from tests.conftest import http_client, make_app

    batch = {"touchpoints": [touchpoint("e1"), touchpoint("e2", type="nope")]}
    async with http_client(make_app(db, bench_echo=True)) as echoing:
        response = await echoing.post("/_bench/echo", json=batch)
    assert response.status_code == 200
    assert [t["id"] for t in response.json()["touchpoints"]] == ["e1"]
    async with http_client(make_app(db)) as normal:
        assert (await normal.post("/_bench/echo", json=batch)).status_code == 404


async def test_deeply_nested_properties_are_rejected_per_item(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    nested: dict[str, Any] = {}
    level = nested
    for _ in range(8):
        level["deeper"] = {}
        level = level["deeper"]
    body = await send(
        client,
        shop.secret_key,
        touchpoint("deep", properties=nested),
        touchpoint("flat", properties={"a": [1, {"b": 2}]}),
    )
    assert [r["status"] for r in body["results"]] == ["rejected", "accepted"]
    assert "nested deeper" in body["results"][0]["errors"][0]["message"]
    abyss = b'{"touchpoints": [{"id": "x", "properties": ' + b"[" * 20000 + b"]" * 20000 + b"}]}"
    response = await client.post(
        "/v1/touchpoints/batch",
        content=abyss,
        headers={**bearer(shop.secret_key), "Content-Type": "application/json"},
    )
    assert response.status_code in (200, 400, 422), response.text


async def test_an_event_racing_a_merge_follows_the_survivor(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    from api.touchpoints import identity

    shop = await provision()
    tenant = shop.tenant.as_tenant()
    await send(
        client,
        shop.secret_key,
        touchpoint("r1", anonymous_id="racer"),
        touchpoint("r2", customer_id="winner", anonymous_id=None),
    )
    anonymous = await profile(db, tenant, "anonymous_id", "racer")
    survivor = await profile(db, tenant, "customer_id", "winner")
    assert anonymous is not None
    assert survivor is not None

    async with tenant_tx(db, tenant) as merging:
        await identity.absorb(merging, anonymous["id"], survivor["id"])
        # While the merge is uncommitted, an event for the anonymous id arrives.
        late = asyncio.create_task(
            send(client, shop.secret_key, touchpoint("r3", anonymous_id="racer"))
        )
        async with db.connection() as observer:
            await wait_for_lock_waiters_on_rows(observer)
        assert not late.done()
    await late

    found = await profile(db, tenant, "customer_id", "winner")
    assert found is not None
    assert found["touchpoint_count"] == 3
    async with tenant_tx(db, tenant) as conn:
        refs = await conn.fetch("SELECT DISTINCT customer_ref FROM touchpoints")
    assert [r["customer_ref"] for r in refs] == [survivor["id"]]


async def wait_for_lock_waiters_on_rows(conn: Any) -> None:
    """Poll (bounded) until some session waits on a lock: the racing ingest is blocked."""
    for _ in range(500):
        if await conn.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the racing ingest never waited for the merge")


async def test_a_visitor_who_signs_up_within_one_batch_is_one_profile(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    tenant = shop.tenant.as_tenant()
    await send(
        client, shop.secret_key, touchpoint("old", customer_id="existing", anonymous_id=None)
    )
    await send(
        client,
        shop.secret_key,
        touchpoint("s1", anonymous_id="fresh-dev"),
        touchpoint("s2", anonymous_id="fresh-dev", type="add_to_cart"),
        touchpoint(
            "s3", anonymous_id="fresh-dev", customer_id="fresh-customer", type="account_created"
        ),
        touchpoint("s4", anonymous_id="other-dev"),
        touchpoint("s5", anonymous_id="other-dev", customer_id="existing"),
        touchpoint("s6", customer_id="brand-new", anonymous_id="third-dev"),
        touchpoint("s7", anonymous_id="third-dev"),
    )
    fresh = await profile(db, tenant, "customer_id", "fresh-customer")
    existing = await profile(db, tenant, "customer_id", "existing")
    brand_new = await profile(db, tenant, "customer_id", "brand-new")
    assert fresh is not None
    assert existing is not None
    assert brand_new is not None
    assert fresh["touchpoint_count"] == 3
    assert existing["touchpoint_count"] == 3, "the new device's history joined the known customer"
    assert brand_new["touchpoint_count"] == 2
    for device, owner in (("fresh-dev", fresh), ("other-dev", existing), ("third-dev", brand_new)):
        found = await profile(db, tenant, "anonymous_id", device)
        assert found is not None
        assert found["id"] == owner["id"]
    async with tenant_tx(db, tenant) as conn:
        live = await conn.fetchval("SELECT count(*) FROM customers WHERE merged_into IS NULL")
    assert live == 3
