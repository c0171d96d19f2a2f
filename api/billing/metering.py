"""Overage to Stripe: an outbox of meter events, a sender, and a reconciliation.

1. **Report** (worker, every minute): for each shop on a paid plan, the month's billable count is
   what it accepted above its quota. When that grew past what was already queued, one row goes
   into ``sjaak.meter_events`` for the difference, with ``identifier`` =
   ``sjaak-<shop id>-<YYYYMM>-<billable count it brings the month to>``: derived from our own ids,
   unique (the count only grows) and the same however often the step runs.
2. **Send** (worker, every minute, in batches of 100): a batch is leased (``FOR UPDATE SKIP
   LOCKED``, committed) so no other worker sends it, then each event is posted to Stripe's
   ``/v1/billing/meter_events`` with the identifier as Stripe's dedupe key *and* as the request's
   idempotency key, then marked sent. A worker that dies between sending and marking leaves the
   lease to expire; the next send repeats the same identifier and key, and Stripe counts it once
   (Stripe keeps both for at least 24 hours, far longer than the lease). Stripe errors back off
   (1 min, 2, 4 … 1 h); after :data:`MAX_ATTEMPTS`, or at once when Stripe rejects the event
   itself, the row is ``failed`` and the reconciliation reports it.
3. **Reconcile** (worker, hourly): per shop and month, our count, the billable overage, what was
   queued, sent and failed, and (with ``SJAAK_STRIPE_METER_ID``) what Stripe's meter summed for
   the customer, into ``sjaak.usage_reconciliations``; anything missing is queued, and quota
   alerts that concurrent ingest missed are raised.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from uuid import UUID

import msgspec

from api.billing.accounts import SUBSCRIBED, load_account
from api.billing.plans import PlanBook
from api.billing.stripe_client import StripeGateway, StripeRejected, StripeUnavailable
from api.billing.usage import period_bounds, period_start, used
from api.config import Settings
from api.db import ControlConn, Database, Tenant, TenantConn, in_tenant

log = logging.getLogger("sjaak.billing.metering")

BATCH = 100
LEASE = timedelta(minutes=2)
MAX_ATTEMPTS = 12
MAX_BACKOFF = timedelta(hours=1)


def identifier(tenant_id: UUID, period: date, billable_through: int) -> str:
    return f"sjaak-{tenant_id}-{period:%Y%m}-{billable_through}"


def periods_to_report(now: datetime) -> tuple[date, date]:
    """This month and the last: the last month's final minutes are reported in this one."""
    current = period_start(now)
    previous = period_start(datetime.combine(current, datetime.min.time(), UTC) - timedelta(1))
    return previous, current


async def shop_usage(db: Database, tenant: Tenant, period: date) -> int:
    async def read(conn: TenantConn) -> int:
        return await used(conn, period)

    return await in_tenant(db, tenant, read)


async def report_overage(
    db: Database, settings: Settings, plans: PlanBook, tenant_id: UUID, now: datetime
) -> int:
    """Queue meter events for the shop's overage not yet queued; returns how many were queued."""
    queued = 0
    async with db.control() as conn:
        row = await conn.fetchrow(
            "SELECT a.tenant_id, t.schema_name FROM sjaak.billing_accounts a"
            " JOIN sjaak.tenants t ON t.id = a.tenant_id"
            " WHERE a.tenant_id = $1 AND t.status = 'active' FOR UPDATE OF a",
            tenant_id,
        )
        if row is None:
            return 0
        account = await load_account(conn, tenant_id)
        if account.status not in SUBSCRIBED or account.stripe_customer_id is None:
            return 0
        quota = plans[account.plan].touchpoints_per_month
        tenant = Tenant(id=tenant_id, schema=row["schema_name"])
        for period in periods_to_report(now):
            billable = max(0, await shop_usage(db, tenant, period) - quota)
            through = await _queued_through(conn, tenant_id, period)
            if billable <= through:
                continue
            _, end = period_bounds(period)
            await conn.execute(
                "INSERT INTO sjaak.meter_events (identifier, tenant_id, stripe_customer_id,"
                " event_name, period_start, value, billable_through, occurred_at, next_attempt_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (identifier) DO NOTHING",
                identifier(tenant_id, period, billable),
                tenant_id,
                account.stripe_customer_id,
                settings.stripe_meter_event_name,
                period,
                billable - through,
                billable,
                min(now, end - timedelta(seconds=1)),
                now,
            )
            queued += 1
    return queued


