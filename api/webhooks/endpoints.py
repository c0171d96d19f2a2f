"""A shop's webhook endpoints: where events go, which ones, and the secret that signs them.

The signing secret is generated here and stored encrypted under the service secret (it must be
read back to sign); the API shows it once, when it is made.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import asyncpg
import msgspec

from api.auth.secrets import Keyring
from api.db import TenantConn
from api.errors import FieldError, Problem
from api.pagination import Page, page_of
from api.webhooks.events import ALL_EVENTS, EVENT_TYPES
from api.webhooks.signing import generate_secret

#: A shop has at most this many endpoints.
#: A safety cap for plans that lift the limit; the plan's own limit applies first.
MAX_ENDPOINTS = 100
MAX_ROTATION_GRACE = 7 * 86400
DisabledReason = Literal["sustained_failure"]

EventTypes = Annotated[
    list[str],
    msgspec.Meta(
        min_length=1,
        max_length=len(EVENT_TYPES),
        description="Event types to send: any of "
        + ", ".join(f"`{t}`" for t in EVENT_TYPES)
        + ', or `["*"]` for all of them (including types added later).',
    ),
]
Url = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=2048,
        description="Where events are POSTed: https (http only outside production), a public "
        "host; see the SSRF rules in the README.",
    ),
]
Description = Annotated[str, msgspec.Meta(max_length=500)]


class NewWebhookEndpoint(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: Url
    event_types: EventTypes
    description: Description = ""
    enabled: bool = True


class WebhookEndpointChanges(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Only the fields sent change. Enabling an endpoint disabled for failing clears its
    failure record."""

    url: Url | msgspec.UnsetType = msgspec.UNSET
    event_types: EventTypes | msgspec.UnsetType = msgspec.UNSET
    description: Description | msgspec.UnsetType = msgspec.UNSET
    enabled: bool | msgspec.UnsetType = msgspec.UNSET


