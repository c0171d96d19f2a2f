"""A customer's timeline: their touchpoints, newest first."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from api.customers.profiles import customer_ref_or_404
from api.customers.schemas import TimelineTouchpoint
from api.db import TenantConn
from api.errors import FieldError, Problem
from api.pagination import Page, page_of


class TimelineFilter(msgspec.Struct, frozen=True, kw_only=True):
    """What a timeline narrows to. Time bounds are half-open:
    ``occurred_after <= occurred_at < occurred_before``."""

    type: str | None = None
    channel: str | None = None
    occurred_after: datetime | None = None
    occurred_before: datetime | None = None


# A page boundary must be one of this customer's touchpoints.
TIMELINE_CURSOR_SQL = """
SELECT t.occurred_at, t.id
FROM touchpoints AS t
WHERE t.event_id = $1 AND t.customer_ref = $2"""

# Walks ``touchpoints_timeline`` (customer_ref, occurred_at DESC, id DESC).
# $1 profile, $2 type, $3 channel, $4 occurred_after, $5 occurred_before,
# $6/$7 the cursor's id/occurred_at, $8 limit.
TIMELINE_SQL = """
SELECT t.event_id, t.type, t.channel, t.occurred_at, t.received_at, t.sent_at, t.customer_id,
       t.anonymous_id, t.email, t.order_id, t.amount, t.currency, t.order_details,
       t.properties, t.context
FROM touchpoints AS t
WHERE t.customer_ref = $1
  AND ($2::text IS NULL OR t.type = $2)
  AND ($3::text IS NULL OR t.channel = $3)
  AND ($4::timestamptz IS NULL OR t.occurred_at >= $4)
  AND ($5::timestamptz IS NULL OR t.occurred_at < $5)
  AND ($6::bigint IS NULL OR (t.occurred_at, t.id) < ($7::timestamptz, $6))
ORDER BY t.occurred_at DESC, t.id DESC
LIMIT $8"""


async def list_timeline(
    conn: TenantConn,
    customer_id: str,
    filters: TimelineFilter,
    *,
    limit: int,
    starting_after: str | None,
) -> Page[TimelineTouchpoint]:
    """The touchpoints of the profile ``customer_id`` leads to, newest ``occurred_at`` first; a
    404 problem if the shop has no such customer."""
    ref = await customer_ref_or_404(conn, customer_id)
    cursor_id: int | None = None
    cursor_at: datetime | None = None
    if starting_after is not None:
        cursor = await conn.fetchrow(TIMELINE_CURSOR_SQL, starting_after, ref)
        if cursor is None:
            raise Problem(
                "validation",
                f"Invalid cursor: customer {customer_id} has no touchpoint {starting_after}.",
                errors=[FieldError("query.starting_after", "no such touchpoint for this customer")],
            )
        cursor_id, cursor_at = cursor["id"], cursor["occurred_at"]
    rows = await conn.fetch(
        TIMELINE_SQL,
        ref,
        filters.type,
        filters.channel,
        filters.occurred_after,
        filters.occurred_before,
        cursor_id,
        cursor_at,
        limit + 1,
    )
    return page_of([touchpoint_from_row(row) for row in rows], limit)


def touchpoint_from_row(row: asyncpg.Record) -> TimelineTouchpoint:
    return TimelineTouchpoint(
        id=row["event_id"],
        type=row["type"],
        channel=row["channel"],
        occurred_at=row["occurred_at"],
        received_at=row["received_at"],
        sent_at=row["sent_at"],
        customer_id=row["customer_id"],
        anonymous_id=row["anonymous_id"],
        email=row["email"],
        order=_order(row),
        properties=row["properties"],
        context=row["context"],
    )


def _order(row: asyncpg.Record) -> dict[str, Any] | None:
    """The order fields, or ``None`` for a touchpoint without one. The typed columns win over
    same-named keys of the free-form details."""
    details: dict[str, Any] | None = row["order_details"]
    if row["order_id"] is None and row["amount"] is None and not details:
        return None
    return {
        **(details or {}),
        "order_id": row["order_id"],
        "amount": row["amount"],
        "currency": row["currency"],
    }
