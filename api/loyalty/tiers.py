"""Tiers: reached at once, lowered only when reviewed, and then one step at a time by default.

A tier is earned by what a customer did in a rolling window: points earned (minus reversed) or
spend (purchases minus refunds in the programme's currency). Spending points never counts, so a
redemption never lowers a tier.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

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


class Params:
    """Numbered query parameters added as a statement is put together ($1 is taken)."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def add(self, value: Any, cast: str) -> str:
        self.values.append(value)
        return f"${len(self.values) + 1}::{cast}"


def window_value_sql(program: Program, now: datetime, params: Params) -> str:
    """A scalar subquery over ``a.customer_ref``: what counts for tiers in the rolling window
    up to ``now`` (points earned less reversed, or purchases less refunds in minor units)."""
    since = params.add(now - timedelta(days=program.tiers.window_days), "timestamptz")
    until = params.add(now, "timestamptz")
    if program.tiers.basis == "points_earned":
        return (
            "(SELECT coalesce(sum(e.lifetime_delta), 0) FROM loyalty_entries e"
            " WHERE e.customer_ref = a.customer_ref AND e.kind IN ('earn', 'reverse')"
            f" AND e.occurred_at > {since} AND e.occurred_at <= {until})"
        )
    currency = params.add(program.spend.currency, "text")
    return (
        "(SELECT coalesce(sum(CASE t.type WHEN 'purchase' THEN t.amount ELSE -t.amount END), 0)"
        " FROM touchpoints t WHERE t.customer_ref = a.customer_ref"
        f" AND t.type IN ('purchase', 'refund') AND t.currency = {currency}"
        f" AND t.occurred_at > {since} AND t.occurred_at <= {until})"
    )


async def window_values(
    conn: TenantConn, program: Program, refs: Iterable[int], now: datetime
) -> dict[int, int]:
    """What each customer did in the tier window up to ``now``."""
    params = Params()
    value = window_value_sql(program, now, params)
    rows = await conn.fetch(
        f"SELECT a.customer_ref, {value} AS value FROM unnest($1::bigint[]) AS a(customer_ref)",
        list(refs),
        *params.values,
    )
    return {row["customer_ref"]: int(row["value"]) for row in rows}


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
