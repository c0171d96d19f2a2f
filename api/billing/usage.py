"""Usage on the ingest path: every accepted touchpoint is counted once, quotas are enforced, and
crossing 80 % and 100 % of the quota raises a domain event.

- **Counted in the statement that stores.** Ingest's touchpoint ``INSERT`` carries a second,
  data-modifying part (:func:`counting`) that appends one row, the number of rows it stored, to
  the shop's ``usage_log``: no extra round trip, no row another transaction could be waiting
  for, and the count commits or rolls back with the touchpoints. Duplicates and rejected items
  are not stored, so they are not counted.
- **Folded by readers.** A month's usage is its row in ``usage_totals`` plus what is still in the
  log (:func:`used`, exact in one snapshot). Each API process folds a shop's log into its total
  when it needs a fresh figure, at most once a second per shop (every request when
  ``SJAAK_REVOCATION_POLL_SECONDS`` is 0, as in the tests), and adds what it stores itself in
  between.
- **Quotas.** Restricted shops get 402 before any work. On Free, a request is refused with 429
  when the month's quota is used up as of the process's figure (at most a second old); a request
  admitted under the quota is stored whole. Paid plans are never refused: the touchpoints above
  the quota are billed (:mod:`api.billing.metering`).
- **Alerts.** When the figure reaches 80 % or 100 % of the quota, ``billing.quota_warning`` /
  ``billing.quota_reached`` go to the shop's outbox, checked against the exact count and raised
  once per month and quota (``usage_alerts``); the reconciliation job raises any a crash lost.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from time import monotonic
from uuid import UUID

import msgspec
from litestar.datastructures import State

from api.billing.accounts import Entitlement, Entitlements
from api.billing.plans import Plan
from api.db import Database, Tenant, TenantConn, in_tenant
from api.errors import PROBLEM_TYPES, Problem, ProblemType

#: How old a process's figure of a shop's month may be before it folds and reads it again.
FIGURE_SECONDS = 1.0
THRESHOLDS = (80, 100)
ALERT_TYPES = {80: "billing.quota_warning", 100: "billing.quota_reached"}
_MEMORY = 10_000

PAYMENT_REQUIRED = "payment-required"
QUOTA_EXCEEDED = "quota-exceeded"
PLAN_LIMIT = "plan-limit-reached"
PROBLEM_TYPES[PAYMENT_REQUIRED] = ProblemType(
    PAYMENT_REQUIRED,
    402,
    "Payment required",
    "The shop's subscription is restricted because a payment failed and its grace period ended "
    "(or the trial ended without a payment method). Reads keep working; ingest is refused until "
    "the invoice is paid. `detail` says why; pay or update the payment method through the "
    "billing portal (`POST /v1/billing/portal`).",
)
PROBLEM_TYPES[QUOTA_EXCEEDED] = ProblemType(
    QUOTA_EXCEEDED,
    429,
    "Monthly quota used up",
    "The shop has used the touchpoints its Free plan includes this month. Ingest resumes at the "
    "start of next month (`Retry-After` says when) or at once after subscribing to a paid plan "
    "(`POST /v1/billing/checkout`), which bills touchpoints over its quota instead of refusing "
    "them.",
)
PROBLEM_TYPES[PLAN_LIMIT] = ProblemType(
    PLAN_LIMIT,
    403,
    "Plan limit reached",
    "The shop's plan allows no more of this resource; `detail` says which limit. Remove one or "
    "change plan (`POST /v1/billing/checkout`).",
)

_USED_SQL = """
SELECT (coalesce((SELECT touchpoints FROM usage_totals WHERE period_start = $1), 0)
    + coalesce((SELECT sum(touchpoints) FROM usage_log WHERE period_start = $1), 0))::bigint
"""
_FOLD_SQL = """
WITH folded AS (DELETE FROM usage_log WHERE period_start = $1 RETURNING touchpoints)
INSERT INTO usage_totals AS t (period_start, touchpoints)
SELECT $1, sum(touchpoints) FROM folded HAVING count(*) > 0
ON CONFLICT (period_start)
    DO UPDATE SET touchpoints = t.touchpoints + excluded.touchpoints, folded_at = now()
