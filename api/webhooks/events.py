"""The events a shop can subscribe to, and :func:`publish`, the one way a domain announces one.

A domain writes its event to the shop's ``outbox`` table in the same transaction as the change it
describes, so the event exists exactly when the change does. The webhook dispatcher
(:mod:`api.webhooks.dispatch`) later turns each outbox row into one delivery per subscribed
endpoint. The loyalty ledger writes its rows with SQL of its own; every other domain calls
:func:`publish`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from api.db import TenantConn

#: What an endpoint can subscribe to (besides ``*``, everything).
EVENT_TYPES: tuple[str, ...] = (
    "offer.issued",
    "offer.redeemed",
    "customer.stage_changed",
    "customer.deleted",
    "loyalty.points_earned",
    "loyalty.points_expiring",
    "loyalty.tier_changed",
    "webhook_endpoint.disabled",
    "billing.quota_warning",
    "billing.quota_reached",
)
ALL_EVENTS = "*"
#: Sent only by ``POST /v1/webhook-endpoints/{id}/test``, to that endpoint; never subscribed to.
TEST_EVENT = "webhook.test"
DISABLED_EVENT = "webhook_endpoint.disabled"

_encode = msgspec.json.Encoder().encode

_PUBLISH_SQL = """
INSERT INTO outbox (type, customer_ref, payload, occurred_at)
VALUES ($1, $2, $3::text::jsonb, coalesce($4, now()))
"""


async def publish(
    conn: TenantConn,
    type: str,
    payload: dict[str, Any],
    customer_ref: int | None = None,
    *,
    occurred_at: datetime | None = None,
) -> None:
    """Record an event for the shop's webhooks, in the caller's transaction.

    ``type`` is one of :data:`EVENT_TYPES` (anything else is a ``ValueError``, so a typo fails
    in tests rather than reaching no one); ``payload`` becomes the event's ``data`` as it is
    (JSON-encodable: msgspec Structs, datetimes and UUIDs are fine); ``customer_ref`` is the
    profile it is about, so erasing that customer removes the undelivered event; ``occurred_at``
    defaults to the transaction's time. Nothing is sent until the transaction commits.
    """
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}; add it to EVENT_TYPES first")
    await conn.execute(_PUBLISH_SQL, type, customer_ref, _encode(payload).decode(), occurred_at)