class SecretRotation(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: How long the old secret keeps signing, in seconds (0 to 7 days; default 24 h).
    expires_in: Annotated[int, msgspec.Meta(ge=0, le=MAX_ROTATION_GRACE)] = 86400


class WebhookEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    id: str
    url: str
    description: str
    event_types: list[str]
    enabled: bool
    #: Why Sjaak disabled the endpoint (``sustained_failure``), while it stays disabled.
    disabled_reason: DisabledReason | None
    disabled_at: datetime | None
    #: Since when every automatic attempt has failed (``None``: the last one succeeded).
    failing_since: datetime | None
    consecutive_failures: int
    #: While a rotated-out secret still signs (a second ``v1`` in ``Sjaak-Signature``).
    previous_secret_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime


class WebhookEndpointWithSecret(WebhookEndpoint, frozen=True, kw_only=True):
    #: The signing secret, ``whsec_…``: shown in this response only.
    secret: str


_COLUMNS = (
    "id, url, description, event_types, enabled, disabled_reason, disabled_at, failing_since,"
    " consecutive_failures, CASE WHEN previous_secret_expires_at > now()"
    " THEN previous_secret_expires_at END AS previous_secret_expires_at, created_at, updated_at"
)

_INSERT_SQL = f"""
INSERT INTO webhook_endpoints (id, url, description, event_types, enabled, secret)
SELECT $1, $2, $3, $4, $5, $6
WHERE (SELECT count(*) FROM webhook_endpoints) < {MAX_ENDPOINTS}
RETURNING {_COLUMNS}
"""
_GET_SQL = f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE id = $1"
_LIST_SQL = f"""
SELECT {_COLUMNS} FROM webhook_endpoints
WHERE $1::bigint IS NULL OR seq < $1
ORDER BY seq DESC LIMIT $2
"""
_SEQ_SQL = "SELECT seq FROM webhook_endpoints WHERE id = $1"
_UPDATE_SQL = f"""
UPDATE webhook_endpoints SET
    url = coalesce($2, url),
    description = coalesce($3, description),
    event_types = coalesce($4, event_types),
    enabled = coalesce($5, enabled),
    disabled_reason = CASE WHEN $5 THEN NULL ELSE disabled_reason END,
    disabled_at = CASE WHEN $5 THEN NULL ELSE disabled_at END,
    failing_since = CASE WHEN $5 AND NOT enabled THEN NULL ELSE failing_since END,
    consecutive_failures = CASE WHEN $5 AND NOT enabled THEN 0 ELSE consecutive_failures END,
    updated_at = now()
WHERE id = $1
RETURNING {_COLUMNS}
"""
_DELETE_SQL = f"DELETE FROM webhook_endpoints WHERE id = $1 RETURNING {_COLUMNS}"
_ROTATE_SQL = f"""
UPDATE webhook_endpoints SET
    previous_secret = CASE WHEN $3::float8 > 0 THEN secret END,
    previous_secret_expires_at = CASE WHEN $3::float8 > 0
        THEN now() + make_interval(secs => $3::float8) END,
    secret = $2,
    updated_at = now()
WHERE id = $1
RETURNING {_COLUMNS}
"""
_SECRETS_SQL = """
SELECT secret, CASE WHEN previous_secret_expires_at > now() THEN previous_secret END AS previous
FROM webhook_endpoints WHERE id = $1
"""


def new_id(prefix: str) -> str:
    """``<prefix>_<32 hex>``: 122 random bits, unguessable."""
    return f"{prefix}_{uuid.uuid4().hex}"


def not_found(endpoint_id: str) -> Problem:
    return Problem("not-found", f"No webhook endpoint {endpoint_id}.")


def validated_event_types(event_types: Sequence[str], path: str = "$.event_types") -> list[str]:
    """The types without repeats, in the order given; unknown ones are a 422 naming each."""
    errors = [
        FieldError(f"{path}[{i}]", f"unknown event type; use one of {', '.join(EVENT_TYPES)}")
        for i, t in enumerate(event_types)
        if t not in EVENT_TYPES and t != ALL_EVENTS
    ]
    if ALL_EVENTS in event_types and len(set(event_types)) > 1:
        errors.append(FieldError(path, '"*" already means every event type; send it alone'))
    if errors:
        raise Problem("validation", f"{len(errors)} field(s) failed validation.", errors=errors)
    return list(dict.fromkeys(event_types))


def _endpoint(row: asyncpg.Record) -> WebhookEndpoint:
    return WebhookEndpoint(**dict(row))


async def create_endpoint(
    conn: TenantConn, keyring: Keyring, body: NewWebhookEndpoint
) -> WebhookEndpointWithSecret:
    """A new endpoint with a new secret (the URL is already checked)."""
    secret = generate_secret()
    row = await conn.fetchrow(
        _INSERT_SQL,
        new_id("we"),
        body.url,
        body.description,
        validated_event_types(body.event_types),
        body.enabled,
        keyring.encrypt(secret.encode()),
    )
    if row is None:
        raise Problem(
            "conflict",
            f"A shop has at most {MAX_ENDPOINTS} webhook endpoints; delete one first.",
        )
    return WebhookEndpointWithSecret(**dict(row), secret=secret)


async def get_endpoint(conn: TenantConn, endpoint_id: str) -> WebhookEndpoint:
    row = await conn.fetchrow(_GET_SQL, endpoint_id)
    if row is None:
        raise not_found(endpoint_id)
    return _endpoint(row)


async def list_endpoints(
    conn: TenantConn, *, limit: int, starting_after: str | None
) -> Page[WebhookEndpoint]:
    """Newest first; ``starting_after`` is an endpoint id from the previous page."""
    seq = None
    if starting_after is not None:
        seq = await conn.fetchval(_SEQ_SQL, starting_after)
        if seq is None:
            raise Problem(
                "validation",
                "Invalid cursor.",
                errors=[FieldError("query.starting_after", "no such webhook endpoint")],
            )
    rows = await conn.fetch(_LIST_SQL, seq, limit + 1)
    return page_of([_endpoint(r) for r in rows], limit)


async def update_endpoint(
    conn: TenantConn, endpoint_id: str, changes: WebhookEndpointChanges
) -> WebhookEndpoint:
    def given(value: Any) -> Any:
        return None if value is msgspec.UNSET else value

    event_types = given(changes.event_types)
    row = await conn.fetchrow(
        _UPDATE_SQL,
        endpoint_id,
        given(changes.url),
        given(changes.description),
        None if event_types is None else validated_event_types(event_types),
        given(changes.enabled),
    )
    if row is None:
        raise not_found(endpoint_id)
    return _endpoint(row)


async def delete_endpoint(conn: TenantConn, endpoint_id: str) -> WebhookEndpoint:
    """Gone with its deliveries; events already sent stay with the receiver."""
    row = await conn.fetchrow(_DELETE_SQL, endpoint_id)
    if row is None:
        raise not_found(endpoint_id)
    return _endpoint(row)


async def rotate_secret(
    conn: TenantConn, keyring: Keyring, endpoint_id: str, grace: timedelta
) -> WebhookEndpointWithSecret:
    """A new secret; the current one keeps signing for ``grace`` (none when 0). A secret
    rotated out earlier and still in its grace period stops at once."""
    secret = generate_secret()
    row = await conn.fetchrow(
        _ROTATE_SQL, endpoint_id, keyring.encrypt(secret.encode()), grace.total_seconds()
    )
    if row is None:
        raise not_found(endpoint_id)
    return WebhookEndpointWithSecret(**dict(row), secret=secret)


async def signing_secrets(conn: TenantConn, keyring: Keyring, endpoint_id: str) -> list[str]:
    """The secrets that sign a delivery now: the current one, then the rotated-out one while
    it is still valid."""
    row = await conn.fetchrow(_SECRETS_SQL, endpoint_id)
    if row is None:
        return []
    return decrypt_secrets(keyring, row["secret"], row["previous"])


def decrypt_secrets(keyring: Keyring, current: bytes, previous: bytes | None) -> list[str]:
    blobs = [current] if previous is None else [current, previous]
    return [keyring.decrypt(blob).decode() for blob in blobs]
