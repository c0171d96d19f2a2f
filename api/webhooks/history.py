"""What was sent to an endpoint, attempt by attempt, and sending by hand: a redelivery of an
event already sent, or a ``webhook.test`` event. Both are delivery jobs queued at once, for
the worker to send with a single attempt."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
from litestar.params import Parameter

from api.db import Tenant, TenantConn
from api.errors import FieldError, Problem
from api.pagination import Page, page_of
from api.webhooks.dispatch import enqueue_deliveries
from api.webhooks.endpoints import new_id, not_found
from api.webhooks.events import TEST_EVENT

DeliveryStatus = Literal["pending", "succeeded", "failed", "cancelled"]
Trigger = Literal["event", "redelivery", "test"]

StatusFilter = Annotated[
    DeliveryStatus | None, Parameter(description="Only deliveries with this status.")
]
EventFilter = Annotated[
    str | None,
    Parameter(description="Only deliveries of this event (`evt_…`).", max_length=100),
]


class DeliveryEvent(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    type: str
    created_at: datetime


class AttemptRequest(msgspec.Struct, frozen=True, kw_only=True):
    headers: dict[str, str]
    body: str


class AttemptResponse(msgspec.Struct, frozen=True, kw_only=True):
    status: int
    #: The first 2 KiB of the answer (after ``[Location: …]`` for a redirect).
    body: str


class WebhookAttempt(msgspec.Struct, frozen=True, kw_only=True):
    number: int
    attempted_at: datetime
    url: str
    #: The checked address connected to (``None`` when the SSRF guard refused the URL).
    address: str | None
    request: AttemptRequest
    #: ``None`` when no HTTP answer came (refused, unreachable, timed out).
    response: AttemptResponse | None
    duration_ms: int
    #: Why the attempt failed: a status that is not 2xx, or what happened before any answer.
    error: str | None


class WebhookDelivery(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["webhook_delivery"] = "webhook_delivery"
    id: str
    endpoint_id: str
    event: DeliveryEvent
    #: ``event``: sent because of an event, retried for up to 3 days; ``redelivery`` and
    #: ``test``: sent by hand, once.
    trigger: Trigger
    #: For a redelivery, the delivery it repeats.
    redelivery_of: str | None
    status: DeliveryStatus
    next_attempt_at: datetime | None
    created_at: datetime
    finished_at: datetime | None
    #: Every attempt, first first.
    attempts: list[WebhookAttempt]


_DELIVERY_COLUMNS = (
    "d.id, d.endpoint_id, d.trigger, d.redelivery_of, d.status, d.next_attempt_at,"
    " d.created_at, d.finished_at, ev.id AS event_id, ev.type AS event_type,"
    " ev.created_at AS event_created_at"
)
_LIST_SQL = f"""
SELECT {_DELIVERY_COLUMNS}
FROM webhook_deliveries d JOIN webhook_events ev ON ev.id = d.event_id
WHERE d.endpoint_id = $1 AND ($2::bigint IS NULL OR d.seq < $2)
    AND ($3::text IS NULL OR d.status = $3) AND ($4::text IS NULL OR d.event_id = $4)
ORDER BY d.seq DESC LIMIT $5
"""
_GET_SQL = f"""
SELECT {_DELIVERY_COLUMNS}
FROM webhook_deliveries d JOIN webhook_events ev ON ev.id = d.event_id
WHERE d.endpoint_id = $1 AND d.id = $2
"""
_SEQ_SQL = "SELECT seq FROM webhook_deliveries WHERE endpoint_id = $1 AND id = $2"
_ENDPOINT_EXISTS_SQL = "SELECT EXISTS (SELECT 1 FROM webhook_endpoints WHERE id = $1)"
_ATTEMPTS_SQL = """
SELECT delivery_id, number, attempted_at, url, address, request_headers, request_body,
    response_status, response_body, duration_ms, error
FROM webhook_attempts WHERE delivery_id = ANY($1::text[])
ORDER BY delivery_id, number
"""
_TEST_EVENT_SQL = """
INSERT INTO webhook_events (id, type, data, occurred_at)
SELECT $2, $3, jsonb_build_object('endpoint_id', e.id, 'url', e.url,
    'message', 'A test event from Sjaak: your endpoint receives and verifies webhooks.'), now()
