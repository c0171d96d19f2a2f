"""Stripe's webhook events: verified on the raw body, stored once, processed by the worker.

The route verifies the ``Stripe-Signature`` header with the library's own check and the
configured secret, writes the event to ``sjaak.stripe_events`` (``event_id`` is unique, so a
replay is stored once and only counted) and queues the job that processes it, in one
transaction, then answers 200 at once. The job never trusts the payload beyond the ids in it: it
fetches the subscription from Stripe and applies that (:func:`api.billing.lifecycle.
sync_subscription`), so duplicates and events out of order all end in the state Stripe has now.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from api.billing.accounts import account_by_customer
from api.billing.lifecycle import sync_subscription
from api.billing.plans import PlanBook
from api.billing.stripe_client import StripeGateway
from api.db import ControlConn, Database
from api.jobs import enqueue

log = logging.getLogger("sjaak.billing.inbox")

PROCESS_ENTRYPOINT = "billing.stripe_event"
#: Events that may change a shop's subscription; others are stored and marked ignored.
HANDLED = frozenset(
    {
        "checkout.session.completed",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
        "invoice.paid",
        "invoice.payment_failed",
    }
)


class EventData(msgspec.Struct):
    object: dict[str, Any]


class StripeEvent(msgspec.Struct):
    """The envelope of a Stripe event, as far as Sjaak reads it."""

    id: str
    type: str
    created: int
    data: EventData
    livemode: bool = False


_decode_event = msgspec.json.Decoder(StripeEvent).decode


def decode_event(body: bytes) -> tuple[StripeEvent, dict[str, Any]]:
    """The verified body as an event (raises ``msgspec.DecodeError``/``ValidationError``)."""
    event = _decode_event(body)
    payload: dict[str, Any] = msgspec.json.decode(body)
    return event, payload


async def store_event(db: Database, event: StripeEvent, payload: dict[str, Any]) -> bool:
    """Keep the event and queue its processing; ``False`` when it was stored before."""
    async with db.control() as conn:
        row = await conn.fetchrow(
            "INSERT INTO sjaak.stripe_events (event_id, type, livemode, created, payload)"
            " VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (event_id) DO UPDATE SET deliveries = sjaak.stripe_events.deliveries + 1"
            " RETURNING (xmax = 0) AS inserted, processed_at",
            event.id,
            event.type,
            event.livemode,
            datetime.fromtimestamp(event.created, UTC),
            payload,
        )
        assert row is not None
        if row["processed_at"] is None:
            await queue_processing(conn, event.id)
    return bool(row["inserted"])


async def queue_processing(conn: ControlConn, event_id: str) -> None:
    await enqueue(
        conn, PROCESS_ENTRYPOINT, event_id.encode(), dedupe_key=f"stripe-event:{event_id}"
    )


def references(event_type: str, obj: dict[str, Any]) -> tuple[str | None, str | None]:
    """The customer and subscription an event's object names (ids only: nothing else of the
    payload is used)."""
    customer = _id(obj.get("customer"))
    if event_type.startswith("customer.subscription."):
        return customer, _id(obj.get("id"))
    if event_type.startswith("invoice."):
        parent = obj.get("parent") or {}
        details = parent.get("subscription_details") or {}
        return customer, _id(details.get("subscription")) or _id(obj.get("subscription"))
    return customer, _id(obj.get("subscription"))


def _id(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


async def process_event(
    db: Database,
    gateway: StripeGateway,
    plans: PlanBook,
    grace: timedelta,
    event_id: str,
    *,
    now: datetime | None = None,
) -> str:
    """Apply one stored event; returns its outcome (also stored on the event). A failure is
    recorded on the event and raised, so the job is retried."""
    async with db.control() as conn:
        row = await conn.fetchrow(
            "SELECT type, payload, processed_at, outcome FROM sjaak.stripe_events"
            " WHERE event_id = $1",
            event_id,
        )
    if row is None:
        return "ignored: no such event"
    if row["processed_at"] is not None:
        return str(row["outcome"])
    event_type: str = row["type"]
    obj = (row["payload"].get("data") or {}).get("object") or {}
    tenant_id = None
    try:
        if event_type not in HANDLED:
            outcome = f"ignored: {event_type} does not concern subscriptions"
        else:
            customer, subscription_id = references(event_type, obj)
            async with db.control() as conn:
                tenant_id = await account_by_customer(conn, customer) if customer else None
            if tenant_id is None:
                outcome = f"ignored: no shop has the Stripe customer {customer}"
            else:
                outcome = await sync_subscription(
                    db, gateway, plans, grace, tenant_id, subscription_id, cause=event_id, now=now
                )
    except Exception as exc:
        async with db.control() as conn:
            await conn.execute(
                "UPDATE sjaak.stripe_events SET attempts = attempts + 1, last_error = $2"
                " WHERE event_id = $1",
                event_id,
                f"{type(exc).__name__}: {exc}"[:1000],
            )
        raise
    async with db.control() as conn:
        await conn.execute(
            "UPDATE sjaak.stripe_events SET processed_at = now(), outcome = $2, tenant_id = $3,"
            " attempts = attempts + 1, last_error = NULL WHERE event_id = $1",
            event_id,
            outcome,
            tenant_id,
        )
    log.info("Stripe event processed", extra={"event_id": event_id, "outcome": outcome})
    return outcome


async def requeue_stalled(db: Database, older_than: timedelta = timedelta(minutes=5)) -> int:
    """Queue again events still unprocessed after ``older_than`` (their job failed for good or
    was lost); a job already queued for one is not duplicated."""
    async with db.control() as conn:
        rows = await conn.fetch(
            "SELECT event_id FROM sjaak.stripe_events WHERE processed_at IS NULL"
            " AND received_at < now() - $1::interval ORDER BY received_at LIMIT 1000",
            older_than,
        )
        for row in rows:
            await queue_processing(conn, row["event_id"])
    return len(rows)
