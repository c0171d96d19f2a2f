"""OAuth clients, refresh tokens and authorization codes: the storage behind ``/oauth``."""

from __future__ import annotations

import secrets
import string
import uuid
from datetime import UTC, datetime, timedelta
from typing import Literal
from uuid import UUID

import asyncpg
import msgspec

from api.auth.revocations import record_revocation
from api.auth.secrets import Keyring, constant_time_equal
from api.db import ControlConn, Database
from api.errors import FieldError, Problem
from api.pagination import Page, page_of

GrantType = Literal["client_credentials", "authorization_code", "refresh_token"]
_ALPHABET = string.ascii_lowercase + string.digits
_COLUMNS = (
    "client_id, tenant_id, name, secret_last4, allowed_scopes, grant_types, redirect_uris,"
    " created_at, revoked_at"
)


class OAuthClient(msgspec.Struct, frozen=True, kw_only=True):
    client_id: str
    object: Literal["oauth_client"] = "oauth_client"
    name: str
    masked_secret: str
    scopes: list[str]
    grant_types: list[str]
    redirect_uris: list[str]
    created_at: datetime
    revoked_at: datetime | None


class CreatedOAuthClient(OAuthClient, frozen=True, kw_only=True):
    """Returned once: ``client_secret`` is never shown again."""

    client_secret: str


class ClientRecord(msgspec.Struct, frozen=True):
    """A client as the token endpoint sees it."""

    client_id: str
    tenant_id: UUID | None
    allowed_scopes: frozenset[str]
    grant_types: frozenset[str]
    redirect_uris: tuple[str, ...]


def _to_client(row: asyncpg.Record) -> OAuthClient:
    return OAuthClient(
        client_id=row["client_id"],
        name=row["name"],
        masked_secret=f"sjk_cs_…{row['secret_last4']}",
        scopes=sorted(row["allowed_scopes"]),
        grant_types=sorted(row["grant_types"]),
        redirect_uris=list(row["redirect_uris"]),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


def new_client_id() -> str:
    return "cl_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


async def create_client(
    conn: ControlConn,
    keyring: Keyring,
    *,
    tenant_id: UUID | None,
    name: str,
    scopes: frozenset[str],
    grant_types: frozenset[str],
    redirect_uris: tuple[str, ...] = (),
) -> CreatedOAuthClient:
    """A shop's client (``tenant_id`` set) or a platform partner app (``tenant_id`` None)."""
    secret = new_secret("sjk_cs_")
    row = await conn.fetchrow(
        "INSERT INTO sjaak.oauth_clients (client_id, tenant_id, name, secret_hash, secret_last4,"
        " allowed_scopes, grant_types, redirect_uris) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        f" RETURNING {_COLUMNS}",
        new_client_id(),
        tenant_id,
        name,
        keyring.digest(secret),
        secret[-4:],
        sorted(scopes),
        sorted(grant_types),
        list(redirect_uris),
    )
    assert row is not None
    return CreatedOAuthClient(**msgspec.structs.asdict(_to_client(row)), client_secret=secret)


async def list_clients(
    db: Database, tenant_id: UUID, *, limit: int, starting_after: str | None
) -> Page[OAuthClient]:
    async with db.control() as conn:
        if starting_after is not None:
            await _owned(conn, tenant_id, starting_after, cursor=True)
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM sjaak.oauth_clients WHERE tenant_id = $1"
            " AND ($2::text IS NULL OR (created_at, client_id) <"
            "   (SELECT created_at, client_id FROM sjaak.oauth_clients WHERE client_id = $2))"
            " ORDER BY created_at DESC, client_id DESC LIMIT $3",
            tenant_id,
            starting_after,
            limit + 1,
        )
    return page_of([_to_client(r) for r in rows], limit)


async def get_client(db: Database, tenant_id: UUID, client_id: str) -> OAuthClient:
    async with db.control() as conn:
        return _to_client(await _owned(conn, tenant_id, client_id))


async def delete_client(db: Database, tenant_id: UUID, client_id: str) -> OAuthClient:
    """Revoke the client, its refresh tokens and (through the feed) its access tokens."""
    async with db.control() as conn:
        await _owned(conn, tenant_id, client_id)
        row = await conn.fetchrow(
            "UPDATE sjaak.oauth_clients SET revoked_at = coalesce(revoked_at, now())"
            f" WHERE client_id = $1 RETURNING {_COLUMNS}",
            client_id,
        )
        await conn.execute(
            "UPDATE sjaak.oauth_refresh_tokens SET revoked_at = now()"
            " WHERE client_id = $1 AND revoked_at IS NULL",
            client_id,
        )
        await record_revocation(conn, "oauth_client", client_id)
    assert row is not None
    return _to_client(row)


async def authenticate_client(
    db: Database, keyring: Keyring, client_id: str, secret: str
) -> ClientRecord | None:
    """The client if the secret matches and it is not revoked; None otherwise (say nothing more)."""
    async with db.control() as conn:
        row = await conn.fetchrow(
            "SELECT c.client_id, c.tenant_id, c.secret_hash, c.allowed_scopes, c.grant_types,"
            " c.redirect_uris FROM sjaak.oauth_clients c"
            " LEFT JOIN sjaak.tenants t ON t.id = c.tenant_id"
            " WHERE c.client_id = $1 AND c.revoked_at IS NULL"
            " AND (c.tenant_id IS NULL OR t.status <> 'deleted')",
            client_id,
        )
    if row is None:
        return None
    if not any(
        constant_time_equal(d, row["secret_hash"]) for d in keyring.candidate_digests(secret)
    ):
        return None
    return ClientRecord(
        client_id=row["client_id"],
        tenant_id=row["tenant_id"],
        allowed_scopes=frozenset(row["allowed_scopes"]),
        grant_types=frozenset(row["grant_types"]),
        redirect_uris=tuple(row["redirect_uris"]),
    )