FROM webhook_endpoints e WHERE e.id = $1
RETURNING id
"""
_REDELIVERY_SOURCE_SQL = """
SELECT event_id FROM webhook_deliveries WHERE endpoint_id = $1 AND id = $2
"""
_NEW_DELIVERY_SQL = """
INSERT INTO webhook_deliveries (id, endpoint_id, event_id, trigger, redelivery_of, next_attempt_at)
VALUES ($1, $2, $3, $4, $5, now())
"""


def _delivery_not_found(delivery_id: str) -> Problem:
    return Problem("not-found", f"No delivery {delivery_id} for this webhook endpoint.")


async def _ensure_endpoint(conn: TenantConn, endpoint_id: str) -> None:
    if not await conn.fetchval(_ENDPOINT_EXISTS_SQL, endpoint_id):
        raise not_found(endpoint_id)


async def list_deliveries(
    conn: TenantConn,
    endpoint_id: str,
    *,
    limit: int,
    starting_after: str | None,
    status: str | None = None,
    event_id: str | None = None,
) -> Page[WebhookDelivery]:
    """The endpoint's deliveries, newest first, each with every attempt."""
    await _ensure_endpoint(conn, endpoint_id)
    seq = None
    if starting_after is not None:
        seq = await conn.fetchval(_SEQ_SQL, endpoint_id, starting_after)
        if seq is None:
            raise Problem(
                "validation",
                "Invalid cursor.",
                errors=[FieldError("query.starting_after", "no such delivery for this endpoint")],
            )
    rows = await conn.fetch(_LIST_SQL, endpoint_id, seq, status, event_id, limit + 1)
    return page_of(await _with_attempts(conn, rows), limit)


async def get_delivery(conn: TenantConn, endpoint_id: str, delivery_id: str) -> WebhookDelivery:
    await _ensure_endpoint(conn, endpoint_id)
    row = await conn.fetchrow(_GET_SQL, endpoint_id, delivery_id)
    if row is None:
        raise _delivery_not_found(delivery_id)
    [delivery] = await _with_attempts(conn, [row])
    return delivery


async def send_test_event(conn: TenantConn, tenant: Tenant, endpoint_id: str) -> WebhookDelivery:
    """A ``webhook.test`` event for this endpoint alone, queued to be sent now."""
    event_id = await conn.fetchval(_TEST_EVENT_SQL, endpoint_id, new_id("evt"), TEST_EVENT)
    if event_id is None:
        raise not_found(endpoint_id)
    return await _queue_manual(conn, tenant, endpoint_id, event_id, "test", None)


async def redeliver(
    conn: TenantConn, tenant: Tenant, endpoint_id: str, delivery_id: str
) -> WebhookDelivery:
    """The delivery's event again (same event id), queued to be sent now, whatever became of
    the original and whether or not the endpoint is enabled."""
    await _ensure_endpoint(conn, endpoint_id)
    event_id = await conn.fetchval(_REDELIVERY_SOURCE_SQL, endpoint_id, delivery_id)
    if event_id is None:
        raise _delivery_not_found(delivery_id)
    return await _queue_manual(conn, tenant, endpoint_id, event_id, "redelivery", delivery_id)


async def _queue_manual(
    conn: TenantConn,
    tenant: Tenant,
    endpoint_id: str,
    event_id: str,
    trigger: Trigger,
    redelivery_of: str | None,
) -> WebhookDelivery:
    delivery_id = new_id("whd")
    await conn.execute(
        _NEW_DELIVERY_SQL, delivery_id, endpoint_id, event_id, trigger, redelivery_of
    )
    await enqueue_deliveries(conn, tenant, [(delivery_id, 1, timedelta(0))])
    return await get_delivery(conn, endpoint_id, delivery_id)


async def _with_attempts(conn: TenantConn, rows: list[asyncpg.Record]) -> list[WebhookDelivery]:
    attempts: dict[str, list[WebhookAttempt]] = {r["id"]: [] for r in rows}
    if rows:
        for a in await conn.fetch(_ATTEMPTS_SQL, list(attempts)):
            attempts[a["delivery_id"]].append(_attempt(a))
    return [_delivery(r, attempts[r["id"]]) for r in rows]


def _attempt(row: asyncpg.Record) -> WebhookAttempt:
    status = row["response_status"]
    headers: dict[str, Any] = row["request_headers"]
    return WebhookAttempt(
        number=row["number"],
        attempted_at=row["attempted_at"],
        url=row["url"],
        address=row["address"],
        request=AttemptRequest(
            headers={k: str(v) for k, v in headers.items()}, body=row["request_body"]
        ),
        response=None
        if status is None
        else AttemptResponse(status=status, body=row["response_body"] or ""),
        duration_ms=row["duration_ms"],
        error=row["error"],
    )


def _delivery(row: asyncpg.Record, attempts: list[WebhookAttempt]) -> WebhookDelivery:
    return WebhookDelivery(
        id=row["id"],
        endpoint_id=row["endpoint_id"],
        event=DeliveryEvent(
            id=row["event_id"], type=row["event_type"], created_at=row["event_created_at"]
        ),
        trigger=row["trigger"],
        redelivery_of=row["redelivery_of"],
        status=row["status"],
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        finished_at=row["finished_at"],
        attempts=attempts,
    )
