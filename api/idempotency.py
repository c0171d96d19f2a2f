"""``Idempotency-Key``: a retried POST does its work once and answers with the first response.

A route that creates or moves value reads the key with :func:`idempotency_key` and runs its
database work through :func:`run_idempotent`, which stores the response in the shop's
``idempotency_keys`` table in the same transaction as the work. So the write and its stored
response commit together or not at all, and a replay can never see one without the other::

    @post("/v1/things", opt={"scopes": ("things:write",)})
    async def create_thing(request: Request[Any, Any, Any]) -> Response[bytes]:
        stored = await run_idempotent(
            db,
            principal_of(request).tenant,
            key=idempotency_key(request),
            route="POST /v1/things",
            request_body=await request.body(),
            work=lambda conn: insert_thing(conn, ...),
        )
        return Response(
            stored.body, status_code=stored.status, media_type=MediaType.JSON,
            headers=replay_headers(stored),
        )

Keys live in each shop's schema, so two shops may use the same key independently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import MediaType, Request, Response

from api.auth.guards import raw_header
from api.db.pool import Database, rows_affected
from api.db.tenant import Tenant, TenantConn, in_tenant
from api.errors import PROBLEM_TYPES, FieldError, Problem, ProblemType

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotency-Replayed"
MAX_KEY_LENGTH = 255
#: How long a stored response is replayed; an older row counts as absent and is overwritten.
RETENTION = "24 hours"

REUSED = "idempotency-key-reused"
PROBLEM_TYPES[REUSED] = ProblemType(
    REUSED,
    422,
    "Idempotency key reused",
    "This Idempotency-Key was already used in the last 24 hours for a different request (another "
    "endpoint or another body). Send a new key for each distinct request; reuse a key only to "
    "retry exactly the same request.",
)

_HEADER_PATH = f"header.{IDEMPOTENCY_HEADER}"
_RAW_HEADER_NAME = IDEMPOTENCY_HEADER.lower().encode()

_LOOKUP_SQL = f"""
SELECT route, request_hash, status, response FROM idempotency_keys
WHERE key = $1 AND created_at > now() - interval '{RETENTION}'
"""
# Only a stale row can conflict here: a fresh one is replayed or refused before work runs.
_STORE_SQL = """
INSERT INTO idempotency_keys (key, route, request_hash, status, response)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (key) DO UPDATE SET
    route = excluded.route, request_hash = excluded.request_hash, status = excluded.status,
    response = excluded.response, created_at = now()
"""

Work = Callable[[TenantConn], Awaitable[tuple[int, bytes]]]


class StoredResponse(msgspec.Struct, frozen=True):
    """What to answer: ``replayed`` is true when it is an earlier request's stored response."""

    status: int
    body: bytes
    replayed: bool


def idempotency_key(request: Request[Any, Any, Any]) -> str | None:
    """The request's ``Idempotency-Key``, or ``None`` when it sends none.

    A key must be 1 to 255 printable ASCII characters without a space at either end; anything
    else raises a ``validation`` :class:`Problem` (422) naming ``header.Idempotency-Key``.
    """
    key = raw_header(request.scope, _RAW_HEADER_NAME)
    if key is None:
        return None
    reason = _invalid_key_reason(key)
    if reason is not None:
        raise Problem(
            "validation",
            f"The {IDEMPOTENCY_HEADER} header is invalid.",
            errors=[FieldError(_HEADER_PATH, reason)],
        )
    return key


def _invalid_key_reason(key: str) -> str | None:
    """Why ``key`` is not a valid idempotency key, or ``None`` if it is."""
    if not key:
        return "must not be empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"must be at most {MAX_KEY_LENGTH} characters"
    # Headers arrive decoded as latin-1, so any non-ASCII byte shows up outside this range.
    if not all(" " <= char <= "~" for char in key):
        return "must be printable ASCII"
    if key != key.strip(" "):
        return "must not start or end with a space"
    return None


