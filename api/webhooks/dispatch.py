"""From the outbox to delivery jobs.

Every few seconds the ``webhooks-dispatch`` job visits every shop and, in one transaction:

1. takes the outbox rows not yet dispatched (``FOR UPDATE SKIP LOCKED``, so two workers never
   take the same row), marks them dispatched, makes one event per row that has a subscriber and
   one delivery per subscribed, enabled endpoint, and queues a delivery job for each. The marks,
   the deliveries and the jobs commit together or not at all, and an outbox row makes one event
   and an event one automatic delivery per endpoint however often this runs;
2. re-queues pending deliveries whose job was lost (long overdue and not being sent), which the
   queue's dedupe keys make harmless when the job was merely late.

Events written before an endpoint existed (or while it was disabled) are not sent to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from uuid import UUID

import msgspec
from pgqueuer.adapters.persistence.qb import QueryQueueBuilder

from api.db import Database, Tenant, TenantConn, rows_affected
from api.db.queue import QUEUE_NAMES
from api.tenants.fanout import in_every_shop

ENTRYPOINT = "webhook-delivery"
BATCH = 500
#: Batches per shop per run: a burst beyond this waits for the next run.
MAX_BATCHES = 10
#: A pending delivery this far past due, and not being sent, has lost its job.
LOST_AFTER = timedelta(minutes=2)
#: Events (with their deliveries and attempts) are kept this long.
RETENTION = timedelta(days=30)


class DeliveryJob(msgspec.Struct, frozen=True):
    """A queued job's payload: send attempt ``attempt`` of ``delivery`` in the shop."""

    tenant: UUID
    schema: str
    delivery: str
    attempt: int


_encode = msgspec.json.Encoder().encode
_ENQUEUE_SQL = QueryQueueBuilder(QUEUE_NAMES).build_enqueue_query("skip")


async def enqueue_deliveries(
    conn: TenantConn, tenant: Tenant, due: Sequence[tuple[str, int, timedelta]]
) -> int:
    """Queue ``(delivery id, attempt number, delay)`` jobs in the caller's transaction, in one
    statement; returns how many were added. The dedupe key names the shop, delivery and attempt,
    so a job for an attempt already queued or running is not added twice.

    pgqueuer's own enqueue statement, as :func:`api.jobs.enqueue` uses it, for many jobs at once.
    """
    if not due:
        return 0
    count = len(due)
    rows = await conn.fetch(
        _ENQUEUE_SQL,
        [0] * count,
        [ENTRYPOINT] * count,
        [_encode(DeliveryJob(tenant.id, tenant.schema, d, n)) for d, n, _ in due],
        [delay for _, _, delay in due],
        [f"webhook:{tenant.id}:{d}:{n}" for d, n, _ in due],
        [None] * count,
    )
    return len(rows)


_DISPATCH_SQL = """
WITH batch AS (
    SELECT id, type, customer_ref, payload, occurred_at, created_at FROM outbox
    WHERE delivered_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
),
marked AS (
    UPDATE outbox o SET delivered_at = now() FROM batch b WHERE o.id = b.id
),
targets AS (
    SELECT b.id AS outbox_id, e.id AS endpoint_id
    FROM batch b JOIN webhook_endpoints e
        ON e.enabled AND (b.type = ANY (e.event_types) OR '*' = ANY (e.event_types))
),
events AS (
    INSERT INTO webhook_events (id, outbox_id, type, customer_ref, data, occurred_at, created_at)
    SELECT 'evt_' || replace(gen_random_uuid()::text, '-', ''), b.id, b.type, b.customer_ref,
        b.payload, b.occurred_at, b.created_at
    FROM batch b WHERE b.id IN (SELECT outbox_id FROM targets)
    ON CONFLICT (outbox_id) DO NOTHING
    RETURNING id, outbox_id
),
deliveries AS (
    INSERT INTO webhook_deliveries (id, endpoint_id, event_id, trigger, next_attempt_at)
    SELECT 'whd_' || replace(gen_random_uuid()::text, '-', ''), t.endpoint_id, ev.id, 'event',
        now()
    FROM targets t JOIN events ev USING (outbox_id)
    ON CONFLICT (event_id, endpoint_id) WHERE trigger = 'event' DO NOTHING
    RETURNING id
)
SELECT (SELECT count(*) FROM batch) AS seen,
    coalesce((SELECT array_agg(id) FROM deliveries), '{}') AS deliveries
"""

_LOST_SQL = """
SELECT id, attempts FROM webhook_deliveries
WHERE status = 'pending' AND next_attempt_at < now() - $1::interval
    AND (leased_until IS NULL OR leased_until < now())
ORDER BY next_attempt_at LIMIT $2
"""

_PRUNE_SQL = """
WITH old AS (
    SELECT e.id FROM webhook_events e
    WHERE e.created_at < now() - $1::interval
        AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                        WHERE d.event_id = e.id AND d.status = 'pending')
    LIMIT 10000
)
DELETE FROM webhook_events e USING old WHERE e.id = old.id
"""


async def dispatch(conn: TenantConn, tenant: Tenant) -> int:
    """Turn the shop's undispatched outbox rows into queued deliveries (see the module
    docstring); returns how many deliveries were made."""
    made = 0
    for _ in range(MAX_BATCHES):
        row = await conn.fetchrow(_DISPATCH_SQL, BATCH)
        assert row is not None
        deliveries: list[str] = row["deliveries"]
        made += len(deliveries)
        await enqueue_deliveries(conn, tenant, [(d, 1, timedelta(0)) for d in deliveries])
        if row["seen"] < BATCH:
            break
    return made


async def requeue_lost(conn: TenantConn, tenant: Tenant) -> int:
    """Queue the next attempt of pending deliveries long past due whose job is gone (a queue
    row removed by hand, say); returns how many jobs were added."""
    rows = await conn.fetch(_LOST_SQL, LOST_AFTER, BATCH)
    return await enqueue_deliveries(
        conn, tenant, [(r["id"], r["attempts"] + 1, timedelta(0)) for r in rows]
    )


async def dispatch_all_shops(db: Database) -> int:
    """:func:`dispatch` and :func:`requeue_lost` in every active shop."""

    async def work(conn: TenantConn, tenant: Tenant) -> int:
        return await dispatch(conn, tenant) + await requeue_lost(conn, tenant)

    return await in_every_shop(db, "webhooks-dispatch", work)


async def prune_events(conn: TenantConn) -> int:
    """Delete events older than the retention period, with their deliveries and attempts, once
    none of their deliveries is still pending; and outbox rows dispatched that long ago (the
    events made from them hold what they said)."""
    status = await conn.execute(_PRUNE_SQL, RETENTION)
    outbox = await conn.execute(
        "DELETE FROM outbox WHERE delivered_at < now() - $1::interval", RETENTION
    )
    return rows_affected(status) + rows_affected(outbox)


async def prune_all_shops(db: Database) -> int:
    return await in_every_shop(db, "prune-webhook-events", lambda conn, _: prune_events(conn))