async def _queued_through(conn: ControlConn, tenant_id: UUID, period: date) -> int:
    return int(
        await conn.fetchval(
            "SELECT coalesce(max(billable_through), 0) FROM sjaak.meter_events"
            " WHERE tenant_id = $1 AND period_start = $2",
            tenant_id,
            period,
        )
    )


async def report_all(db: Database, settings: Settings, plans: PlanBook, now: datetime) -> int:
    """:func:`report_overage` for every shop with a subscription; a failing shop is logged."""
    async with db.control() as conn:
        rows = await conn.fetch(
            "SELECT tenant_id FROM sjaak.billing_accounts WHERE status = ANY($1::text[])"
            " AND stripe_customer_id IS NOT NULL ORDER BY tenant_id",
            sorted(SUBSCRIBED),
        )
    total = 0
    for row in rows:
        try:
            total += await report_overage(db, settings, plans, row["tenant_id"], now)
        except Exception:
            log.exception("could not queue a shop's overage", extra={"tenant_id": str(row[0])})
    return total


class MeterEvent(msgspec.Struct, frozen=True):
    id: int
    identifier: str
    stripe_customer_id: str
    event_name: str
    value: int
    occurred_at: datetime
    attempts: int


async def lease_due(
    db: Database, now: datetime, *, limit: int = BATCH, tenant_id: UUID | None = None
) -> list[MeterEvent]:
    """Take up to ``limit`` due events for this worker for :data:`LEASE` (committed at once)."""
    async with db.control() as conn:
        rows = await conn.fetch(
            """
            UPDATE sjaak.meter_events SET leased_until = $1 + $2::interval,
                attempts = attempts + 1
            WHERE id IN (
                SELECT id FROM sjaak.meter_events
                WHERE status = 'pending' AND next_attempt_at <= $1
                    AND (leased_until IS NULL OR leased_until <= $1)
                    AND ($4::uuid IS NULL OR tenant_id = $4)
                ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)
            RETURNING id, identifier, stripe_customer_id, event_name, value, occurred_at, attempts
            """,
            now,
            LEASE,
            limit,
            tenant_id,
        )
    return sorted((msgspec.convert(dict(r), MeterEvent) for r in rows), key=lambda e: e.id)


async def mark_sent(db: Database, event: MeterEvent, now: datetime) -> None:
    async with db.control() as conn:
        await conn.execute(
            "UPDATE sjaak.meter_events SET status = 'sent', sent_at = $2, leased_until = NULL,"
            " last_error = NULL WHERE id = $1",
            event.id,
            now,
        )


async def mark_failed(
    db: Database, event: MeterEvent, error: str, *, final: bool, now: datetime
) -> None:
    backoff = min(timedelta(minutes=1) * 2 ** (event.attempts - 1), MAX_BACKOFF)
    async with db.control() as conn:
        await conn.execute(
            "UPDATE sjaak.meter_events SET status = $2, next_attempt_at = $3, leased_until = NULL,"
            " last_error = $4 WHERE id = $1",
            event.id,
            "failed" if final else "pending",
            now + backoff,
            error[:1000],
        )


async def send_due(
    db: Database,
    gateway: StripeGateway,
    now: datetime | None = None,
    *,
    tenant_id: UUID | None = None,
    batches: int = 10,
) -> int:
    """Send due meter events, a leased batch at a time; returns how many Stripe accepted."""
    sent = 0
    for _ in range(batches):
        now = now or datetime.now(UTC)
        events = await lease_due(db, now, tenant_id=tenant_id)
        for event in events:
            try:
                await gateway.send_meter_event(
                    event_name=event.event_name,
                    customer=event.stripe_customer_id,
                    value=event.value,
                    identifier=event.identifier,
                    timestamp=int(event.occurred_at.timestamp()),
                )
            except StripeUnavailable as exc:
                final = event.attempts >= MAX_ATTEMPTS
                await mark_failed(db, event, str(exc), final=final, now=now)
                continue
            except StripeRejected as exc:
                # Our credentials may be fixed; the event itself will not change.
                final = exc.status not in (401, 403) or event.attempts >= MAX_ATTEMPTS
                log.error(
                    "Stripe rejected a meter event",
                    extra={"identifier": event.identifier, "error": str(exc), "final": final},
                )
                await mark_failed(db, event, str(exc), final=final, now=now)
                continue
            await mark_sent(db, event, now)
            sent += 1
        if len(events) < BATCH:
            break
        now = None
    return sent
