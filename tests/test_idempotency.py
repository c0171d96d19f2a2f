"""Idempotency-Key: a retried request does its work once, on real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar, Request, post

from api.db import Database, Tenant, TenantConn, tenant_tx
from api.errors import PROBLEM_TYPES, Problem
from api.idempotency import (
    IDEMPOTENCY_HEADER,
    StoredResponse,
    idempotency_key,
    prune_expired_keys,
    replay_headers,
    run_idempotent,
)
from tests.conftest import ProvisionFactory, http_client, make_app
from tests.test_http import assert_problem

ROUTE = "POST /v1/customers"
# The shop's own database, seen from outside the transaction under test.
WAITING_FOR_ADVISORY_LOCK = """
SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory' AND NOT granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


class CreateCustomer:
    """A ``work`` that adds one customer; ``customer_id`` is unique, so running twice fails."""

    def __init__(self, customer_id: str, *, status: int = 201) -> None:
        self.customer_id = customer_id
        self.status = status
        self.calls = 0

    async def __call__(self, conn: TenantConn) -> tuple[int, bytes]:
        self.calls += 1
        row_id = await conn.fetchval(
            "INSERT INTO customers (customer_id) VALUES ($1) RETURNING id", self.customer_id
        )
        return self.status, msgspec.json.encode({"id": row_id, "customer_id": self.customer_id})


def body_of(customer_id: str) -> bytes:
    return msgspec.json.encode({"customer_id": customer_id})


async def create(
    db: Database, tenant: Tenant, work: CreateCustomer, key: str | None, route: str = ROUTE
) -> StoredResponse:
    return await run_idempotent(
        db, tenant, key=key, route=route, request_body=body_of(work.customer_id), work=work
    )


async def count(db: Database, tenant: Tenant, sql: str, *args: object) -> int:
    async with tenant_tx(db, tenant) as conn:
        found: int = await conn.fetchval(sql, *args)
        return found


async def customers(db: Database, tenant: Tenant, customer_id: str) -> int:
    return await count(
        db, tenant, "SELECT count(*) FROM customers WHERE customer_id = $1", customer_id
    )


async def stored_keys(db: Database, tenant: Tenant, key: str) -> int:
    return await count(db, tenant, "SELECT count(*) FROM idempotency_keys WHERE key = $1", key)


@pytest.fixture
async def shop(provision: ProvisionFactory) -> Tenant:
    return (await provision("Idempotent shop")).tenant.as_tenant()


async def test_without_a_key_work_runs_every_time(db: Database, shop: Tenant) -> None:
    first = await create(db, shop, CreateCustomer("no-key-1"), key=None)
    second = await create(db, shop, CreateCustomer("no-key-2"), key=None)

    assert (first.status, first.replayed) == (201, False)
    assert (second.status, second.replayed) == (201, False)
    assert await customers(db, shop, "no-key-1") == 1
    assert await customers(db, shop, "no-key-2") == 1
    assert replay_headers(first) == {}


async def test_a_replay_returns_the_first_response_without_running_work(
    db: Database, shop: Tenant
) -> None:
    work = CreateCustomer("replayed")
    first = await create(db, shop, work, key="key-replay")
    again = await create(db, shop, work, key="key-replay")

    assert work.calls == 1
    assert first == StoredResponse(201, first.body, replayed=False)
    assert again == StoredResponse(201, first.body, replayed=True)
    assert msgspec.json.decode(again.body)["customer_id"] == "replayed"
    assert await customers(db, shop, "replayed") == 1
    assert replay_headers(again) == {"Idempotency-Replayed": "true"}


async def test_the_same_key_with_another_body_is_refused(db: Database, shop: Tenant) -> None:
    await create(db, shop, CreateCustomer("original"), key="key-body")
    other = CreateCustomer("different")

    with pytest.raises(Problem) as refused:
        await create(db, shop, other, key="key-body")

    assert (refused.value.slug, refused.value.status) == ("idempotency-key-reused", 422)
    assert other.calls == 0
    assert await customers(db, shop, "different") == 0


async def test_the_same_key_on_another_route_is_refused(db: Database, shop: Tenant) -> None:
    work = CreateCustomer("routed")
    await create(db, shop, work, key="key-route")

    with pytest.raises(Problem) as refused:
        await create(db, shop, work, key="key-route", route="POST /v1/campaigns")

    assert (refused.value.slug, refused.value.status) == ("idempotency-key-reused", 422)
    assert work.calls == 1


async def test_concurrent_requests_with_one_key_run_work_once(db: Database, shop: Tenant) -> None:
    work = CreateCustomer("concurrent")

    async def work_while_the_other_request_queues(conn: TenantConn) -> tuple[int, bytes]:
        # Proves the overlap: the first request finishes only once the second is blocked on the
        # key's lock. Were there no lock, the second would run work too and the insert fail.
        if work.calls == 0:
            await asyncio.wait_for(someone_waits_for_an_advisory_lock(db), timeout=5)
        return await work(conn)

    results = await asyncio.gather(
        *(
            run_idempotent(
                db,
                shop,
                key="key-concurrent",
                route=ROUTE,
                request_body=body_of("concurrent"),
                work=work_while_the_other_request_queues,
            )
            for _ in range(2)
        )
    )

    assert work.calls == 1
    assert results[0].body == results[1].body
    assert sorted(result.replayed for result in results) == [False, True]
    assert await customers(db, shop, "concurrent") == 1


