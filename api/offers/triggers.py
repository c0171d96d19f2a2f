"""When offers are decided: on request, or when a touchpoint matches a campaign's trigger (then
by the worker, after the trigger's delay, unless a cancelling touchpoint arrived meanwhile).
And what ingest does for offers: coupon codes on purchases redeem, whole refunds give back."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec

from api.db import Database, TenantConn, in_tenant
from api.errors import Problem
from api.jobs import JobContext, enqueue
from api.loyalty.earning import Stored
from api.offers import coupons
from api.offers.campaigns import Campaign, active_campaigns, get
from api.offers.decide import (
    OfferView,
    choose,
    issue,
    judge,
    load_history,
    load_profile,
    lock_customer,
)
from api.tenants.lifecycle import list_tenants

log = logging.getLogger("sjaak.offers")
DECIDE_ENTRYPOINT = "offers.decide"


class CartItem(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    product_id: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    quantity: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1
    unit_price: Annotated[int, msgspec.Meta(ge=0, le=10**13)] = 0
    category: Annotated[str, msgspec.Meta(max_length=255)] | None = None


class TriggerContext(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    page: Annotated[str, msgspec.Meta(max_length=2048)] | None = None
    #: Minor units; campaigns may require a minimum (``targeting.min_cart_value``).
    cart_value: Annotated[int, msgspec.Meta(ge=0, le=10**13)] | None = None
    items: Annotated[list[CartItem], msgspec.Meta(max_length=500)] = msgspec.field(
        default_factory=list
    )


class TriggerIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    context: TriggerContext = msgspec.field(default_factory=TriggerContext)
    #: Only say which campaigns would fire and why the others would not; nothing is consumed.
    dry_run: bool = False


Outcome = Literal["issued", "holdout", "would_issue", "not_chosen", "not_eligible", "budget_spent"]


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    campaign_id: str
    campaign_name: str
    priority: int
    #: ``issued``, ``holdout`` (eligible, kept as control: nothing sent), ``would_issue`` (dry
    #: run), ``not_chosen`` (eligible but another campaign won and they do not stack),
    #: ``not_eligible``, or ``budget_spent`` (ran out while issuing).
    outcome: Outcome
    reason: str
    arm: Literal["treatment", "holdout"]
    variant: str | None


class TriggerResult(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["offer_decision"] = "offer_decision"
    customer_id: str
    dry_run: bool
    offers: list[OfferView]
    decisions: list[Decision]


async def trigger(
    conn: TenantConn, ref: int, schema: str, body: TriggerIn, now: datetime
) -> TriggerResult:
    """Decide among the shop's active on-request campaigns, by priority; issue unless dry run."""
    campaigns = await active_campaigns(conn, schema)
    if not body.dry_run:
        await lock_customer(conn, ref)
    profile = await load_profile(conn, ref)
    history = await load_history(conn, ref, campaigns, now)
    cart = body.context.cart_value
    verdicts = [
        judge(c, profile, history, now, triggered=False, cart_value=cart) for c in campaigns
    ]
    chosen = {v.campaign.id for v in choose(verdicts)}
    offers: list[OfferView] = []
    decisions = []
    cause = f"request:{uuid.uuid4().hex}"
    for verdict in verdicts:
        campaign = verdict.campaign
        outcome: Outcome
        if not verdict.eligible:
            outcome = "not_eligible"
        elif campaign.id not in chosen:
            outcome = "not_chosen"
        elif verdict.arm == "holdout":
            outcome = "holdout"
            if not body.dry_run:
                await issue(conn, verdict, profile, now, f"{cause}:{campaign.id}")
        elif body.dry_run:
            outcome = "would_issue"
        else:
            offer = await issue(conn, verdict, profile, now, f"{cause}:{campaign.id}")
            outcome = "issued" if offer else "budget_spent"
            if offer:
                offers.append(offer)
        decisions.append(
            Decision(
                campaign_id=campaign.id,
                campaign_name=campaign.spec.name,
                priority=campaign.spec.priority,
                outcome=outcome,
                reason=verdict.reason,
                arm=verdict.arm,
                variant=verdict.variant,
            )
        )
    return TriggerResult(
        customer_id=profile.customer_id or "",
        dry_run=body.dry_run,
        offers=offers,
        decisions=decisions,
    )


# --- on ingest ----------------------------------------------------------------------------------


def _matches(campaign: Campaign, stored: Stored) -> bool:
    trigger = campaign.spec.trigger
    if trigger is None or trigger.event != stored.item.type:
        return False
    properties = stored.item.properties
    return all(properties.get(key) == value for key, value in trigger.properties.items())


