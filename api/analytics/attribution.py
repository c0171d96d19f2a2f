"""Attribution: which channels and campaigns get the credit for the purchases of a period.

- The purchases: ``purchase`` touchpoints that occurred in the period, of profiles not merged
  into another (one purchase per touchpoint, its order's ``amount`` in its ``currency``).
- The touches of a purchase: the same customer's touchpoints that occurred in the
  ``lookback_days`` before it (``occurred_at`` at least that long before and strictly before
  the purchase), purchases and refunds excluded, ordered by ``occurred_at`` (then as stored).
- The models, for *n* touches: first-touch gives the whole purchase to the first; last-touch to
  the last; linear 1/n to each; position-based 40% to the first, 40% to the last and 20% split
  evenly over those between (one touch: 100%; two: 50% each).
- A purchase without touches is credited, in every model, wholly to its own channel and its own
  ``utm_campaign``, and counted in ``purchases_without_prior_touch``.
- Dimensions: the touch's ``channel`` and its ``context.utm_campaign`` (missing or empty:
  ``(none)``).
- Rounding, only at the end: the shares are summed exactly (SQL ``numeric``) per dimension value,
  model and currency. The revenue of each model and currency is then rounded down to whole minor
  units and the units left over go one each to the values with the largest fractional parts
  (ties: by name), so each model's rows add up exactly to ``revenue``. Purchase credits are
  rounded half up to 4 decimals.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Any, cast

from api.analytics.filters import Filters, acquisition_channel_sql
from api.analytics.rounding import apportion, four_places
from api.analytics.schemas import (
    MODELS,
    Attribution,
    CampaignAttribution,
    ChannelAttribution,
    Credit,
    Model,
)
from api.db import TenantConn
from api.touchpoints.schemas import Channel

DEFAULT_LOOKBACK_DAYS = 30
MAX_LOOKBACK_DAYS = 365
NO_CAMPAIGN = "(none)"

_CAMPAIGN = "coalesce(nullif({0}.context ->> 'utm_campaign', ''), '" + NO_CAMPAIGN + "')"


def _attribution_sql(with_channel: bool) -> str:
    # $1, $2: the period; $3: lookback days; $4: the channel.
    # Every (purchase, touch) pair is first counted per channel, campaign, currency, number of
    # touches n and place (first, last, between, or a purchase without touches) with integer
    # sums only; a model's weight depends on nothing else, so the exact shares are computed once
    # per such cell, and the dimensions and totals are rolled up from the cells.
    # Each purchase's touches are numbered in a lateral subquery, in the order the
    # touchpoints_timeline index hands them over, so the pairs of a whole period (~400,000 for 90
    # days of a 100,000-customer shop) are never sorted together, which is what took the time.
    channel = f"AND {acquisition_channel_sql('c.id')} = $4" if with_channel else ""
    rollup = ",\n    ".join(
        f"sum({model} * pairs) AS {model}_purchases, sum({model} * amount) AS {model}_revenue"
        for model in MODELS
    )
    return f"""