async def run_idempotent(
    db: Database,
    tenant: Tenant,
    *,
    key: str | None,
    route: str,
    request_body: bytes,
    work: Work,
    generic_plans: bool = False,
) -> StoredResponse:
    """Run ``work`` in one transaction of ``tenant``, at most once per ``key`` within 24 hours.

    Without a key, ``work`` simply runs. With one, requests with the same key are serialised; a
    repeat of the same ``route`` and body returns the stored response (``replayed=True``) without
    running ``work``, while a different route or body raises ``idempotency-key-reused`` (422).
    Only a 2xx response is stored, so a client can fix a failed request and retry with the same
    key; ``work`` should signal failure by raising (which rolls everything back and stores
    nothing) rather than by returning an error status after writing.
    """

    async def in_one_transaction(conn: TenantConn) -> StoredResponse:
        if key is None:
            status, body = await work(conn)
            return StoredResponse(status, body, replayed=False)
        return await _run_once(conn, tenant, key, route, request_body, work)

    # in_tenant replays the whole transaction once on a stale cached statement (migrations).
    return await in_tenant(db, tenant, in_one_transaction, generic_plans=generic_plans)


async def _run_once(
    conn: TenantConn, tenant: Tenant, key: str, route: str, request_body: bytes, work: Work
) -> StoredResponse:
    """Replay, refuse or run-and-store, holding the key's lock until the transaction ends."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_id(tenant, key))
    request_hash = hashlib.sha256(request_body).digest()
    found = await conn.fetchrow(_LOOKUP_SQL, key)
    if found is not None:
        if found["route"] != route or found["request_hash"] != request_hash:
            raise Problem(
                REUSED,
                f"The {IDEMPOTENCY_HEADER} {key!r} was already used for a different request; "
                "use a new key for this one.",
            )
        return StoredResponse(found["status"], found["response"], replayed=True)
    status, body = await work(conn)
    if 200 <= status < 300:
        await conn.execute(_STORE_SQL, key, route, request_hash, status, body)
    return StoredResponse(status, body, replayed=False)


def _lock_id(tenant: Tenant, key: str) -> int:
    """A signed 64-bit advisory lock id for ``key`` in ``tenant``'s schema.

    The lock covers the key alone, not (route, key): the table's primary key is the key, so two
    concurrent requests reusing it on different routes must also queue, letting the second see
    the first's row and get its 422 instead of both running. Advisory locks are database-wide,
    so the schema is mixed in to keep shops from queueing behind each other's keys.
    """
    digest = hashlib.blake2b(
        f"{tenant.schema}\x00{key}".encode(), digest_size=8, person=b"sjaak-idem"
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


def replay_headers(stored: StoredResponse) -> dict[str, str]:
    """``Idempotency-Replayed: true`` for a replayed response, nothing otherwise."""
    return {REPLAYED_HEADER: "true"} if stored.replayed else {}


async def idempotent_json(
    request: Request[Any, Any, Any],
    db: Database,
    tenant: Tenant,
    route: str,
    body: bytes,
    work: Work,
    *,
    generic_plans: bool = False,
) -> Response[bytes]:
    """Run ``work`` once per ``Idempotency-Key`` and answer with its (possibly replayed) JSON."""
    stored = await run_idempotent(
        db,
        tenant,
        key=idempotency_key(request),
        route=route,
        request_body=body,
        work=work,
        generic_plans=generic_plans,
    )
    return Response(
        stored.body,
        status_code=stored.status,
        media_type=MediaType.JSON,
        headers=replay_headers(stored),
    )


async def prune_expired_keys(conn: TenantConn) -> int:
    """Delete the shop's stored responses that can no longer be replayed; returns how many.
    Only keeps the table small: an expired row already counts as absent."""
    status = await conn.execute(
        f"DELETE FROM idempotency_keys WHERE created_at <= now() - interval '{RETENTION}'"
    )
    return rows_affected(status)
