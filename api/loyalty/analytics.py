"""The programme's figures: what moved in a period, and what the shop owes now."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from api.db import TenantConn


class PointsMoved(msgspec.Struct, frozen=True, kw_only=True):
    #: Points earned (``earn`` entries).
    issued: int
    #: Points spent by redemptions.
    redeemed: int
    expired: int
    #: Points refunds took back.
    reversed: int
    #: Points given back because the order they paid for was refunded.
    given_back: int
    adjusted_up: int
    adjusted_down: int


class TierCount(msgspec.Struct, frozen=True, kw_only=True):
    #: Null: customers with an account but below the lowest tier.
    tier: str | None
    customers: int


class LoyaltyFigures(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["loyalty_analytics"] = "loyalty_analytics"
    start: datetime
    end: datetime
    period: PointsMoved
    #: Points the shop owes now: available (positive balances) plus pending.
    outstanding_available: int
    outstanding_pending: int
    #: Points customers owe after refunds the programme let go below zero.
    negative_balances: int
    customers_with_points: int
    tiers: list[TierCount]


_PERIOD_SQL = """
SELECT
    coalesce(sum(lifetime_delta) FILTER (WHERE kind = 'earn'), 0) AS issued,
    coalesce(-sum(available_delta) FILTER (WHERE kind = 'redeem'), 0) AS redeemed,
    coalesce(-sum(available_delta) FILTER (WHERE kind = 'expire'), 0) AS expired,
    coalesce(-sum(lifetime_delta) FILTER (WHERE kind = 'reverse'), 0) AS reversed,
    coalesce(sum(available_delta) FILTER (WHERE kind = 'reverse' AND available_delta > 0), 0)
        AS given_back,
    coalesce(sum(available_delta) FILTER (WHERE kind = 'adjust' AND available_delta > 0), 0)
        AS adjusted_up,
    coalesce(-sum(available_delta) FILTER (WHERE kind = 'adjust' AND available_delta < 0), 0)
        AS adjusted_down
FROM loyalty_entries WHERE occurred_at >= $1 AND occurred_at < $2
"""

_NOW_SQL = """
SELECT coalesce(sum(greatest(available, 0)), 0) AS available,
    coalesce(sum(pending), 0) AS pending,
    coalesce(-sum(least(available, 0)), 0) AS negative,
    count(*) FILTER (WHERE available > 0 OR pending > 0) AS holders
FROM loyalty_accounts
"""


async def loyalty_figures(conn: TenantConn, start: datetime, end: datetime) -> LoyaltyFigures:
    moved = await conn.fetchrow(_PERIOD_SQL, start, end)
    now = await conn.fetchrow(_NOW_SQL)
    assert moved is not None and now is not None
    tier_rows = await conn.fetch(
        "SELECT tier, count(*) AS customers FROM loyalty_accounts GROUP BY tier"
        " ORDER BY tier NULLS FIRST"
    )
    return LoyaltyFigures(
        start=start,
        end=end,
        period=PointsMoved(**{key: int(moved[key]) for key in PointsMoved.__struct_fields__}),
        outstanding_available=int(now["available"]),
        outstanding_pending=int(now["pending"]),
        negative_balances=int(now["negative"]),
        customers_with_points=int(now["holders"]),
        tiers=[TierCount(tier=r["tier"], customers=r["customers"]) for r in tier_rows],
    )
