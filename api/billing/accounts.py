"""A shop's billing account: plan, status and Stripe ids, in ``sjaak.billing_accounts``.

A shop without a row is on Free. What a request may do is its :class:`Entitlement`: the plan whose
limits apply and the status as of now (a past-due subscription whose grace period has ended is
restricted from that moment, whether or not the worker's sweep has written it yet). Every API
process keeps entitlements for ``SJAAK_REVOCATION_POLL_SECONDS`` (5 s), so a change of plan or
status reaches every process within that bound.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import asyncpg
import msgspec

from api.auth.guards import Limits
from api.auth.principal import Principal
from api.auth.rate_limit import RateLimit
from api.billing.plans import Plan, PlanBook, PlanId
from api.db import ControlConn, Database

Status = Literal["free", "trialing", "active", "past_due", "restricted", "canceled"]
#: Statuses in which the subscription's plan applies (restricted: its limits, but no ingest).
SUBSCRIBED: frozenset[str] = frozenset({"trialing", "active", "past_due", "restricted"})

_COLUMNS = (
    "tenant_id, plan, status, status_reason, stripe_customer_id, subscription_id,"
    " subscription_status, subscription_created, current_period_start, current_period_end,"
    " cancel_at_period_end, trial_end, past_due_since, grace_until"
)
_CACHE_LIMIT = 10_000


class Account(msgspec.Struct, frozen=True, kw_only=True):
    """One shop's row (or the Free default when it has none)."""

    tenant_id: UUID
    plan: PlanId = "free"
    status: Status = "free"
    status_reason: str | None = None
    stripe_customer_id: str | None = None
    subscription_id: str | None = None
    subscription_status: str | None = None
    subscription_created: datetime | None = None
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    cancel_at_period_end: bool = False
    trial_end: datetime | None = None
    past_due_since: datetime | None = None
    grace_until: datetime | None = None

    def status_at(self, now: datetime) -> Status:
        """The status as of ``now``: past due beyond the grace period is restricted."""
        if self.status == "past_due" and self.grace_until is not None and now >= self.grace_until:
            return "restricted"
        return self.status

    @property
    def plan_in_force(self) -> PlanId:
        return self.plan if self.status in SUBSCRIBED else "free"


class Entitlement(msgspec.Struct, frozen=True, kw_only=True):
    """What the shop may do now."""

    tenant_id: UUID
    plan: Plan
    status: Status
    reason: str | None
    grace_until: datetime | None

    @property
    def restricted(self) -> bool:
        return self.status == "restricted"


def entitlement_of(account: Account, plans: PlanBook, now: datetime) -> Entitlement:
    status = account.status_at(now)
    reason = account.status_reason
    if status == "restricted" and account.status == "past_due":
        reason = restricted_reason(plans[account.plan], account.past_due_since, account.grace_until)
    return Entitlement(
        tenant_id=account.tenant_id,
        plan=plans[account.plan_in_force],
        status=status,
        reason=reason,
        grace_until=account.grace_until,
    )


def restricted_reason(
    plan: Plan, past_due_since: datetime | None, grace_until: datetime | None
) -> str:
    since = f" on {past_due_since:%Y-%m-%d}" if past_due_since else ""
    ended = f" ended on {grace_until:%Y-%m-%d %H:%M} UTC" if grace_until else " has ended"
    return f"The {plan.name} subscription's payment failed{since} and the grace period{ended}."


def _account(row: asyncpg.Record) -> Account:
    return msgspec.convert(dict(row), Account)


async def load_account(conn: ControlConn, tenant_id: UUID) -> Account:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM sjaak.billing_accounts WHERE tenant_id = $1", tenant_id
    )
    return Account(tenant_id=tenant_id) if row is None else _account(row)


async def lock_account(conn: ControlConn, tenant_id: UUID) -> Account:
    """The shop's row, created when missing, locked until the transaction ends: every change to
    an account (Stripe events, checkout, the grace sweep) is serialised on it."""
    await conn.execute(
        "INSERT INTO sjaak.billing_accounts (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING",
        tenant_id,
    )
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM sjaak.billing_accounts WHERE tenant_id = $1 FOR UPDATE",
        tenant_id,
    )
    assert row is not None
    return _account(row)


