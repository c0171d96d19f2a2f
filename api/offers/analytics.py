"""A campaign's results: did the offer make people buy, measured against the holdout."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Literal

import msgspec

from api.db import TenantConn
from api.offers.campaigns import get

#: Two-sided 95 % normal quantile.
Z95 = 1.959963984540054


class ArmResult(msgspec.Struct, frozen=True, kw_only=True):
    arm: Literal["treatment", "holdout"]
    #: Null for the whole arm.
    variant: str | None
    customers: int
    issued: int
    redeemed: int
    #: redeemed / issued (null when nothing was issued).
    redemption_rate: float | None
    #: Customers with a purchase within the window after their assignment.
    converted: int
    conversion_rate: float | None
    #: Purchases in the window, per currency, in minor units.
    revenue: dict[str, int]
    revenue_per_customer: dict[str, float]


class Uplift(msgspec.Struct, frozen=True, kw_only=True):
    #: Null: the whole treatment; else one variant against the holdout.
    variant: str | None
    #: Conversion rate of the treatment minus the holdout's, with its 95 % confidence interval
    #: (normal approximation for a difference of two proportions).
    absolute: float
    ci_low: float
    ci_high: float
    #: ``absolute`` / the holdout's rate (null when that is 0).
    relative: float | None


class CampaignResults(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["campaign_results"] = "campaign_results"
    campaign_id: str
    window_days: int
    treatment: ArmResult
    holdout: ArmResult
    variants: list[ArmResult]
    #: Null while either arm has no customers.
    uplift: Uplift | None
    variant_uplift: list[Uplift]


_SQL = """
WITH a AS (
    SELECT customer_ref, arm, variant, assigned_at FROM campaign_assignments
    WHERE campaign_id = $1
),
o AS (
    SELECT customer_ref, count(*) AS issued, count(redeemed_at) AS redeemed FROM offers
    WHERE campaign_id = $1 GROUP BY customer_ref
),
p AS (
    SELECT a.customer_ref, t.currency, count(*) AS purchases, sum(t.amount)::bigint AS revenue
    FROM a JOIN touchpoints t ON t.customer_ref = a.customer_ref AND t.type = 'purchase'
        AND t.occurred_at >= a.assigned_at
        AND t.occurred_at < a.assigned_at + make_interval(days => $2)
    GROUP BY a.customer_ref, t.currency
)
SELECT a.arm, a.variant, a.customer_ref, coalesce(o.issued, 0) AS issued,
    coalesce(o.redeemed, 0) AS redeemed, p.currency, coalesce(p.revenue, 0) AS revenue,
    coalesce(p.purchases, 0) AS purchases
FROM a LEFT JOIN o USING (customer_ref) LEFT JOIN p USING (customer_ref)
"""


class _Tally:
    def __init__(self) -> None:
        self.customers: set[int] = set()
        self.converted: set[int] = set()
        self.issued: dict[int, int] = {}
        self.redeemed: dict[int, int] = {}
        self.revenue: dict[str, int] = defaultdict(int)

    def result(self, arm: Literal["treatment", "holdout"], variant: str | None) -> ArmResult:
        n = len(self.customers)
        issued, redeemed = sum(self.issued.values()), sum(self.redeemed.values())
        return ArmResult(
            arm=arm,
            variant=variant,
            customers=n,
            issued=issued,
            redeemed=redeemed,
            redemption_rate=redeemed / issued if issued else None,
            converted=len(self.converted),
            conversion_rate=len(self.converted) / n if n else None,
            revenue=dict(self.revenue),
            revenue_per_customer={c: round(v / n, 2) for c, v in self.revenue.items()} if n else {},
        )


def uplift(treated: ArmResult, holdout: ArmResult) -> Uplift | None:
    if not treated.customers or not holdout.customers:
        return None
    pt, ph = treated.converted / treated.customers, holdout.converted / holdout.customers
    diff = pt - ph
    se = math.sqrt(pt * (1 - pt) / treated.customers + ph * (1 - ph) / holdout.customers)
    return Uplift(
        variant=treated.variant,
        absolute=diff,
        ci_low=diff - Z95 * se,
        ci_high=diff + Z95 * se,
        relative=diff / ph if ph else None,
    )


async def campaign_results(conn: TenantConn, campaign_id: str, window_days: int) -> CampaignResults:
    await get(conn, campaign_id)  # a 404 for an unknown campaign
    arms = {"treatment": _Tally(), "holdout": _Tally()}
    variants: dict[str, _Tally] = defaultdict(_Tally)
    for row in await conn.fetch(_SQL, campaign_id, window_days):
        tallies = [arms[row["arm"]]]
        if row["arm"] == "treatment" and row["variant"] is not None:
            tallies.append(variants[row["variant"]])
        for tally in tallies:
            ref = row["customer_ref"]
            tally.customers.add(ref)
            tally.issued[ref] = row["issued"]
            tally.redeemed[ref] = row["redeemed"]
            if row["purchases"]:
                tally.converted.add(ref)
                tally.revenue[row["currency"]] += row["revenue"]
    holdout = arms["holdout"].result("holdout", None)
    treatment = arms["treatment"].result("treatment", None)
    by_variant = [variants[name].result("treatment", name) for name in sorted(variants)]
    return CampaignResults(
        campaign_id=campaign_id,
        window_days=window_days,
        treatment=treatment,
        holdout=holdout,
        variants=by_variant,
        uplift=uplift(treatment, holdout),
        variant_uplift=[u for v in by_variant if (u := uplift(v, holdout)) is not None],
    )
