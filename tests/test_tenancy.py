"""The one way into a shop's data, proven on real connections."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import asyncpg
import pytest

from api.db import Database, Tenant, TenantConn, in_tenant, tenant_tx
from api.db.schemas import InvalidSchemaName, new_shop_schema_name
from tests.conftest import REPO, ShopFactory


async def add_customer(conn: TenantConn, customer_id: str, email: str) -> None:
    await conn.execute(
        "INSERT INTO customers (customer_id, email) VALUES ($1, $2)", customer_id, email
    )


async def emails(conn: TenantConn) -> list[str]:
    return [r["email"] for r in await conn.fetch("SELECT email FROM customers ORDER BY email")]


async def test_one_pooled_connection_keeps_shops_apart(db_url: str, make_shop: ShopFactory) -> None:
    shop_a = (await make_shop("Shop A")).as_tenant()
    shop_b = (await make_shop("Shop B")).as_tenant()
    single = await Database.connect(db_url, min_size=1, max_size=1)
    try:
        pids = set()
        async with tenant_tx(single, shop_a) as conn:
            pids.add(conn.get_server_pid())
            await add_customer(conn, "same-id", "a@shop-a.example")
        async with tenant_tx(single, shop_b) as conn:
            pids.add(conn.get_server_pid())
            await add_customer(conn, "same-id", "b@shop-b.example")
        async with tenant_tx(single, shop_a) as conn:
            pids.add(conn.get_server_pid())
            assert await emails(conn) == ["a@shop-a.example"]
        async with tenant_tx(single, shop_b) as conn:
            pids.add(conn.get_server_pid())
            assert await emails(conn) == ["b@shop-b.example"]
        async with single.connection() as raw:
            pids.add(raw.get_server_pid())
            assert await raw.fetchval("SHOW search_path") == '"$user", public'
            assert await raw.fetchval("SHOW statement_timeout") == "0"
        assert len(pids) == 1, "the test must run on one pooled connection"
    finally:
        await single.close()


async def test_search_path_is_reset_after_a_failed_transaction(
    db: Database, make_shop: ShopFactory
) -> None:
    shop = (await make_shop()).as_tenant()
    with pytest.raises(asyncpg.UniqueViolationError):
        async with tenant_tx(db, shop) as conn:
            await add_customer(conn, "dup", "x@example.com")
            await add_customer(conn, "dup", "y@example.com")
    async with tenant_tx(db, shop) as conn:
        assert await emails(conn) == [], "the failed transaction left no half write"
    async with db.connection() as raw:
        assert not raw.is_in_transaction()
        assert await raw.fetchval("SHOW search_path") == '"$user", public'


async def test_tenant_sql_cannot_reach_another_shop_by_default(
    db: Database, make_shop: ShopFactory
) -> None:
    shop_a = (await make_shop()).as_tenant()
    shop_b = (await make_shop()).as_tenant()
    async with tenant_tx(db, shop_b) as conn:
        await add_customer(conn, "b-only", "b@example.com")
    async with tenant_tx(db, shop_a) as conn:
        assert await conn.fetchval("SHOW search_path") == shop_a.schema
        assert await conn.fetchval("SELECT count(*) FROM customers") == 0


@pytest.mark.parametrize(
    "schema", ["public", "sjaak", "shop_ABCDEF", "shop_abc", "shop_abcdef; DROP TABLE x", ""]
)
async def test_a_schema_name_not_made_by_the_server_is_refused(db: Database, schema: str) -> None:
    with pytest.raises(InvalidSchemaName):
        async with tenant_tx(db, Tenant(id=uuid.uuid4(), schema=schema)):
            pass


def test_new_schema_names_match_the_pattern() -> None:
    names = {new_shop_schema_name() for _ in range(200)}
    assert len(names) == 200
    assert all(re.fullmatch(r"shop_[a-z0-9]{12}", n) for n in names)


async def test_statement_timeout_applies_to_tenant_transactions(
    db: Database, make_shop: ShopFactory
) -> None:
    shop = (await make_shop()).as_tenant()
    quick = Database(db.pool, statement_timeout_ms=50)
    with pytest.raises(asyncpg.QueryCanceledError):
        async with tenant_tx(quick, shop) as conn:
            await conn.execute("SELECT pg_sleep(1)")


async def test_a_stale_cached_statement_is_retried_once(
    db: Database, db_url: str, make_shop: ShopFactory
) -> None:
    shop_a = (await make_shop()).as_tenant()
    shop_b = (await make_shop()).as_tenant()
    # Mid-rollout shape drift: shop B already has a column shop A lacks.
    async with tenant_tx(db, shop_b) as conn:
        await conn.execute("ALTER TABLE customers ADD COLUMN nickname text")
    single = await Database.connect(db_url, min_size=1, max_size=1)
    calls = 0

    async def read_all(conn: TenantConn) -> int:
        nonlocal calls
        calls += 1
        # SELECT * is exactly what application SQL must never do; here it provokes the error.
        return len(await conn.fetch("SELECT * FROM customers"))

    try:
        assert await in_tenant(single, shop_a, read_all) == 0
        assert await in_tenant(single, shop_b, read_all) == 0
        assert calls == 3, "the second shop's read was replayed once after the stale statement"
    finally:
        await single.close()


def unscoped_connection_uses(api_root: Path) -> list[str]:
    """Lines outside ``api/db`` that take a connection themselves."""
    forbidden = re.compile(r"\.acquire\(|\.connection\(\)|asyncpg\.(connect|create_pool)\(")
    return [
        f"{path.relative_to(api_root)}:{number}"
        for path in sorted(api_root.rglob("*.py"))
        if path.relative_to(api_root).parts[0] != "db"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if forbidden.search(line)
    ]


def test_no_pool_is_acquired_outside_api_db() -> None:
    offenders = unscoped_connection_uses(REPO / "api")
    assert offenders == [], f"connections must come from api.db: {offenders}"


def test_the_check_finds_a_pool_acquired_elsewhere(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "pool.py").write_text("conn = await pool.acquire()\n")
    (tmp_path / "customers").mkdir()
    (tmp_path / "customers" / "routes.py").write_text("x = 1\nasync with db.pool.acquire() as c:\n")
    assert unscoped_connection_uses(tmp_path) == ["customers/routes.py:2"]


async def test_generic_plans_last_one_transaction(db: Database, make_shop: ShopFactory) -> None:
    shop = (await make_shop()).as_tenant()

    async def mode(conn: TenantConn) -> str:
        return str(await conn.fetchval("SHOW plan_cache_mode"))

    assert await in_tenant(db, shop, mode, generic_plans=True) == "force_generic_plan"
    assert await in_tenant(db, shop, mode) == "auto"