"""
# Raised once per month, quota and threshold, whoever gets there first.
_ALERT_SQL = """
WITH raised AS (
    INSERT INTO usage_alerts (period_start, quota, percent, touchpoints) VALUES ($1, $2, $3, $4)
    ON CONFLICT DO NOTHING
    RETURNING period_start
)
INSERT INTO outbox (type, customer_ref, payload, occurred_at)
SELECT $5, NULL, $6::text::jsonb, now() FROM raised
"""
_encode = msgspec.json.Encoder().encode


def counting(insert_sql: str, period_parameter: int) -> str:
    """``insert_sql``, an ``INSERT INTO touchpoints … RETURNING event_id``, extended to append
    the number of rows it stored to the usage log of the month given as parameter
    ``$period_parameter``; it still returns the stored ids."""
    return (
        f"WITH stored AS ({insert_sql.strip()}),\n"
        "counted AS (INSERT INTO usage_log (period_start, touchpoints)"
        f" SELECT ${period_parameter}, count(*) FROM stored HAVING count(*) > 0)\n"
        "SELECT event_id FROM stored"
    )


def period_start(moment: datetime) -> date:
    """The calendar month (UTC) ``moment`` falls in, by its first day."""
    return moment.astimezone(UTC).date().replace(day=1)


def next_period(start: date) -> date:
    return date(start.year + start.month // 12, start.month % 12 + 1, 1)


def period_bounds(start: date) -> tuple[datetime, datetime]:
    return (
        datetime.combine(start, time(), UTC),
        datetime.combine(next_period(start), time(), UTC),
    )


async def used(conn: TenantConn, period: date) -> int:
    """Touchpoints the shop had accepted in the month, as committed."""
    return int(await conn.fetchval(_USED_SQL, period))


async def fold(conn: TenantConn, period: date) -> int:
    """Fold the month's log into its total; returns the month's usage."""
    await conn.execute(_FOLD_SQL, period)
    return await used(conn, period)


class _Figure:
    """A shop's month as this process last counted it."""

    __slots__ = ("at", "period", "total")

    def __init__(self, period: date, total: int, at: float) -> None:
        self.period = period
        self.total = total
        self.at = at


class _Figures:
    """Each shop's month, folded and read at most every ``max_age`` seconds; what this process
    stores in between is added on."""

    def __init__(self) -> None:
        self._figures: OrderedDict[UUID, _Figure] = OrderedDict()

    async def total(self, db: Database, tenant: Tenant, period: date, max_age: float) -> int:
        figure = self._figures.get(tenant.id)
        now = monotonic()
        if figure is not None and figure.period == period and now - figure.at < max_age:
            return figure.total

        async def read(conn: TenantConn) -> int:
            return await fold(conn, period)

        total = await in_tenant(db, tenant, read)
        self._figures[tenant.id] = _Figure(period, total, now)
        self._figures.move_to_end(tenant.id)
        while len(self._figures) > _MEMORY:
            self._figures.popitem(last=False)
        return total

    def add(self, tenant_id: UUID, period: date, accepted: int) -> None:
        figure = self._figures.get(tenant_id)
        if figure is not None and figure.period == period:
            figure.total += accepted


class _Raised:
    """The alerts this process knows were raised (bounded: forgetting one costs a query)."""

    def __init__(self) -> None:
        self._keys: OrderedDict[tuple[UUID, date, int, int], None] = OrderedDict()

    def __contains__(self, key: tuple[UUID, date, int, int]) -> bool:
        return key in self._keys

    def add(self, key: tuple[UUID, date, int, int]) -> None:
        self._keys[key] = None
        while len(self._keys) > _MEMORY:
            self._keys.popitem(last=False)


_figures = _Figures()
_alerted = _Raised()


