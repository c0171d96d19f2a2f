"""A shop's life: provisioned with its own schema, suspended and resumed, deleted on request."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

import asyncpg
import msgspec

from api.auth.api_keys import create_api_key, scopes_for
from api.auth.revocations import record_revocation
from api.auth.secrets import Keyring
from api.db import ControlConn, Database, Tenant, new_shop_schema_name
from api.db.migrate import MigrationSet, create_shop_schema, drop_shop_schema
from api.errors import Problem

TenantStatus = Literal["active", "suspended", "deleted"]

_COLUMNS = "id, name, schema_name, status, status_reason, schema_version, created_at"


class TenantRecord(msgspec.Struct, frozen=True):
    id: UUID
    name: str
    schema_name: str
    status: TenantStatus
    status_reason: str | None
    schema_version: int
    created_at: datetime

    def as_tenant(self) -> Tenant:
        """The request-scoped view, only for a shop that may be served."""
        ensure_serving(self)
        return Tenant(id=self.id, schema=self.schema_name)


class TenantNotFound(LookupError):
    pass


class ConfirmationRequired(Exception):
    pass


def ensure_serving(record: TenantRecord) -> None:
    """Refuse requests for a shop that is not active, with a problem the caller can act on."""
    if record.status == "suspended":
        reason = f" Reason: {record.status_reason}." if record.status_reason else ""
        raise Problem(
            "tenant-suspended",
            f"This shop is suspended.{reason} Contact support to have it resumed.",
        )
    if record.status != "active":
        # A deleted shop's credentials are simply no longer valid.
        raise Problem("unauthenticated", "The credential belongs to a shop that no longer exists.")


async def create_tenant(
    db: Database, name: str, *, actor: str = "cli", migrations: MigrationSet | None = None
) -> TenantRecord:
    """Create a shop: its row, its schema and every tenant migration, all in one transaction."""
    async with db.control() as conn:
        return await _create_in(conn, name, actor, migrations)


class ProvisionedShop(msgspec.Struct, frozen=True):
    """A new shop with its first keys; the keys are shown this once."""

    tenant: TenantRecord
    secret_key: str
    publishable_key: str


async def provision_shop(
    db: Database,
    keyring: Keyring,
    name: str,
    *,
    actor: str = "cli",
    allowed_origins: tuple[str, ...] = (),
    migrations: MigrationSet | None = None,
) -> ProvisionedShop:
    """A shop plus a secret and a publishable key, in one transaction (sign-up, CLI, seed)."""
    async with db.control() as conn:
        record = await _create_in(conn, name, actor, migrations)
        secret = await create_api_key(
            conn,
            keyring,
            record.id,
            kind="secret",
            name="First secret key",
            scopes=scopes_for("secret", None),
        )
        publishable = await create_api_key(
            conn,
            keyring,
            record.id,
            kind="publishable",
            name="First publishable key",
            scopes=scopes_for("publishable", None),
            allowed_origins=allowed_origins,
        )
    return ProvisionedShop(tenant=record, secret_key=secret.key, publishable_key=publishable.key)


async def _create_in(
    conn: ControlConn, name: str, actor: str, migrations: MigrationSet | None
) -> TenantRecord:
    name = name.strip()
    if not 1 <= len(name) <= 200:
        raise ValueError("a shop name is 1 to 200 characters")
    migrations = migrations or MigrationSet.from_directory()
    schema = new_shop_schema_name()
    version = await create_shop_schema(conn, schema, migrations)
    row = await conn.fetchrow(
        f"INSERT INTO sjaak.tenants (name, schema_name, schema_version) VALUES ($1, $2, $3)"
        f" RETURNING {_COLUMNS}",
        name,
        schema,
        version,
    )
    record = _to_record(row)
    await _audit(conn, record.id, actor, "tenant.created", {"name": name, "schema": schema})
    return record


async def get_tenant(db: Database, tenant_id: UUID) -> TenantRecord:
    async with db.control() as conn:
        row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM sjaak.tenants WHERE id = $1", tenant_id)
    if row is None:
        raise TenantNotFound(f"no shop with id {tenant_id}")
    return _to_record(row)


async def list_tenants(db: Database, *, include_deleted: bool = False) -> list[TenantRecord]:
    async with db.control() as conn:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM sjaak.tenants"
            " WHERE $1 OR status <> 'deleted' ORDER BY created_at, id",
            include_deleted,
        )
    return [_to_record(r) for r in rows]


async def suspend_tenant(
    db: Database, tenant_id: UUID, *, reason: str | None = None, actor: str = "cli"
) -> TenantRecord:
    return await _set_status(db, tenant_id, "suspended", reason, actor, allowed_from=("active",))


async def resume_tenant(db: Database, tenant_id: UUID, *, actor: str = "cli") -> TenantRecord:
    return await _set_status(db, tenant_id, "active", None, actor, allowed_from=("suspended",))


async def delete_tenant(
    db: Database, tenant_id: UUID, *, confirm: bool, actor: str = "cli"
) -> TenantRecord:
    """Drop the shop's schema and all its data. Irreversible, so it needs ``confirm=True``."""
    if not confirm:
        raise ConfirmationRequired(
            "deleting a shop drops its schema and every row in it; pass --confirm to proceed"
        )
    async with db.control() as conn:
        current = await _locked(conn, tenant_id)
        if current.status == "deleted":
            return current
        schema = current.schema_name
        await drop_shop_schema(conn, schema)
        row = await conn.fetchrow(
            "UPDATE sjaak.tenants SET status = 'deleted', deleted_at = now(), updated_at = now()"
            f" WHERE id = $1 RETURNING {_COLUMNS}",
            tenant_id,
        )
        await _audit(conn, tenant_id, actor, "tenant.deleted", {"schema": schema})
        await record_revocation(conn, "tenant", str(tenant_id))
    return _to_record(row)


