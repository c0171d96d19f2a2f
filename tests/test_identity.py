"""Identify, merge, erasure and export, over HTTP against a real database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from api.db import Database, tenant_tx
from api.tenants.export import NOT_EXPORTED, export_shop
from tests.conftest import ProvisionFactory, bearer
from tests.test_touchpoints import send, touchpoint


async def identify(
    client: httpx.AsyncClient, key: str, anonymous_id: str, customer_id: str, **extra: Any
) -> httpx.Response:
    return await client.post(
        "/v1/customers/identify",
        json={"anonymous_id": anonymous_id, "customer_id": customer_id, **extra},
        headers=bearer(key),
    )


async def customer(client: httpx.AsyncClient, key: str, customer_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/customers/{customer_id}", headers=bearer(key))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_identify_after_the_anonymous_events(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    key = shop.secret_key
    await send(
        client,
        key,
        touchpoint("a1", anonymous_id="dev-1"),
        touchpoint("a2", anonymous_id="dev-1", type="product_view"),
    )
    response = await identify(
        client,
        key,
        "dev-1",
        "cust-1",
        traits={"set": {"name": "Anna", "email": "anna@example.com"}},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["touchpoint_count"] == 2
    assert body["name"] == "Anna"
    assert body["ids"]["anonymous_ids"] == ["dev-1"]
    # Repeating it changes nothing.
    again = await identify(client, key, "dev-1", "cust-1")
    assert again.status_code == 200
    assert again.json()["touchpoint_count"] == 2
    # A later event under the anonymous id reaches the customer.
    await send(client, key, touchpoint("a3", anonymous_id="dev-1"))
    assert (await customer(client, key, "cust-1"))["touchpoint_count"] == 3


async def test_identify_before_the_anonymous_events(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    key = shop.secret_key
    response = await identify(client, key, "dev-2", "cust-2")
    assert response.status_code == 200
    assert response.json()["touchpoint_count"] == 0
    await send(
        client, key, touchpoint("b1", anonymous_id="dev-2"), touchpoint("b2", anonymous_id="dev-2")
    )
    found = await customer(client, key, "cust-2")
    assert found["touchpoint_count"] == 2
    timeline = await client.get("/v1/customers/cust-2/touchpoints", headers=bearer(key))
    assert [t["id"] for t in timeline.json()["data"]] == ["b2", "b1"]


@pytest.mark.parametrize("placeholder", ["", "null", "undefined", "0", "anonymous", "NULL"])
async def test_placeholder_ids_are_rejected(
    client: httpx.AsyncClient, provision: ProvisionFactory, placeholder: str
) -> None:
    shop = await provision()
    response = await identify(client, shop.secret_key, placeholder, "cust-3")
    assert response.status_code == 422
    assert response.json()["errors"][0]["path"] == "$.anonymous_id"
    response = await identify(client, shop.secret_key, "dev-3", placeholder)
    assert response.status_code == 422
    assert response.json()["errors"][0]["path"] == "$.customer_id"


async def test_two_known_customers_are_never_merged_by_identify(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    key = shop.secret_key
    await send(client, key, touchpoint("k1", anonymous_id="tablet", customer_id="alice"))
    await send(client, key, touchpoint("k2", customer_id="bob"))
    response = await identify(client, key, "tablet", "bob")
    assert response.status_code == 409
    assert response.json()["type"] == "/problems/conflict"
    assert (await customer(client, key, "alice"))["touchpoint_count"] == 1
    assert (await customer(client, key, "bob"))["touchpoint_count"] == 1


async def test_merge_keeps_the_absorbed_id_resolving(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    key = shop.secret_key
    order = {"order_id": "o1", "amount": 500, "currency": "EUR"}
    await send(
        client,
        key,
        touchpoint(
            "m1", customer_id="old-account", type="purchase", order=order, email="old@example.com"
        ),
    )
    await send(client, key, touchpoint("m2", customer_id="new-account"))
    response = await client.post(
        "/v1/customers/new-account/merge",
        json={"customer_id": "old-account"},
        headers=bearer(key),
    )
    assert response.status_code == 200, response.text
    merged = response.json()
    assert merged["touchpoint_count"] == 2
    assert merged["order_count"] == 1
    assert merged["revenue"] == {"EUR": 500}
    assert merged["email"] == "old@example.com", "missing traits are filled from the absorbed"
    # Read and write through the absorbed id both reach the survivor.
    via_old = await customer(client, key, "old-account")
    assert via_old["touchpoint_count"] == 2
    await send(client, key, touchpoint("m3", customer_id="old-account"))
    assert (await customer(client, key, "new-account"))["touchpoint_count"] == 3

    missing = await client.post(
        "/v1/customers/new-account/merge", json={"customer_id": "nobody"}, headers=bearer(key)
    )
    assert missing.status_code == 422
    unknown = await client.post(
        "/v1/customers/nobody/merge", json={"customer_id": "new-account"}, headers=bearer(key)
    )
    assert unknown.status_code == 404


_ERASURE_NOTICE = {("outbox", "erase-me")}


async def test_erasure_leaves_no_row_of_the_person_and_suppresses_them(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    key = shop.secret_key
    order = {"order_id": "order-77", "amount": 2500, "currency": "EUR"}
    await send(
        client,
        key,
        touchpoint("e1", anonymous_id="erase-dev", properties={"note": "erase-dev was here"}),
        touchpoint(
            "e2",
            anonymous_id="erase-dev",
            customer_id="erase-me",
            email="erase@example.com",
            type="purchase",
            order=order,
        ),
    )
    await identify(
        client, key, "erase-dev-2", "erase-me", traits={"set": {"name": "Erin Erasable"}}
    )
    await send(client, key, touchpoint("keep", customer_id="someone-else"))

    response = await client.delete("/v1/customers/erase-me", headers=bearer(key))
    assert response.status_code == 200, response.text
    assert response.json()["accounting_records_kept"] == 1

    secrets = ["erase-me", "erase-dev", "erase-dev-2", "erase@example.com", "Erin Erasable"]
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        tables = [
            r["relname"]
            for r in await conn.fetch(
                "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace"
                " AND relkind = 'r'"
            )
        ]
        for table in tables:
            for secret in secrets:
                found = await conn.fetchval(
                    f"SELECT count(*) FROM {table} t WHERE t::text ILIKE '%' || $1 || '%'", secret
                )
                assert found == 0 or (table, secret) in _ERASURE_NOTICE, (
                    f"{secret!r} is still in {table}"
                )
        # The one exception: the shop's own id in the customer.deleted event, so that the shop's
        # systems can erase the person too; it is pruned with the other webhook events.
        notice = await conn.fetch("SELECT type, payload FROM outbox")
        assert [(r["type"], r["payload"]) for r in notice] == [
            ("customer.deleted", {"customer_ids": ["erase-me"]})
        ]
        kept = await conn.fetchrow(
            "SELECT order_id, amount, currency FROM touchpoints WHERE type = 'purchase'"
        )
    assert dict(kept) == {"order_id": "order-77", "amount": 2500, "currency": "EUR"}

    assert (await client.get("/v1/customers/erase-me", headers=bearer(key))).status_code == 404
    body = await send(
        client,
        key,
        touchpoint("again", customer_id="erase-me"),
        touchpoint("again-anon", anonymous_id="erase-dev"),
    )
    assert [r["status"] for r in body["results"]] == ["rejected", "rejected"]
    assert (await client.get("/v1/customers/erase-me", headers=bearer(key))).status_code == 404
    assert (await customer(client, key, "someone-else"))["touchpoint_count"] == 1


async def test_export_returns_everything_held(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    key = shop.secret_key
    await send(
        client,
        key,
        touchpoint("x1", anonymous_id="exp-dev"),
        touchpoint("x2", customer_id="exp-1", anonymous_id="exp-dev"),
    )
    response = await client.get("/v1/customers/exp-1/export", headers=bearer(key))
    assert response.status_code == 200
    body = response.json()
    assert {i["value"] for i in body["identities"]} == {"exp-1", "exp-dev"}
    assert [t["event_id"] for t in body["touchpoints"]] == ["x1", "x2"]
    assert body["profiles"][0]["customer_id"] == "exp-1"
    other = await provision("Other shop")
    assert (
        await client.get("/v1/customers/exp-1/export", headers=bearer(other.secret_key))
    ).status_code == 404


async def test_identity_routes_need_their_scopes(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    restricted = await client.post(
        "/v1/api-keys",
        json={"kind": "restricted", "scopes": ["customers:read"]},
        headers=bearer(shop.secret_key),
    )
    reader = restricted.json()["key"]
    assert (await identify(client, reader, "d", "c")).status_code == 403
    assert (await client.delete("/v1/customers/c", headers=bearer(reader))).status_code == 403
    assert (await client.post("/v1/customers/identify", json={})).status_code == 401


async def test_a_whole_shop_exports_to_json_lines(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database, tmp_path: Path
) -> None:
    shop = await provision()
    await send(
        client,
        shop.secret_key,
        touchpoint("s1", customer_id="c1", anonymous_id=None),
        touchpoint("s2", anonymous_id="d1"),
    )
    manifest = await export_shop(db, shop.tenant, tmp_path)
    assert {
        name: count
        for name, count in manifest["files"].items()
        if name in ("customers.jsonl", "identities.jsonl", "touchpoints.jsonl")
    } == {"customers.jsonl": 2, "identities.jsonl": 2, "touchpoints.jsonl": 2}
    # Every table of the shop is exported but the transient ones: a new table is not forgotten.
    async with db.control() as conn:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
            shop.tenant.schema_name,
        )
    assert {f"{r['table_name']}.jsonl" for r in tables} - {
        f"{name}.jsonl" for name in NOT_EXPORTED
    } == set(manifest["files"])
    lines = (tmp_path / shop.tenant.schema_name / "touchpoints.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert '"event_id":"s1"' in lines[0]