async def account_by_customer(conn: ControlConn, customer: str) -> UUID | None:
    tenant_id: UUID | None = await conn.fetchval(
        "SELECT tenant_id FROM sjaak.billing_accounts WHERE stripe_customer_id = $1", customer
    )
    return tenant_id


_SAVED = (
    "plan",
    "status",
    "status_reason",
    "stripe_customer_id",
    "subscription_id",
    "subscription_status",
    "subscription_created",
    "current_period_start",
    "current_period_end",
    "cancel_at_period_end",
    "trial_end",
    "past_due_since",
    "grace_until",
)
_SAVE_SQL = (
    "UPDATE sjaak.billing_accounts SET "
    + ", ".join(f"{name} = ${n}" for n, name in enumerate(_SAVED, start=2))
    + ", synced_at = now(), updated_at = now() WHERE tenant_id = $1"
)


async def save_account(
    conn: ControlConn, before: Account, after: Account, *, actor: str, cause: str | None
) -> None:
    """Write ``after`` (the row must be locked) and audit a change of plan or status."""
    await conn.execute(_SAVE_SQL, after.tenant_id, *(getattr(after, name) for name in _SAVED))
    if (before.status, before.plan) != (after.status, after.plan):
        await audit(
            conn,
            after.tenant_id,
            actor,
            "billing.status_changed",
            {
                "from": {"status": before.status, "plan": before.plan},
                "to": {"status": after.status, "plan": after.plan},
                "reason": after.status_reason,
                "subscription": after.subscription_id,
                "cause": cause,
            },
        )


async def audit(
    conn: ControlConn, tenant_id: UUID, actor: str, action: str, details: dict[str, Any]
) -> None:
    await conn.execute(
        "INSERT INTO sjaak.audit_log (tenant_id, actor, action, details) VALUES ($1, $2, $3, $4)",
        tenant_id,
        actor,
        action,
        details,
    )


class Entitlements:
    """Each shop's account, kept in this process for ``ttl`` seconds."""

    def __init__(self, db: Database, plans: PlanBook, ttl: float) -> None:
        self._db = db
        self.plans = plans
        self._ttl = ttl
        self._accounts: OrderedDict[UUID, tuple[float, Account]] = OrderedDict()
        self._rate_limits = {
            plan.id: RateLimit(plan.rate_limit.per_second, plan.rate_limit.burst)
            for plan in plans.plans.values()
        }

    async def account(self, tenant_id: UUID) -> Account:
        cached = self._accounts.get(tenant_id)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self._db.control() as conn:
            account = await load_account(conn, tenant_id)
        if self._ttl > 0:
            self._accounts[tenant_id] = (now + self._ttl, account)
            self._accounts.move_to_end(tenant_id)
            while len(self._accounts) > _CACHE_LIMIT:
                self._accounts.popitem(last=False)
        return account

    async def of(self, tenant_id: UUID, now: datetime) -> Entitlement:
        return entitlement_of(await self.account(tenant_id), self.plans, now)

    def forget(self, tenant_id: UUID) -> None:
        self._accounts.pop(tenant_id, None)

    def rate_limit(self, plan_id: PlanId) -> RateLimit:
        return self._rate_limits[plan_id]

    async def shop_rate_limit(self, tenant_id: UUID) -> RateLimit:
        return self._rate_limits[(await self.account(tenant_id)).plan_in_force]


class PlanLimits(Limits):
    """The rate limits of :mod:`api.auth.guards`: per credential from the settings, per shop from
    the shop's plan (``shop`` is Free's)."""

    def __init__(self, credential: RateLimit, entitlements: Entitlements) -> None:
        super().__init__(credential, entitlements.rate_limit("free"))
        self._entitlements = entitlements

    async def for_shop(self, principal: Principal) -> RateLimit:
        return await self._entitlements.shop_rate_limit(principal.tenant.id)
