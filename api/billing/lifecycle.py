"""The subscription's life as Sjaak follows it: Stripe is the truth, and every change comes from
the subscription as Stripe has it *now*, fetched again, never from an event's payload.

- no subscription: ``free`` (Free limits);
- ``trialing``, ``active``: the same, with the plan's limits;
- ``past_due``: ``past_due`` for the grace period (``SJAAK_BILLING_GRACE_DAYS``), then
  ``restricted`` (the plan's limits, but ingest answers 402);
- ``unpaid``, ``paused``: ``restricted``;
- ``canceled``, ``incomplete_expired``: ``canceled`` (Free limits).

Because each step re-reads the subscription under the account's row lock, events that arrive
twice or out of order converge on the same state. A shop holds one subscription: when a newer one
goes live (a plan change through Checkout), the older one is cancelled in Stripe.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from uuid import UUID

import msgspec

from api.billing.accounts import (
    Account,
    audit,
    lock_account,
    restricted_reason,
    save_account,
)
from api.billing.plans import PLAN_IDS, Plan, PlanBook
from api.billing.stripe_client import StripeGateway, Subscription
from api.db import Database

log = logging.getLogger("sjaak.billing")

#: Stripe statuses of a subscription that still binds the customer.
LIVE = frozenset({"trialing", "active", "past_due", "unpaid", "paused"})
ENDED = frozenset({"canceled", "incomplete_expired"})


class UnknownPlan(ValueError):
    """A subscription whose prices are none of the configured plans'."""


class Sync(msgspec.Struct, frozen=True):
    """What a fetched subscription does to an account."""

    account: Account
    outcome: str
    #: An older live subscription the newer one replaces: cancel it in Stripe.
    superseded: str | None = None


def plan_of(subscription: Subscription, plans: PlanBook) -> Plan:
    plan = plans.by_price(subscription.price_ids)
    if plan is None:
        # Prices may be rotated in the configuration; the checkout put the plan in metadata.
        named = subscription.metadata.get("plan")
        if named in PLAN_IDS and named != "free":
            return plans[named]
        raise UnknownPlan(
            f"subscription {subscription.id} has prices {list(subscription.price_ids)}, none of"
            " which is a configured plan's (SJAAK_BILLING_PLANS)"
        )
    return plan


def apply_subscription(
    account: Account,
    subscription: Subscription,
    plans: PlanBook,
    now: datetime,
    grace: timedelta,
) -> Sync:
    """The account once Stripe says ``subscription`` is as it is (pure: no I/O)."""
    superseded = None
    if subscription.id != account.subscription_id and account.subscription_id is not None:
        if subscription.status not in LIVE:
            return Sync(
                account,
                f"ignored: {subscription.id} is {subscription.status} and not the shop's"
                " current subscription",
            )
        current_live = account.subscription_status in LIVE and account.subscription_id is not None
        created = datetime.fromtimestamp(subscription.created, UTC)
        if current_live and account.subscription_created and created < account.subscription_created:
            return Sync(
                account,
                f"superseded: {subscription.id} is older than {account.subscription_id}",
                superseded=subscription.id,
            )
        superseded = account.subscription_id if current_live else None
    after = _state_for(account, subscription, plans, now, grace)
    return Sync(after, "applied" if after != account else "unchanged", superseded)


