"""The hourly reconciliation: our counts against what was queued, sent and what Stripe summed."""

from __future__ import annotations

import logging
from datetime import date, datetime
from uuid import UUID

import msgspec

from api.billing.accounts import SUBSCRIBED, Account, entitlement_of, load_account
from api.billing.metering import periods_to_report, report_overage, shop_usage
from api.billing.plans import PlanBook
from api.billing.stripe_client import StripeFailure, StripeGateway
from api.billing.usage import THRESHOLDS, period_bounds, period_start, raise_alert, used
from api.config import Settings
from api.db import Database, Tenant, TenantConn, in_tenant
from api.tenants.fanout import in_every_shop

log = logging.getLogger("sjaak.billing.reconcile")


class Reconciliation(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: UUID
    period_start: date
    counted: int
    billable: int
    queued: int
    sent: int
    failed: int
    #: What Stripe's meter summed for the customer over the month (None: not asked).
    stripe_total: int | None
    status: str


async def reconcile_account(
    db: Database,
    gateway: StripeGateway | None,
    settings: Settings,
    plans: PlanBook,
    tenant_id: UUID,
    now: datetime,
) -> list[Reconciliation]:
    """Compare, record and (when something was never queued) queue it now."""
    async with db.control() as conn:
        account = await load_account(conn, tenant_id)
        schema = await conn.fetchval(
            "SELECT schema_name FROM sjaak.tenants WHERE id = $1 AND status = 'active'", tenant_id
        )
    if account.stripe_customer_id is None or schema is None:
        return []
    tenant = Tenant(id=tenant_id, schema=schema)
    if account.status in SUBSCRIBED:
        await report_overage(db, settings, plans, tenant_id, now)
    found = []
    for period in periods_to_report(now):
        found.append(await _compare(db, gateway, settings, plans, account, tenant, period))
    return found


async def _compare(
    db: Database,
    gateway: StripeGateway | None,
    settings: Settings,
    plans: PlanBook,
    account: Account,
    tenant: Tenant,
    period: date,
) -> Reconciliation:
    counted = await shop_usage(db, tenant, period)
    async with db.control() as conn:
        sums = await conn.fetchrow(
            "SELECT coalesce(sum(value), 0)::bigint AS queued,"
            " coalesce(sum(value) FILTER (WHERE status = 'sent'), 0)::bigint AS sent,"
            " coalesce(sum(value) FILTER (WHERE status = 'failed'), 0)::bigint AS failed"
            " FROM sjaak.meter_events WHERE tenant_id = $1 AND period_start = $2",
            tenant.id,
            period,
        )
    assert sums is not None
    queued, sent, failed = sums["queued"], sums["sent"], sums["failed"]
    billable = queued
    if account.status in SUBSCRIBED:
        billable = max(queued, counted - plans[account.plan].touchpoints_per_month, 0)
    stripe_total = None
    if gateway is not None and settings.stripe_meter_id and account.stripe_customer_id:
        start, end = period_bounds(period)
        try:
            stripe_total = await gateway.meter_total(
                settings.stripe_meter_id,
                account.stripe_customer_id,
                int(start.timestamp()),
                int(end.timestamp()),
            )
        except StripeFailure as exc:
            log.warning("could not read Stripe's meter summary", extra={"error": str(exc)})
    if failed or (stripe_total is not None and stripe_total != sent):
        status = "mismatch"
        log.warning(
            "usage does not reconcile with Stripe",
            extra={
                "tenant_id": str(tenant.id),
                "period": period.isoformat(),
                "billable": billable,
                "sent": sent,
                "failed": failed,
                "stripe_total": stripe_total,
            },
        )
    elif queued < billable or sent < queued:
        status = "pending"
    else:
        status = "ok"
    found = Reconciliation(
        tenant_id=tenant.id,
        period_start=period,
        counted=counted,
        billable=billable,
        queued=queued,
        sent=sent,
        failed=failed,
        stripe_total=stripe_total,
        status=status,
    )
    async with db.control() as conn:
        await conn.execute(
            "INSERT INTO sjaak.usage_reconciliations (tenant_id, period_start, checked_at,"
            " counted, billable, queued, sent, failed, stripe_total, status)"
            " VALUES ($1, $2, now(), $3, $4, $5, $6, $7, $8, $9)"
            " ON CONFLICT (tenant_id, period_start) DO UPDATE SET checked_at = now(),"
            " counted = excluded.counted, billable = excluded.billable,"
            " queued = excluded.queued, sent = excluded.sent, failed = excluded.failed,"
            " stripe_total = excluded.stripe_total, status = excluded.status",
            tenant.id,
            period,
            counted,
            billable,
            queued,
            sent,
            failed,
            stripe_total,
            status,
        )
    return found


async def reconcile_all(
    db: Database, gateway: StripeGateway | None, settings: Settings, plans: PlanBook, now: datetime
) -> int:
    """Reconcile every shop with a Stripe customer, then raise missed quota alerts everywhere.
    Returns the number of shop-months that do not reconcile."""
    async with db.control() as conn:
        rows = await conn.fetch(
            "SELECT tenant_id FROM sjaak.billing_accounts WHERE stripe_customer_id IS NOT NULL"
            " ORDER BY tenant_id"
        )
    mismatched = 0
    for row in rows:
        try:
            found = await reconcile_account(db, gateway, settings, plans, row["tenant_id"], now)
        except Exception:
            log.exception("could not reconcile a shop", extra={"tenant_id": str(row[0])})
            continue
        mismatched += sum(1 for r in found if r.status == "mismatch")
    await raise_missed_alerts(db, plans, now)
    return mismatched


async def raise_missed_alerts(
    db: Database, plans: PlanBook, now: datetime, shops: list[Tenant] | None = None
) -> int:
    """Quota alerts for shops past a threshold that no ingest transaction raised (two
    concurrent ones can each see the other's count missing), in ``shops`` (default: every
    active shop). Returns how many were raised."""
    async with db.control() as conn:
        rows = await conn.fetch(
            "SELECT tenant_id FROM sjaak.billing_accounts WHERE status <> 'free'"
        )
        accounts = {r["tenant_id"]: await load_account(conn, r["tenant_id"]) for r in rows}
    period = period_start(now)

    async def work(conn: TenantConn, tenant: Tenant) -> int:
        account = accounts.get(tenant.id) or Account(tenant_id=tenant.id)
        plan = entitlement_of(account, plans, now).plan
        total = await used(conn, period)
        raised = 0
        for percent in THRESHOLDS:
            if total * 100 >= plan.touchpoints_per_month * percent:
                raised += await raise_alert(conn, plan, period, percent, total)
        return raised

    if shops is None:
        return await in_every_shop(db, "billing-alerts", work)
    raised = 0
    for shop in shops:

        async def one(conn: TenantConn, shop: Tenant = shop) -> int:
            return await work(conn, shop)

        raised += await in_tenant(db, shop, one)
    return raised
