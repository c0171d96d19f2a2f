"""Deciding: which campaigns a customer is eligible for right now, which one wins, and issuing it.

Eligibility is read from the profile's aggregates, the loyalty account and the customer's offer
history (two or three indexed reads whatever the number of campaigns), then every campaign is
judged in memory, so each gets a reason. Issuing serialises per customer (an advisory lock) so
per-customer limits hold under concurrency, and takes the global budget with a conditional
``UPDATE``, so concurrent issues never pass it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec

from api.db import TenantConn
from api.offers.campaigns import Campaign, Reward, Targeting
from api.webhooks.events import publish

Arm = Literal["treatment", "holdout"]
#: No look-alikes (0/O, 1/I/L): codes are read aloud and typed in.
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Profile:
    ref: int
    customer_id: str | None
    stage: str | None
    rfm_segment: str | None
    loyalty_tier: str | None
    points: int
    order_count: int
    revenue: dict[str, int]


@dataclass
class History:
    """The customer's offers per campaign, and whether they hold a live non-stacking offer."""

    count: dict[str, int]
    last_issued: dict[str, datetime]
    holding: set[str]  # campaigns of live offers that do not stack
    recent: dict[str, datetime]  # touchpoint type -> last time, for recency targeting


@dataclass(frozen=True)
class Verdict:
    campaign: Campaign
    eligible: bool
    reason: str
    arm: Arm
    variant: str | None