def _state_for(
    account: Account, subscription: Subscription, plans: PlanBook, now: datetime, grace: timedelta
) -> Account:
    status = subscription.status
    if status not in LIVE and status not in ENDED:
        return account  # incomplete: not ours until Stripe settles it
    plan = plan_of(subscription, plans)
    period_start, period_end = subscription.current_period
    same = subscription.id == account.subscription_id
    fields: dict[str, object] = {
        "subscription_id": subscription.id,
        "subscription_status": status,
        "subscription_created": _time(subscription.created),
        "current_period_start": _time(period_start),
        "current_period_end": _time(period_end),
        "cancel_at_period_end": subscription.cancel_at_period_end,
        "trial_end": _time(subscription.trial_end),
        "plan": plan.id,
        "past_due_since": None,
        "grace_until": None,
    }
    if status in ENDED:
        fields.update(
            plan="free",
            status="canceled",
            status_reason=f"The {plan.name} subscription was canceled; Free limits apply.",
        )
    elif status == "trialing":
        trial_end = _time(subscription.trial_end)
        ends = f" until {trial_end:%Y-%m-%d}" if trial_end else ""
        fields.update(status="trialing", status_reason=f"Trial of {plan.name}{ends}.")
    elif status == "active":
        fields.update(status="active", status_reason=None)
    elif status == "past_due":
        since: datetime = (same and account.past_due_since) or now
        until = since + grace
        fields.update(past_due_since=since, grace_until=until)
        if now >= until:
            fields.update(status="restricted", status_reason=restricted_reason(plan, since, until))
        else:
            fields.update(
                status="past_due",
                status_reason=f"The latest payment failed; ingest stops on {until:%Y-%m-%d %H:%M}"
                " UTC unless the invoice is paid.",
            )
    else:
        why = (
            "the trial ended without a payment method"
            if status == "paused"
            else "payment failed and Stripe's retries ran out"
        )
        fields.update(
            status="restricted",
            status_reason=f"The {plan.name} subscription is {status}: {why}.",
            past_due_since=account.past_due_since if same else None,
        )
    return msgspec.structs.replace(account, **fields)


def _time(seconds: int | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def choose(subscriptions: list[Subscription], account: Account) -> Subscription | None:
    """Of a customer's subscriptions, the one that decides the account: the newest live one,
    else the account's own, else the newest."""
    live = [s for s in subscriptions if s.status in LIVE]
    if live:
        return max(live, key=lambda s: s.created)
    own = [s for s in subscriptions if s.id == account.subscription_id]
    if own:
        return own[0]
    return max(subscriptions, key=lambda s: s.created) if subscriptions else None


async def sync_subscription(
    db: Database,
    gateway: StripeGateway,
    plans: PlanBook,
    grace: timedelta,
    tenant_id: UUID,
    subscription_id: str | None,
    *,
    cause: str,
    now: datetime | None = None,
) -> str:
    """Fetch the subscription (or, without an id, the customer's subscriptions) from Stripe and
    apply it to the shop's account, under the account's lock; returns what happened."""
    async with db.control() as conn:
        account = await lock_account(conn, tenant_id)
        now = now or datetime.now(UTC)
        if subscription_id is not None:
            subscription = await gateway.subscription(subscription_id)
        elif account.stripe_customer_id is not None:
            subscription = choose(
                await gateway.subscriptions_of(account.stripe_customer_id), account
            )
        else:
            subscription = None
        if subscription is None:
            return "ignored: no such subscription in Stripe"
        if account.stripe_customer_id not in (None, subscription.customer):
            return f"ignored: {subscription.id} belongs to another customer"
        sync = apply_subscription(account, subscription, plans, now, grace)
        if sync.superseded is not None:
            await gateway.cancel_subscription(sync.superseded)
            await audit(
                conn,
                tenant_id,
                "stripe",
                "billing.subscription_superseded",
                {"canceled": sync.superseded, "by": sync.account.subscription_id, "cause": cause},
            )
        if sync.account != account:
            await save_account(conn, account, sync.account, actor="stripe", cause=cause)
    return sync.outcome


async def restrict_overdue(db: Database, plans: PlanBook, now: datetime | None = None) -> int:
    """Restrict every past-due shop whose grace period has ended (the worker's sweep; requests
    already treat them as restricted). Returns how many."""
    now = now or datetime.now(UTC)
    async with db.control() as conn:
        rows = await conn.fetch(
            "SELECT tenant_id FROM sjaak.billing_accounts WHERE status = 'past_due'"
            " AND grace_until <= $1 ORDER BY tenant_id FOR UPDATE SKIP LOCKED",
            now,
        )
        for row in rows:
            before = await lock_account(conn, row["tenant_id"])
            after = msgspec.structs.replace(
                before,
                status="restricted",
                status_reason=restricted_reason(
                    plans[before.plan], before.past_due_since, before.grace_until
                ),
            )
            await save_account(conn, before, after, actor="billing", cause="grace period ended")
    if rows:
        log.info("restricted shops past their grace period", extra={"shops": len(rows)})
    return len(rows)