async def someone_waits_for_an_advisory_lock(db: Database) -> None:
    async with db.connection() as raw:
        while not await raw.fetchval(WAITING_FOR_ADVISORY_LOCK):
            pass  # each query yields to the event loop, so the other request gets to queue


async def test_failing_work_stores_nothing_and_may_be_retried(db: Database, shop: Tenant) -> None:
    class Boom(Exception):
        pass

    async def insert_then_fail(conn: TenantConn) -> tuple[int, bytes]:
        await CreateCustomer("flaky")(conn)
        raise Boom

    with pytest.raises(Boom):
        await run_idempotent(
            db,
            shop,
            key="key-flaky",
            route=ROUTE,
            request_body=body_of("flaky"),
            work=insert_then_fail,
        )
    assert await customers(db, shop, "flaky") == 0
    assert await stored_keys(db, shop, "key-flaky") == 0

    retry = CreateCustomer("flaky")
    result = await create(db, shop, retry, key="key-flaky")
    assert (retry.calls, result.status, result.replayed) == (1, 201, False)
    assert await customers(db, shop, "flaky") == 1


async def test_an_error_response_is_not_stored(db: Database, shop: Tenant) -> None:
    async def conflict(conn: TenantConn) -> tuple[int, bytes]:
        return 409, b'{"type": "/problems/conflict"}'

    refused = await run_idempotent(
        db, shop, key="key-409", route=ROUTE, request_body=body_of("fixed"), work=conflict
    )
    assert (refused.status, refused.replayed) == (409, False)
    assert await stored_keys(db, shop, "key-409") == 0

    fixed = CreateCustomer("fixed")
    result = await create(db, shop, fixed, key="key-409")
    assert (fixed.calls, result.status, result.replayed) == (1, 201, False)


async def test_keys_belong_to_one_shop(
    db: Database, shop: Tenant, provision: ProvisionFactory
) -> None:
    other_shop = (await provision("Other shop")).tenant.as_tenant()
    in_a, in_b = CreateCustomer("shared-id"), CreateCustomer("shared-id")

    from_a = await create(db, shop, in_a, key="key-shared")
    from_b = await create(db, other_shop, in_b, key="key-shared")

    assert (in_a.calls, in_b.calls) == (1, 1)
    assert not from_a.replayed and not from_b.replayed
    assert await customers(db, other_shop, "shared-id") == 1


async def test_a_key_older_than_a_day_counts_as_unused(db: Database, shop: Tenant) -> None:
    await create(db, shop, CreateCustomer("before"), key="key-stale")
    async with tenant_tx(db, shop) as conn:
        await conn.execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = $1",
            "key-stale",
        )

    after = CreateCustomer("after")
    fresh = await create(db, shop, after, key="key-stale")
    replay = await create(db, shop, after, key="key-stale")

    assert (after.calls, fresh.replayed, replay.replayed) == (1, False, True)
    assert replay.body == fresh.body
    assert msgspec.json.decode(replay.body)["customer_id"] == "after"
    assert await stored_keys(db, shop, "key-stale") == 1


async def test_the_problem_type_is_registered_and_served(db: Database) -> None:
    problem_type = PROBLEM_TYPES["idempotency-key-reused"]
    assert (problem_type.status, problem_type.title) == (422, "Idempotency key reused")
    async with http_client(make_app(db)) as client:
        response = await client.get("/problems/idempotency-key-reused")
    assert response.status_code == 200
    assert "Idempotency key reused" in response.text


@post("/test/idempotency-key", opt={"public": True}, sync_to_thread=False)
def echo_key(request: Request[Any, Any, Any]) -> dict[str, str | None]:
    return {"key": idempotency_key(request)}


@pytest.fixture(scope="module")
def key_app(db: Database) -> Litestar:
    app = make_app(db)
    app.register(echo_key)
    return app


@pytest.fixture
async def key_client(key_app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(key_app) as client:
        yield client


async def test_a_valid_key_is_read_from_the_header(key_client: httpx.AsyncClient) -> None:
    sent = await key_client.post("/test/idempotency-key", headers={IDEMPOTENCY_HEADER: "a b~1"})
    assert sent.json() == {"key": "a b~1"}
    longest = "k" * 255
    assert (
        await key_client.post("/test/idempotency-key", headers={IDEMPOTENCY_HEADER: longest})
    ).json() == {"key": longest}
    assert (await key_client.post("/test/idempotency-key")).json() == {"key": None}


@pytest.mark.parametrize(
    "value",
    [b"", b"k" * 256, "clé".encode()],
    ids=["empty", "256 chars", "non-ascii"],
)
async def test_an_invalid_key_is_a_validation_problem(
    key_client: httpx.AsyncClient, value: bytes
) -> None:
    response = await key_client.post(
        "/test/idempotency-key", headers={IDEMPOTENCY_HEADER.encode(): value}
    )
    errors = assert_problem(response, 422, "validation")["errors"]
    assert isinstance(errors, list)
    assert [error["path"] for error in errors] == ["header.Idempotency-Key"]


async def test_pruning_removes_only_responses_that_can_no_longer_be_replayed(
    db: Database, shop: Tenant
) -> None:
    for key in ("old", "fresh"):
        await create(db, shop, CreateCustomer(f"prune-{key}"), key=key)
    async with tenant_tx(db, shop) as conn:
        await conn.execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'old'"
        )
        assert await prune_expired_keys(conn) == 1
        assert await prune_expired_keys(conn) == 0
        kept = await conn.fetch("SELECT key FROM idempotency_keys")
    assert [r["key"] for r in kept] == ["fresh"]