@dataclass
class UsageGate:
    """One ingest request's view of its shop's plan and month. Ingest counts into
    :attr:`period` (``ingest.record(…, usage_period=gate.period)``); :meth:`settle` runs after
    the transaction committed."""

    db: Database
    tenant: Tenant
    entitlement: Entitlement
    period: date
    max_age: float

    @property
    def plan(self) -> Plan:
        return self.entitlement.plan

    async def settle(self, accepted: int) -> None:
        """Add what the request stored to the month's figure and raise the alerts it reached."""
        if accepted <= 0:
            return
        _figures.add(self.tenant.id, self.period, accepted)
        total = await _figures.total(self.db, self.tenant, self.period, self.max_age)
        quota = self.plan.touchpoints_per_month
        key = (self.tenant.id, self.period, quota)
        due = [p for p in THRESHOLDS if total * 100 >= quota * p and (*key, p) not in _alerted]
        if due:
            await raise_alerts(self.db, self.tenant, self.plan, self.period, due)
            for percent in due:
                _alerted.add((*key, percent))


async def raise_alerts(
    db: Database, tenant: Tenant, plan: Plan, period: date, percents: list[int]
) -> int:
    """The given thresholds' alerts that the exact count has reached and nobody raised yet."""

    async def work(conn: TenantConn) -> int:
        total = await used(conn, period)
        raised = 0
        for percent in percents:
            if total * 100 >= plan.touchpoints_per_month * percent:
                raised += await raise_alert(conn, plan, period, percent, total)
        return raised

    return await in_tenant(db, tenant, work)


async def raise_alert(conn: TenantConn, plan: Plan, period: date, percent: int, total: int) -> bool:
    """Write the month's ``percent`` alert to the outbox unless it was raised before."""
    start, end = period_bounds(period)
    payload = {
        "percent": percent,
        "plan": plan.id,
        "quota": plan.touchpoints_per_month,
        "touchpoints": total,
        "period_start": start.isoformat(),
        "period_end": end.isoformat(),
        "over_quota": "refused" if plan.hard_quota else "billed",
    }
    status = await conn.execute(
        _ALERT_SQL,
        period,
        plan.touchpoints_per_month,
        percent,
        total,
        ALERT_TYPES[percent],
        _encode(payload).decode(),
    )
    return status.endswith(" 1")


async def admit_ingest(state: State, tenant: Tenant, now: datetime) -> UsageGate | None:
    """Before ingest does any work: 402 for a restricted shop, 429 for a Free shop whose month's
    quota is used up. ``None`` when usage metering is off (benchmarks only)."""
    settings = state.settings
    if not settings.usage_metering:
        return None
    entitlements: Entitlements = state.entitlements
    entitlement = await entitlements.of(tenant.id, now)
    if entitlement.restricted:
        raise payment_required(entitlement)
    gate = UsageGate(
        db=state.db,
        tenant=tenant,
        entitlement=entitlement,
        period=period_start(now),
        max_age=min(FIGURE_SECONDS, settings.revocation_poll_seconds),
    )
    plan = entitlement.plan
    if plan.hard_quota:
        total = await _figures.total(gate.db, tenant, gate.period, gate.max_age)
        if total >= plan.touchpoints_per_month:
            raise quota_exceeded(plan, gate.period)
    return gate


def payment_required(entitlement: Entitlement) -> Problem:
    reason = entitlement.reason or "The subscription is restricted."
    return Problem(
        PAYMENT_REQUIRED,
        f"{reason} Ingest is paused until the open invoice is paid: pay it or update the payment"
        " method in the billing portal (POST /v1/billing/portal). Ingest resumes within seconds"
        " of the payment; reads keep working meanwhile.",
    )


def quota_exceeded(plan: Plan, period: date) -> Problem:
    resumes, _ = period_bounds(next_period(period))
    seconds = max(1, int((resumes - datetime.now(UTC)).total_seconds()))
    return Problem(
        QUOTA_EXCEEDED,
        f"This shop has used the {plan.touchpoints_per_month:,} touchpoints its {plan.name} plan"
        f" includes for {period:%B %Y}. Ingest resumes on {resumes:%Y-%m-%d} 00:00 UTC, or at"
        " once on a paid plan (POST /v1/billing/checkout), which bills the overage instead.",
        headers={"Retry-After": str(seconds)},
    )
