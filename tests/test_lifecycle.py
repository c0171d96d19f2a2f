"""A shop's life: provisioning, suspension, resumption, deletion."""

from __future__ import annotations

import uuid

import pytest

from api.auth.secrets import Keyring
from api.db import Database
from api.db.migrate import migrate
from api.errors import Problem
from api.tenants.lifecycle import (
    ConfirmationRequired,
    TenantNotFound,
    create_tenant,
    delete_tenant,
    ensure_demo_tenant,
    get_tenant,
    list_tenants,
    provision_shop,
    resume_tenant,
    suspend_tenant,
)
from tests.conftest import ShopFactory


async def schema_exists(db: Database, schema: str) -> bool:
    async with db.connection() as conn:
        return bool(
            await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema)
        )


async def audit_actions(db: Database, tenant_id: uuid.UUID) -> list[str]:
    async with db.control() as conn:
        rows = await conn.fetch(
            "SELECT action FROM sjaak.audit_log WHERE tenant_id = $1 ORDER BY id", tenant_id
        )
    return [r["action"] for r in rows]


async def test_provisioning_creates_a_schema_of_the_shops_own(
    make_shop: ShopFactory, db: Database
) -> None:
    shop = await make_shop("  Bakery Jansen  ")
    assert shop.name == "Bakery Jansen"
    assert shop.status == "active"
    assert await schema_exists(db, shop.schema_name)
    assert await audit_actions(db, shop.id) == ["tenant.created"]
    assert shop.id in {t.id for t in await list_tenants(db)}


@pytest.mark.parametrize("name", ["", "   ", "x" * 201])
async def test_a_shop_needs_a_sensible_name(db: Database, name: str) -> None:
    with pytest.raises(ValueError, match="1 to 200 characters"):
        await create_tenant(db, name)


async def test_suspension_blocks_requests_and_resumption_restores_them(
    make_shop: ShopFactory, db: Database
) -> None:
    shop = await make_shop()
    suspended = await suspend_tenant(db, shop.id, reason="unpaid invoice")
    assert suspended.status == "suspended"
    with pytest.raises(Problem) as refused:
        suspended.as_tenant()
    assert refused.value.slug == "tenant-suspended"
    assert refused.value.status == 403
    assert "unpaid invoice" in refused.value.detail

    resumed = await resume_tenant(db, shop.id)
    assert resumed.as_tenant().schema == shop.schema_name
    assert await audit_actions(db, shop.id) == [
        "tenant.created",
        "tenant.suspended",
        "tenant.active",
    ]


async def test_deletion_needs_confirmation(make_shop: ShopFactory, db: Database) -> None:
    shop = await make_shop()
    with pytest.raises(ConfirmationRequired):
        await delete_tenant(db, shop.id, confirm=False)
    assert await schema_exists(db, shop.schema_name)

    deleted = await delete_tenant(db, shop.id, confirm=True)

    assert deleted.status == "deleted"
    assert not await schema_exists(db, shop.schema_name)
    assert shop.id not in {t.id for t in await list_tenants(db)}
    assert shop.id in {t.id for t in await list_tenants(db, include_deleted=True)}
    with pytest.raises(Problem) as refused:
        deleted.as_tenant()
    assert refused.value.status == 401
    with pytest.raises(ValueError, match="deleted shop cannot become active"):
        await resume_tenant(db, shop.id)


async def test_deleting_one_shop_leaves_the_others(make_shop: ShopFactory, db: Database) -> None:
    doomed = await make_shop()
    survivor = await make_shop()
    await delete_tenant(db, doomed.id, confirm=True)
    assert await schema_exists(db, survivor.schema_name)
    assert (await get_tenant(db, survivor.id)).status == "active"


async def test_unknown_shop_is_reported(db: Database) -> None:
    with pytest.raises(TenantNotFound):
        await suspend_tenant(db, uuid.uuid4())


async def test_the_demo_shop_is_created_once_with_keys(
    fresh_db: Database, keyring: Keyring
) -> None:
    await migrate(fresh_db)
    first, created = await ensure_demo_tenant(fresh_db, keyring)
    again, created_again = await ensure_demo_tenant(fresh_db, keyring)
    assert created is not None
    assert created.secret_key.startswith("sjk_sk_live_")
    assert created.publishable_key.startswith("sjk_pk_live_")
    assert created_again is None
    assert again.id == first.id


async def test_provisioning_with_keys_is_one_transaction(
    db: Database, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    import api.tenants.lifecycle as lifecycle

    before = len(await list_tenants(db))
    calls = 0
    real = lifecycle.create_api_key

    async def fail_on_second_key(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("the database went away")
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(lifecycle, "create_api_key", fail_on_second_key)
    with pytest.raises(RuntimeError):
        await provision_shop(db, keyring, "Half made")
    assert len(await list_tenants(db)) == before, "no shop without its keys"
