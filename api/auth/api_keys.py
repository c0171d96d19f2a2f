"""API keys: creation (shown once), listing (masked), rotation, revocation, look-up by HMAC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal
from uuid import UUID

import asyncpg
import msgspec

from api.auth.key_format import KeyKind, KeyMode, generate_key, masked
from api.auth.revocations import record_revocation
from api.auth.scopes import ALL_SCOPES, PUBLISHABLE_SCOPES
from api.auth.secrets import Keyring
from api.db import ControlConn, Database
from api.errors import FieldError, Problem
from api.pagination import Page, page_of

KeyStatus = Literal["active", "expired", "revoked"]

_COLUMNS = (
    "id, kind, mode, name, last4, scopes, allowed_origins, created_at, expires_at,"
    " revoked_at, last_used_at, rotated_from"
)


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """An API key as listed: never the key itself."""

    id: UUID
    object: Literal["api_key"] = "api_key"
    kind: KeyKind
    mode: KeyMode
    name: str
    masked_key: str
    scopes: list[str]
    allowed_origins: list[str]
    status: KeyStatus
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    rotated_from: UUID | None


class CreatedApiKey(ApiKey, frozen=True, kw_only=True):
    """Returned once, at creation or rotation: ``key`` is never shown again."""

    key: str


class VerifiedKey(msgspec.Struct, frozen=True):
    """What a request needs from a key row, with its shop, as cached per process."""

    id: UUID
    tenant_id: UUID
    schema_name: str
    tenant_status: str
    kind: KeyKind
    scopes: frozenset[str]
    allowed_origins: tuple[str, ...]
    expires_at: datetime | None
    revoked_at: datetime | None


def scopes_for(kind: KeyKind, requested: list[str] | None) -> frozenset[str]:
    if kind == "publishable":
        return PUBLISHABLE_SCOPES
    if kind == "secret":
        return ALL_SCOPES
    if not requested:
        raise Problem(
            "validation",
            "A restricted key needs at least one scope.",
            errors=[FieldError(path="$.scopes", message="at least one scope is required")],
        )
    return frozenset(requested)


def _status(row: asyncpg.Record, now: datetime) -> KeyStatus:
    if row["revoked_at"] is not None:
        return "revoked"
    if row["expires_at"] is not None and row["expires_at"] <= now:
        return "expired"
    return "active"


def _to_api_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=row["id"],
        kind=row["kind"],
        mode=row["mode"],
        name=row["name"],
        masked_key=masked(row["kind"], row["mode"], row["last4"]),
        scopes=sorted(row["scopes"]),
        allowed_origins=list(row["allowed_origins"]),
        status=_status(row, datetime.now(UTC)),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
        rotated_from=row["rotated_from"],
    )


async def create_api_key(
    conn: ControlConn,
    keyring: Keyring,
    tenant_id: UUID,
    *,
    kind: KeyKind,
    name: str = "",
    scopes: frozenset[str],
    allowed_origins: tuple[str, ...] = (),
    expires_at: datetime | None = None,
    rotated_from: UUID | None = None,
    mode: KeyMode = "live",
) -> CreatedApiKey:
    key = generate_key(kind, mode)
    row = await conn.fetchrow(
        "INSERT INTO sjaak.api_keys (tenant_id, kind, mode, name, key_hash, last4, scopes,"
        " allowed_origins, expires_at, rotated_from)"
        f" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {_COLUMNS}",
        tenant_id,
        kind,
        mode,
        name,
        keyring.digest(key),
        key[-4:],
        sorted(scopes),
        list(allowed_origins),
        expires_at,
        rotated_from,
    )
    assert row is not None
    listed = _to_api_key(row)
    return CreatedApiKey(**msgspec.structs.asdict(listed), key=key)


async def list_api_keys(
    db: Database, tenant_id: UUID, *, limit: int, starting_after: UUID | None
) -> Page[ApiKey]:
    async with db.control() as conn:
        if starting_after is not None:
            await _owned(conn, tenant_id, starting_after, field="starting_after")
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM sjaak.api_keys WHERE tenant_id = $1"
            " AND ($2::uuid IS NULL OR (created_at, id) <"
            "   (SELECT created_at, id FROM sjaak.api_keys WHERE id = $2))"
            " ORDER BY created_at DESC, id DESC LIMIT $3",
            tenant_id,
            starting_after,
            limit + 1,
        )
    return page_of([_to_api_key(r) for r in rows], limit)


async def get_api_key(db: Database, tenant_id: UUID, key_id: UUID) -> ApiKey:
    async with db.control() as conn:
        return _to_api_key(await _owned(conn, tenant_id, key_id))


async def rotate_api_key(
    db: Database, keyring: Keyring, tenant_id: UUID, key_id: UUID, *, old_key_valid_for: timedelta
) -> CreatedApiKey:
    """A new key with the same kind, scopes and origins; the old one expires after the grace."""
    async with db.control() as conn:
        old = await _owned(conn, tenant_id, key_id, lock=True)
        if _status(old, datetime.now(UTC)) != "active":
            raise Problem("conflict", f"Key {key_id} is {_status(old, datetime.now(UTC))}.")
        old_expiry = datetime.now(UTC) + old_key_valid_for
        if old["expires_at"] is not None:
            old_expiry = min(old_expiry, old["expires_at"])
        await conn.execute(
            "UPDATE sjaak.api_keys SET expires_at = $2 WHERE id = $1", key_id, old_expiry
        )
        # The expiry is cached like the rest of the key: make every worker read it again.
        await record_revocation(conn, "api_key", str(key_id))
        return await create_api_key(
            conn,
            keyring,
            tenant_id,
            kind=old["kind"],
            name=old["name"],
            scopes=frozenset(old["scopes"]),
            allowed_origins=tuple(old["allowed_origins"]),
            rotated_from=key_id,
            mode=old["mode"],
        )


async def revoke_api_key(db: Database, tenant_id: UUID, key_id: UUID) -> ApiKey:
    async with db.control() as conn:
        await _owned(conn, tenant_id, key_id, lock=True)
        row = await conn.fetchrow(
            "UPDATE sjaak.api_keys SET revoked_at = coalesce(revoked_at, now())"
            f" WHERE id = $1 RETURNING {_COLUMNS}",
            key_id,
        )
        await record_revocation(conn, "api_key", str(key_id))
    assert row is not None
    return _to_api_key(row)


async def find_key(db: Database, digests: list[bytes]) -> VerifiedKey | None:
    async with db.control() as conn:
        row = await conn.fetchrow(
            "SELECT k.id, k.tenant_id, t.schema_name, t.status AS tenant_status, k.kind,"
            " k.scopes, k.allowed_origins, k.expires_at, k.revoked_at"
            " FROM sjaak.api_keys k JOIN sjaak.tenants t ON t.id = k.tenant_id"
            " WHERE k.key_hash = ANY($1::bytea[])",
            digests,
        )
    if row is None:
        return None
    return VerifiedKey(
        id=row["id"],
        tenant_id=row["tenant_id"],
        schema_name=row["schema_name"],
        tenant_status=row["tenant_status"],
        kind=row["kind"],
        scopes=frozenset(row["scopes"]),
        allowed_origins=tuple(row["allowed_origins"]),
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
    )


async def record_last_used(db: Database, used: dict[UUID, datetime]) -> None:
    """Write batched ``last_used_at`` values (called off the request path)."""
    if not used:
        return
    async with db.control() as conn:
        await conn.execute(
            "UPDATE sjaak.api_keys k SET last_used_at = u.at"
            " FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, at)"
            " WHERE k.id = u.id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)",
            list(used),
            list(used.values()),
        )


async def _owned(
    conn: ControlConn,
    tenant_id: UUID,
    key_id: UUID,
    *,
    lock: bool = False,
    field: str | None = None,
) -> asyncpg.Record:
    """The key if it belongs to this shop. Another shop's key is simply not found."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM sjaak.api_keys WHERE id = $1 AND tenant_id = $2"
        + (" FOR UPDATE" if lock else ""),
        key_id,
        tenant_id,
    )
    if row is None:
        if field:
            raise Problem(
                "validation",
                f"No API key {key_id} to page from.",
                errors=[FieldError(path=f"query.{field}", message="no such API key")],
            )
        raise Problem("not-found", f"No API key {key_id}.")
    return row