class OfferView(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["offer"] = "offer"
    id: str
    campaign_id: str
    customer_id: str | None
    variant: str | None
    code: str
    reward: Reward
    stackable: bool
    status: Literal["active", "redeemed", "expired"]
    issued_at: datetime
    expires_at: datetime
    redeemed_at: datetime | None
    redeemed_order_id: str | None
    #: What the redemption saved the customer, in minor units (when known).
    discount: int | None


async def load_profile(conn: TenantConn, ref: int) -> Profile:
    row = await conn.fetchrow(
        "SELECT c.id, c.customer_id, c.stage, c.rfm_segment, c.loyalty_tier, c.order_count,"
        " c.revenue, coalesce(a.available, 0) AS points FROM customers c"
        " LEFT JOIN loyalty_accounts a ON a.customer_ref = c.id WHERE c.id = $1",
        ref,
    )
    assert row is not None
    return Profile(
        ref=ref,
        customer_id=row["customer_id"],
        stage=row["stage"],
        rfm_segment=row["rfm_segment"],
        loyalty_tier=row["loyalty_tier"],
        points=row["points"],
        order_count=row["order_count"],
        revenue=row["revenue"],
    )


#: The customer's offers per campaign and, in the same round trip, the last touchpoint of each
#: type that recency targeting asks about (rows with a ``type``).
_HISTORY_SQL = (
    "SELECT campaign_id, count(*) AS n, max(issued_at) AS last,"
    " bool_or(redeemed_at IS NULL AND expires_at > $2 AND NOT stackable) AS holding,"
    " NULL::text AS type FROM offers WHERE customer_ref = $1 GROUP BY campaign_id"
    " UNION ALL SELECT NULL, NULL, max(occurred_at), NULL, type FROM touchpoints"
    " WHERE customer_ref = $1 AND occurred_at > $3 AND type = ANY($4::text[]) GROUP BY type"
)


async def load_history(
    conn: TenantConn, ref: int, campaigns: list[Campaign], now: datetime
) -> History:
    wanted = [c.spec.targeting.recent_touchpoints for c in campaigns]
    windows = [w for w in wanted if w is not None]
    since = now - timedelta(days=max((w.within_days for w in windows), default=0))
    types = sorted({t for w in windows for t in w.types})
    rows = await conn.fetch(_HISTORY_SQL, ref, now, since, types)
    offers = [r for r in rows if r["type"] is None]
    return History(
        count={r["campaign_id"]: r["n"] for r in offers},
        last_issued={r["campaign_id"]: r["last"] for r in offers},
        holding={r["campaign_id"] for r in offers if r["holding"]},
        recent={r["type"]: r["last"] for r in rows if r["type"] is not None},
    )


def assignment(campaign: Campaign, ref: int) -> tuple[Arm, str | None]:
    """The customer's arm and variant: a hash of campaign and customer, so the same customer
    always lands in the same place, and the shares come out near the configured ones."""
    digest = hashlib.sha256(f"{campaign.id}:{ref}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 10_000
    arm: Arm = "holdout" if bucket < campaign.spec.holdout_percent * 100 else "treatment"
    variants = campaign.spec.variants
    if not variants:
        return arm, None
    point = int.from_bytes(digest[8:16], "big") % sum(v.weight for v in variants)
    for variant in variants:
        if point < variant.weight:
            return arm, variant.name
        point -= variant.weight
    raise AssertionError("weights cover every point")


def targeting_miss(
    targeting: Targeting,
    profile: Profile,
    history: History,
    now: datetime,
    cart_value: int | None = None,
) -> str:
    """Why the profile is outside the targeting ('' when inside)."""
    if targeting.min_cart_value is not None and (cart_value or 0) < targeting.min_cart_value:
        return f"cart value {cart_value} below {targeting.min_cart_value}"
    if targeting.stages is not None and profile.stage not in targeting.stages:
        return f"stage is {profile.stage}, not one of {targeting.stages}"
    if targeting.rfm_segments is not None and profile.rfm_segment not in targeting.rfm_segments:
        return f"RFM segment is {profile.rfm_segment}, not one of {targeting.rfm_segments}"
    if targeting.loyalty_tiers is not None and profile.loyalty_tier not in targeting.loyalty_tiers:
        return f"loyalty tier is {profile.loyalty_tier}, not one of {targeting.loyalty_tiers}"
    for name, value in (("points", profile.points), ("orders", profile.order_count)):
        bounds = getattr(targeting, name)
        if bounds is not None and not (
            (bounds.at_least is None or value >= bounds.at_least)
            and (bounds.at_most is None or value <= bounds.at_most)
        ):
            return f"{name} ({value}) out of range"
    if targeting.spend is not None:
        spent = profile.revenue.get(targeting.spend.currency, 0)
        if spent < targeting.spend.at_least:
            return f"spend {spent} {targeting.spend.currency} below {targeting.spend.at_least}"
    recent = targeting.recent_touchpoints
    if recent is not None:
        since = now - timedelta(days=recent.within_days)
        if not any(history.recent.get(t, since) > since for t in recent.types):
            return f"no {'/'.join(recent.types)} touchpoint in the last {recent.within_days} days"
    return ""


def judge(
    campaign: Campaign,
    profile: Profile,
    history: History,
    now: datetime,
    *,
    triggered: bool,
    cart_value: int | None = None,
) -> Verdict:
    """One campaign's verdict for one customer, with the reason it would or would not fire."""
    arm, variant = assignment(campaign, profile.ref)
    spec, limits = campaign.spec, campaign.spec.limits

    def no(reason: str) -> Verdict:
        return Verdict(campaign, False, reason, arm, variant)

    if spec.status != "active":
        return no(f"campaign is {spec.status}")
    if spec.starts_at is not None and now < spec.starts_at:
        return no("campaign has not started")
    if spec.ends_at is not None and now >= spec.ends_at:
        return no("campaign has ended")
    if not triggered and spec.trigger is not None:
        return no(f"fires only on a {spec.trigger.event} touchpoint")
    if profile.customer_id is None:
        return no("offers go to known customers only")
    miss = targeting_miss(spec.targeting, profile, history, now, cart_value)
    if miss:
        return no(miss)
    received = history.count.get(campaign.id, 0)
    if limits.per_customer is not None and received >= limits.per_customer:
        return no(f"customer already received {received} (limit {limits.per_customer})")
    last = history.last_issued.get(campaign.id)
    if last is not None and now - last < timedelta(days=limits.cooldown_days):
        return no(f"cooldown of {limits.cooldown_days} days since the last offer")
    if limits.max_issued is not None and campaign.counts.issued >= limits.max_issued:
        return no("the campaign's budget is spent")
    others = history.holding - {campaign.id}
    if not limits.stackable and others:
        return no("customer holds another offer that does not stack")
    if arm == "holdout":
        return Verdict(campaign, True, "eligible; in the holdout, so nothing is sent", arm, variant)
    return Verdict(campaign, True, "eligible", arm, variant)


def choose(verdicts: list[Verdict]) -> list[Verdict]:
    """The winner is the first eligible verdict (campaigns come highest priority first); more
    are issued with it only while it and they all stack."""
    chosen: list[Verdict] = []
    for verdict in verdicts:
        if not verdict.eligible:
            continue
        if not chosen or all(v.campaign.spec.limits.stackable for v in (*chosen, verdict)):
            chosen.append(verdict)
    return chosen


async def lock_customer(conn: TenantConn, ref: int) -> None:
    """Serialise issuing for one customer, so per-customer limits hold under concurrency."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('sjaak.offers'), $1::int)", ref % 2**31
    )


def new_code(campaign: Campaign) -> str:
    code = campaign.spec.code
    return code.prefix + "".join(secrets.choice(CODE_ALPHABET) for _ in range(code.length))


def reward_of(campaign: Campaign, variant: str | None) -> Reward:
    for v in campaign.spec.variants:
        if v.name == variant and v.reward is not None:
            return v.reward
    return campaign.spec.reward


_OFFER_COLUMNS = (
    "o.id, o.campaign_id, c.customer_id, o.variant, o.code, o.reward, o.stackable, o.issued_at,"
    " o.expires_at, o.redeemed_at, o.redeemed_order_id, o.discount"
)


def offer_view(row: Any, now: datetime) -> OfferView:
    status: Literal["active", "redeemed", "expired"] = (
        "redeemed"
        if row["redeemed_at"] is not None
        else ("expired" if row["expires_at"] <= now else "active")
    )
    return OfferView(
        id=row["id"],
        campaign_id=row["campaign_id"],
        customer_id=row["customer_id"],
        variant=row["variant"],
        code=row["code"],
        reward=msgspec.convert(row["reward"], Reward),
        stackable=row["stackable"],
        status=status,
        issued_at=row["issued_at"],
        expires_at=row["expires_at"],
        redeemed_at=row["redeemed_at"],
        redeemed_order_id=row["redeemed_order_id"],
        discount=row["discount"],
    )


#: Record the customer's arm and find the offer ``cause`` already issued, in one round trip (a
#: data-modifying ``WITH`` runs whether or not the query reads it).
_ASSIGN_SQL = (
    "WITH assigned AS (INSERT INTO campaign_assignments (campaign_id, customer_ref, arm, variant,"
    " assigned_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING)"
    f" SELECT {_OFFER_COLUMNS} FROM offers o JOIN customers c ON c.id = o.customer_ref"
    " WHERE o.cause = $6"
)
#: Take one from the budget, insert the offer and its ``offer.issued`` event in one statement.
#: The campaign's row stays locked from here to COMMIT and every concurrent issue of the
#: campaign queues on it, so no other round trip comes between the two.
_ISSUE_SQL = (
    "WITH taken AS (UPDATE campaigns SET issued_count = issued_count + 1 WHERE id = $2"
    " AND ($11::bigint IS NULL OR issued_count < $11) RETURNING id),"
    " offer AS (INSERT INTO offers (id, campaign_id, customer_ref, variant, code, reward,"
    " stackable, issued_at, expires_at, cause) SELECT $1::text, taken.id, $3::bigint,"
    " $4::text, $5::text, $6::jsonb, $7::boolean, $8::timestamptz, $9::timestamptz, $10::text"
    " FROM taken ON CONFLICT (code) DO NOTHING RETURNING customer_ref),"
    " event AS (INSERT INTO outbox (type, customer_ref, payload, occurred_at)"
    " SELECT 'offer.issued', customer_ref, $12::text::jsonb, $8 FROM offer)"
    " SELECT EXISTS (SELECT FROM taken) AS taken, EXISTS (SELECT FROM offer) AS inserted"
)
_INSERT_OFFER_SQL = (
    "INSERT INTO offers (id, campaign_id, customer_ref, variant, code, reward, stackable,"
    " issued_at, expires_at, cause) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    " ON CONFLICT (code) DO NOTHING RETURNING id"
)


async def issue(
    conn: TenantConn, verdict: Verdict, profile: Profile, now: datetime, cause: str
) -> OfferView | None:
    """Record the customer's arm; in the treatment, issue the offer (once per ``cause``).
    ``None`` for the holdout, or when the budget ran out meanwhile."""
    campaign = verdict.campaign
    existing = await conn.fetchrow(
        _ASSIGN_SQL, campaign.id, profile.ref, verdict.arm, verdict.variant, now, cause
    )
    if verdict.arm == "holdout":
        return None
    if existing is not None:
        return offer_view(existing, now)
    expires = now + timedelta(days=campaign.spec.offer_valid_days)
    if campaign.spec.ends_at is not None:
        expires = min(expires, campaign.spec.ends_at)
    reward = reward_of(campaign, verdict.variant)
    view = OfferView(
        id="ofr_" + secrets.token_hex(10),
        campaign_id=campaign.id,
        customer_id=profile.customer_id,
        variant=verdict.variant,
        code=new_code(campaign),
        reward=reward,
        stackable=campaign.spec.limits.stackable,
        status="active",
        issued_at=now,
        expires_at=expires,
        redeemed_at=None,
        redeemed_order_id=None,
        discount=None,
    )
    row = await conn.fetchrow(
        _ISSUE_SQL,
        view.id,
        campaign.id,
        profile.ref,
        view.variant,
        view.code,
        msgspec.to_builtins(reward),
        view.stackable,
        now,
        expires,
        cause,
        campaign.spec.limits.max_issued,
        _encode(view).decode(),
    )
    assert row is not None
    if not row["taken"]:
        return None
    if row["inserted"]:
        return view
    for _ in range(4):  # a clash of random codes is astronomically rare; retry a few times
        view = msgspec.structs.replace(view, code=new_code(campaign))
        inserted = await conn.fetchval(
            _INSERT_OFFER_SQL,
            view.id,
            campaign.id,
            profile.ref,
            view.variant,
            view.code,
            msgspec.to_builtins(reward),
            view.stackable,
            now,
            expires,
            cause,
        )
        if inserted is not None:
            await publish(
                conn, "offer.issued", msgspec.to_builtins(view), profile.ref, occurred_at=now
            )
            return view
    raise RuntimeError("could not draw a unique coupon code")


async def customer_offers(
    conn: TenantConn, ref: int, now: datetime, status: str | None
) -> list[OfferView]:
    rows = await conn.fetch(
        f"SELECT {_OFFER_COLUMNS} FROM offers o JOIN customers c ON c.id = o.customer_ref"
        " WHERE o.customer_ref = $1 ORDER BY o.issued_at DESC, o.id DESC LIMIT 500",
        ref,
    )
    offers = [offer_view(row, now) for row in rows]
    return [o for o in offers if status is None or o.status == status]


async def merge_offers(conn: TenantConn, absorbed: int, survivor: int) -> None:
    """A profile merge: the absorbed customer's offers and scheduled decisions move to the
    survivor; where both were assigned to a campaign, the survivor's arm stands."""
    for table in ("offers", "offer_triggers"):
        await conn.execute(
            f"UPDATE {table} SET customer_ref = $2 WHERE customer_ref = $1", absorbed, survivor
        )
    await conn.execute(
        "DELETE FROM campaign_assignments a WHERE a.customer_ref = $1 AND EXISTS (SELECT 1"
        " FROM campaign_assignments b WHERE b.customer_ref = $2 AND b.campaign_id = a.campaign_id)",
        absorbed,
        survivor,
    )
    await conn.execute(
        "UPDATE campaign_assignments SET customer_ref = $2 WHERE customer_ref = $1",
        absorbed,
        survivor,
    )