async def on_ingest(conn: TenantConn, schema: str, stored: Sequence[Stored], now: datetime) -> None:
    """Redeem coupon codes carried by purchases, give back offers of wholly refunded orders, and
    schedule the decisions of campaigns whose trigger a touchpoint matches."""
    known = [s for s in stored if s.item.customer_id is not None]
    for s in known:
        order = s.item.order
        if order is None:
            continue
        if s.item.type == "purchase":
            for code in order.coupon_codes:
                facts = coupons.OrderFacts(
                    order.order_id, order.amount, order.currency, order.shipping
                )
                try:
                    await coupons.redeem(conn, code, s.ref, facts, s.occurred_at, schema)
                except Problem as refused:
                    # The order stands whatever its code; why the code did not count is logged.
                    log.info(
                        "coupon code on a purchase not redeemed",
                        extra={"code": code, "order_id": order.order_id, "why": refused.detail},
                    )
        elif s.item.type == "refund" and await _wholly_refunded(conn, order.order_id, s.ref):
            await coupons.give_back(conn, order.order_id, s.ref, now)
    campaigns = [c for c in await active_campaigns(conn, schema) if c.spec.trigger is not None]
    for s in known:
        for campaign in campaigns:
            if _matches(campaign, s):
                await _schedule(conn, schema, campaign, s)


async def _wholly_refunded(conn: TenantConn, order_id: str, ref: int) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT coalesce(sum(amount) FILTER (WHERE type = 'refund'), 0)"
            " >= coalesce(max(amount) FILTER (WHERE type = 'purchase'), 1)"
            " FROM touchpoints WHERE order_id = $1 AND customer_ref = $2",
            order_id,
            ref,
        )
    )


async def _schedule(conn: TenantConn, schema: str, campaign: Campaign, s: Stored) -> None:
    assert campaign.spec.trigger is not None
    delay = timedelta(minutes=campaign.spec.trigger.delay_minutes)
    trigger_id = await conn.fetchval(
        "INSERT INTO offer_triggers (campaign_id, customer_ref, event_id, occurred_at, due_at)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING id",
        campaign.id,
        s.ref,
        s.item.id,
        s.occurred_at,
        s.occurred_at + delay,
    )
    if trigger_id is None:
        return
    payload = msgspec.json.encode({"schema": schema, "trigger": trigger_id})
    await enqueue(conn, DECIDE_ENTRYPOINT, payload, delay=delay)


# --- in the worker ------------------------------------------------------------------------------


class _DecidePayload(msgspec.Struct):
    schema: str
    trigger: int


async def decide_job(job: JobContext, payload: bytes | None) -> None:
    """The queued decision of one trigger: idempotent (a decided trigger is left alone)."""
    assert payload is not None
    wanted = msgspec.json.decode(payload, type=_DecidePayload)
    for record in await list_tenants(job.db):
        if record.schema_name == wanted.schema and record.status == "active":
            await decide_trigger(job.db, record.as_tenant(), wanted.trigger)
            return


async def decide_trigger(db: Database, tenant: Any, trigger_id: int) -> str:
    """Decide a scheduled trigger now; returns its final state."""

    async def work(conn: TenantConn) -> str:
        row = await conn.fetchrow(
            "SELECT * FROM offer_triggers WHERE id = $1 FOR UPDATE", trigger_id
        )
        if row is None or row["state"] != "scheduled":
            return row["state"] if row else "missing"
        now = max(datetime.now(row["due_at"].tzinfo), row["due_at"])
        campaign = await get(conn, row["campaign_id"])
        state, outcome = await _decide(conn, campaign, row, now)
        await conn.execute(
            "UPDATE offer_triggers SET state = $2, outcome = $3, decided_at = $4 WHERE id = $1",
            trigger_id,
            state,
            outcome,
            now,
        )
        return state

    return await in_tenant(db, tenant, work)


async def _decide(conn: TenantConn, campaign: Campaign, row: Any, now: datetime) -> tuple[str, str]:
    trigger = campaign.spec.trigger
    ref = row["customer_ref"]
    if trigger is not None and trigger.cancel_on:
        cancelled_by = await conn.fetchval(
            "SELECT event_id FROM touchpoints WHERE customer_ref = $1 AND type = ANY($2::text[])"
            " AND occurred_at > $3 ORDER BY occurred_at LIMIT 1",
            ref,
            trigger.cancel_on,
            row["occurred_at"],
        )
        if cancelled_by is not None:
            return "cancelled", f"cancelled by touchpoint {cancelled_by}"
    await lock_customer(conn, ref)
    profile = await load_profile(conn, ref)
    history = await load_history(conn, ref, [campaign], now)
    cart = await conn.fetchval(
        "SELECT properties->>'cart_value' FROM touchpoints WHERE event_id = $1", row["event_id"]
    )
    cart_value = int(cart) if cart is not None and cart.isdigit() else None
    verdict = judge(campaign, profile, history, now, triggered=True, cart_value=cart_value)
    if not verdict.eligible:
        return "ineligible", verdict.reason
    offer = await issue(conn, verdict, profile, now, f"trigger:{row['id']}")
    if verdict.arm == "holdout":
        return "issued", "holdout: nothing sent"
    return ("issued", offer.id) if offer else ("ineligible", "the campaign's budget is spent")
