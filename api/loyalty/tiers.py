"""Tiers: reached at once, lowered only when reviewed, and then one step at a time by default.

A tier is earned by what a customer did in a rolling window: points earned (minus reversed) or
spend (purchases minus refunds in the programme's currency). Spending points never counts, so a
redemption never lowers a tier.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from api.db import TenantConn
from api.loyalty.ledger import Account, emit
from api.loyalty.program import Program, Tier


def rank(program: Program, tier: str | None) -> int:
    """0-based position among the levels; -1 for none (or a tier the programme dropped)."""
    for index, level in enumerate(program.tiers.levels):
        if level.name == tier:
            return index
    return -1


def qualified(program: Program, value: int) -> int:
    """The highest level whose threshold ``value`` reaches (-1: none)."""
    reached = -1
    for index, level in enumerate(program.tiers.levels):
        if value >= level.threshold:
            reached = index
    return reached


def level_of(program: Program, tier: str | None) -> Tier | None:
    index = rank(program, tier)
    return program.tiers.levels[index] if index >= 0 else None


def multiplier_percent(program: Program, tier: str | None) -> int:
    level = level_of(program, tier)
    return level.multiplier_percent if level is not None else 100


async def window_values(
    conn: TenantConn, program: Program, refs: Iterable[int], now: datetime
) -> dict[int, int]:
    """What each customer did in the tier window up to ``now`` (points or minor units)."""
    since = now - timedelta(days=program.tiers.window_days)
    refs = list(refs)
    if program.tiers.basis == "points_earned":
        rows = await conn.fetch(
            "SELECT customer_ref, sum(lifetime_delta) AS value FROM loyalty_entries"
            " WHERE customer_ref = ANY($1::bigint[]) AND kind IN ('earn', 'reverse')"
            " AND occurred_at > $2 AND occurred_at <= $3 GROUP BY customer_ref",
            refs,
            since,
            now,
        )
    else:
        rows = await conn.fetch(
            "SELECT customer_ref, sum(CASE type WHEN 'purchase' THEN amount ELSE -amount END)"
            " AS value FROM touchpoints WHERE customer_ref = ANY($1::bigint[])"
            " AND type IN ('purchase', 'refund') AND currency = $2"
            " AND occurred_at > $3 AND occurred_at <= $4 GROUP BY customer_ref",
            refs,
            program.spend.currency,
            since,
            now,
        )
    values = dict.fromkeys(refs, 0)
    values.update({row["customer_ref"]: int(row["value"]) for row in rows})
    return values


def move_tier(account: Account, program: Program, to: int, reason: str, now: datetime) -> None:
    """Set the tier (index ``to``, -1 for none), record the change and its event, and start a
    new review period."""
    levels = program.tiers.levels
    new = levels[to].name if to >= 0 else None
    old = account.tier
    account.tier_review_at = now + timedelta(days=program.tiers.review_after_days)
    account.changed = True
    if new == old:
        return
    account.tier = new
    account.tier_since = now
    account.tier_changes.append((old, new, reason, now))
    emit(account, "loyalty.tier_changed", {"from": old, "to": new, "reason": reason}, now)


def upgrade(account: Account, program: Program, value: int, now: datetime) -> None:
    """Raise the tier at once when ``value`` reaches a higher one; never lowers it."""
    reached = qualified(program, value)
    if reached > rank(program, account.tier):
        move_tier(account, program, reached, "threshold reached", now)


def review(account: Account, program: Program, value: int, now: datetime) -> None:
    """The periodic review: keep or raise the tier the customer qualifies for, else lower it
    (one step by default)."""
    current = rank(program, account.tier)
    reached = qualified(program, value)
    if reached >= current:
        move_tier(account, program, reached, "tier confirmed at review", now)
    elif program.tiers.downgrade == "one_step":
        move_tier(account, program, current - 1, "below threshold at review", now)
    else:
        move_tier(account, program, reached, "below threshold at review", now)