WITH pairs AS (
    SELECT coalesce(p.amount, 0) AS amount, p.currency,
        coalesce(t.channel, p.channel) AS channel,
        CASE WHEN t.n IS NULL THEN {_CAMPAIGN.format("p")} ELSE t.campaign END AS campaign,
        coalesce(t.n, 0) AS n, t.position
    FROM customers AS c
    JOIN touchpoints AS p ON p.customer_ref = c.id
        AND p.occurred_at >= $1 AND p.occurred_at < $2 AND p.type = 'purchase'
    LEFT JOIN LATERAL (
        SELECT t.channel, {_CAMPAIGN.format("t")} AS campaign,
            count(*) OVER w AS n, row_number() OVER w AS position
        FROM touchpoints AS t
        WHERE t.customer_ref = p.customer_ref
            AND t.occurred_at >= p.occurred_at - make_interval(days => $3)
            AND t.occurred_at < p.occurred_at
            AND t.type NOT IN ('purchase', 'refund')
        WINDOW w AS (ORDER BY t.occurred_at, t.id
            ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
    ) AS t ON true
    WHERE c.merged_into IS NULL AND c.last_purchase_at >= $1 AND c.first_seen_at < $2 {channel}
),
cells AS (
    SELECT channel, campaign, currency, n,
        CASE WHEN n = 0 THEN 'alone' WHEN position = 1 THEN 'first' WHEN position = n THEN 'last'
            ELSE 'between' END AS place,
        count(*) AS pairs, sum(amount) AS amount
    FROM pairs
    GROUP BY 1, 2, 3, 4, 5
),
weighted AS (
    SELECT channel, campaign, currency, place, pairs, amount,
        CASE WHEN place IN ('alone', 'first') THEN 1 ELSE 0 END AS first_touch,
        CASE WHEN place IN ('alone', 'last') OR n = 1 THEN 1 ELSE 0 END AS last_touch,
        CASE WHEN n = 0 THEN 1 ELSE 1::numeric(40, 30) / n END AS linear,
        CASE WHEN n <= 1 THEN 1 WHEN n = 2 THEN 0.5 WHEN place = 'between'
            THEN 0.2::numeric(40, 30) / (n - 2) ELSE 0.4 END AS position_based
    FROM cells
)
SELECT CASE WHEN grouping(channel) = 0 THEN 'channel'
        WHEN grouping(campaign) = 0 THEN 'utm_campaign' ELSE 'total' END AS dimension,
    coalesce(channel, campaign) AS key, currency,
    sum(pairs) FILTER (WHERE place = 'alone') AS without_touch,
    {rollup}
FROM weighted
GROUP BY GROUPING SETS ((channel, currency), (campaign, currency), (currency))
"""


_SQL = {with_channel: _attribution_sql(with_channel) for with_channel in (False, True)}

#: The planner cannot know how many touches a purchase's look-back window holds (it guesses about
#: one; a large shop has ~15), so it would sort the pairs to count the cells, which takes several
#: times as long as hashing them. Transaction-local, like the rest of the analytics session.
_HASH_THE_CELLS = "SET LOCAL enable_sort = off"

#: (dimension, key) -> model -> (purchases, {currency: revenue share})
_Shares = dict[tuple[str, str], dict[Model, tuple[Decimal, dict[str, Decimal]]]]


async def attribution(
    conn: TenantConn, filters: Filters, *, lookback_days: int = DEFAULT_LOOKBACK_DAYS
) -> Attribution:
    args: list[Any] = [filters.start, filters.end, lookback_days]
    if filters.channel is not None:
        args.append(filters.channel)
    await conn.execute(_HASH_THE_CELLS)
    rows = await conn.fetch(_SQL[filters.channel is not None], *args)
    revenue: dict[str, int] = {}
    purchases = without_touch = 0
    shares: _Shares = defaultdict(dict)
    for row in rows:
        currency = row["currency"]
        if row["dimension"] == "total":
            # First-touch credits each purchase exactly once, with its whole amount.
            purchases += int(row["first_touch_purchases"])
            without_touch += int(row["without_touch"] or 0)
            revenue[currency] = int(row["first_touch_revenue"])
            continue
        by_model = shares[(row["dimension"], row["key"])]
        for model in MODELS:
            count, money = by_model.get(model, (Decimal(0), {}))
            money[currency] = row[f"{model}_revenue"]
            by_model[model] = (count + row[f"{model}_purchases"], money)
    credits = _credits(shares, revenue)
    return Attribution(
        from_=filters.start,
        to=filters.end,
        channel=filters.channel,
        lookback_days=lookback_days,
        purchases=purchases,
        purchases_without_prior_touch=without_touch,
        revenue=dict(sorted(revenue.items())),
        by_channel=[
            ChannelAttribution(
                channel=cast(Channel, key),
                first_touch=by_model["first_touch"],
                last_touch=by_model["last_touch"],
                linear=by_model["linear"],
                position_based=by_model["position_based"],
            )
            for (dimension, key), by_model in sorted(credits.items(), key=_by_key)
            if dimension == "channel"
        ],
        by_utm_campaign=[
            CampaignAttribution(
                utm_campaign=key,
                first_touch=by_model["first_touch"],
                last_touch=by_model["last_touch"],
                linear=by_model["linear"],
                position_based=by_model["position_based"],
            )
            for (dimension, key), by_model in sorted(credits.items(), key=_by_key)
            if dimension == "utm_campaign"
        ],
    )


def _credits(
    shares: _Shares, revenue: dict[str, int]
) -> dict[tuple[str, str], dict[Model, Credit]]:
    """Round the exact shares: revenue by largest remainder within each dimension, model and
    currency (so the rows add up to ``revenue``), purchases half up to 4 decimals."""
    rounded: dict[tuple[str, str, Model, str], int] = {}
    for dimension in ("channel", "utm_campaign"):
        for model in MODELS:
            for currency, total in revenue.items():
                parts = {
                    key: by_model[model][1][currency]
                    for (dim, key), by_model in shares.items()
                    if dim == dimension and currency in by_model[model][1]
                }
                for key, units in apportion(parts, total).items():
                    rounded[(dimension, key, model, currency)] = units
    return {
        (dimension, key): {
            model: Credit(
                purchases=four_places(count),
                revenue={
                    currency: rounded[(dimension, key, model, currency)]
                    for currency in sorted(money)
                },
            )
            for model, (count, money) in by_model.items()
        }
        for (dimension, key), by_model in shares.items()
    }


def _by_key(item: tuple[tuple[str, str], dict[Model, Credit]]) -> tuple[str, str]:
    return item[0]