async def issue_refresh_token(
    conn: ControlConn,
    keyring: Keyring,
    *,
    client_id: str,
    tenant_id: UUID,
    scopes: frozenset[str],
    ttl: timedelta,
    family_id: UUID | None = None,
) -> str:
    token = new_secret("sjk_rt_")
    await conn.execute(
        "INSERT INTO sjaak.oauth_refresh_tokens (token_hash, family_id, client_id, tenant_id,"
        " scopes, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        keyring.digest(token),
        family_id or uuid.uuid4(),
        client_id,
        tenant_id,
        sorted(scopes),
        datetime.now(UTC) + ttl,
    )
    return token


class SpentRefreshToken(Exception):
    """A refresh token was presented twice: the family has been revoked."""


async def use_refresh_token(
    conn: ControlConn, keyring: Keyring, token: str, client_id: str
) -> asyncpg.Record | None:
    """Mark the token used and return it; None when unknown, expired, revoked or not the
    client's. A second use revokes every token of its family (RFC 9700 refresh rotation)."""
    row = await conn.fetchrow(
        "SELECT token_hash, family_id, client_id, tenant_id, scopes, expires_at, used_at,"
        " revoked_at FROM sjaak.oauth_refresh_tokens WHERE token_hash = ANY($1::bytea[])"
        " FOR UPDATE",
        keyring.candidate_digests(token),
    )
    if row is None or row["client_id"] != client_id:
        return None
    if row["used_at"] is not None:
        await revoke_refresh_family(conn, row["family_id"])
        raise SpentRefreshToken
    if row["revoked_at"] is not None or row["expires_at"] <= datetime.now(UTC):
        return None
    await conn.execute(
        "UPDATE sjaak.oauth_refresh_tokens SET used_at = now() WHERE token_hash = $1",
        row["token_hash"],
    )
    return row


async def find_refresh_token(
    conn: ControlConn, keyring: Keyring, token: str
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT family_id, client_id, tenant_id, scopes,"
        " extract(epoch FROM expires_at)::int AS exp,"
        " extract(epoch FROM issued_at)::int AS iat,"
        " (used_at IS NULL AND revoked_at IS NULL AND expires_at > now()) AS active"
        " FROM sjaak.oauth_refresh_tokens WHERE token_hash = ANY($1::bytea[])",
        keyring.candidate_digests(token),
    )


async def revoke_refresh_family(conn: ControlConn, family_id: UUID) -> None:
    await conn.execute(
        "UPDATE sjaak.oauth_refresh_tokens SET revoked_at = coalesce(revoked_at, now())"
        " WHERE family_id = $1",
        family_id,
    )


async def create_authorization_code(
    conn: ControlConn,
    keyring: Keyring,
    *,
    client_id: str,
    tenant_id: UUID,
    redirect_uri: str,
    scopes: frozenset[str],
    code_challenge: str,
    granted_by: str,
    ttl: timedelta = timedelta(minutes=1),
) -> str:
    """Called by the consent screen once the shop owner approves (PKCE S256 only)."""
    code = new_secret("sjk_ac_")
    await conn.execute(
        "INSERT INTO sjaak.oauth_authorization_codes (code_hash, client_id, tenant_id,"
        " redirect_uri, scopes, code_challenge, code_challenge_method, granted_by, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, 'S256', $7, $8)",
        keyring.digest(code),
        client_id,
        tenant_id,
        redirect_uri,
        sorted(scopes),
        code_challenge,
        granted_by,
        datetime.now(UTC) + ttl,
    )
    return code


async def use_authorization_code(
    conn: ControlConn, keyring: Keyring, code: str, client_id: str, family_id: UUID
) -> asyncpg.Record | None:
    """Single use: the first exchange marks it used and records the refresh-token family it
    starts; unknown, expired or reused is None."""
    return await conn.fetchrow(
        "UPDATE sjaak.oauth_authorization_codes SET used_at = now(), refresh_family_id = $3"
        " WHERE code_hash = ANY($1::bytea[]) AND client_id = $2 AND used_at IS NULL"
        " AND expires_at > now()"
        " RETURNING tenant_id, redirect_uri, scopes, code_challenge",
        keyring.candidate_digests(code),
        client_id,
        family_id,
    )


async def revoke_tokens_of_spent_code(
    conn: ControlConn, keyring: Keyring, code: str, client_id: str
) -> None:
    """A spent code presented again: revoke the refresh tokens its first exchange issued."""
    family_id = await conn.fetchval(
        "SELECT refresh_family_id FROM sjaak.oauth_authorization_codes"
        " WHERE code_hash = ANY($1::bytea[]) AND client_id = $2 AND used_at IS NOT NULL",
        keyring.candidate_digests(code),
        client_id,
    )
    if family_id is not None:
        await revoke_refresh_family(conn, family_id)


async def _owned(
    conn: ControlConn, tenant_id: UUID, client_id: str, *, cursor: bool = False
) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM sjaak.oauth_clients WHERE client_id = $1 AND tenant_id = $2",
        client_id,
        tenant_id,
    )
    if row is None:
        if cursor:
            raise Problem(
                "validation",
                "Invalid cursor.",
                errors=[FieldError("query.starting_after", "no such OAuth client")],
            )
        raise Problem("not-found", f"No OAuth client {client_id}.")
    return row