async def ensure_demo_tenant(
    db: Database, keyring: Keyring
) -> tuple[TenantRecord, ProvisionedShop | None]:
    """The demo shop for ``make run``: the existing one, or a new one with its first keys."""
    async with db.control() as conn:
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM sjaak.tenants WHERE name = 'Demo shop'"
            " AND status <> 'deleted' ORDER BY created_at LIMIT 1"
        )
    if row is not None:
        return _to_record(row), None
    created = await provision_shop(
        db,
        keyring,
        "Demo shop",
        actor="seed",
        allowed_origins=("http://localhost:3000", "http://127.0.0.1:8000"),
    )
    return created.tenant, created


async def _set_status(
    db: Database,
    tenant_id: UUID,
    status: TenantStatus,
    reason: str | None,
    actor: str,
    *,
    allowed_from: tuple[TenantStatus, ...],
) -> TenantRecord:
    async with db.control() as conn:
        current = await _locked(conn, tenant_id)
        if current.status == status:
            return current
        if current.status not in allowed_from:
            raise ValueError(f"a {current.status} shop cannot become {status}")
        row = await conn.fetchrow(
            "UPDATE sjaak.tenants SET status = $2, status_reason = $3, updated_at = now()"
            f" WHERE id = $1 RETURNING {_COLUMNS}",
            tenant_id,
            status,
            reason,
        )
        await _audit(conn, tenant_id, actor, f"tenant.{status}", {"reason": reason})
        await record_revocation(conn, "tenant", str(tenant_id))
    return _to_record(row)


async def _locked(conn: ControlConn, tenant_id: UUID) -> TenantRecord:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM sjaak.tenants WHERE id = $1 FOR UPDATE", tenant_id
    )
    if row is None:
        raise TenantNotFound(f"no shop with id {tenant_id}")
    return _to_record(row)


async def _audit(
    conn: ControlConn, tenant_id: UUID, actor: str, action: str, details: dict[str, object]
) -> None:
    await conn.execute(
        "INSERT INTO sjaak.audit_log (tenant_id, actor, action, details) VALUES ($1, $2, $3, $4)",
        tenant_id,
        actor,
        action,
        details,
    )


def _to_record(row: asyncpg.Record | None) -> TenantRecord:
    if row is None:
        raise TenantNotFound("the shop disappeared during the operation")
    return msgspec.convert(dict(row), TenantRecord)
