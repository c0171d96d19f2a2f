"""Paths to the first purchase: how many contacts and how many days it took, and over which
channels.

- The customers: profiles not merged into another whose first purchase (their earliest
  ``purchase`` touchpoint) occurred in the period.
- Touchpoints before it: their touchpoints of any type that occurred strictly before it (the same
  count as the customer journey's ``touchpoints_before_first_purchase``).
- Days to it: whole days (24 hours, rounded down) from ``first_seen_at`` to the first purchase.
- The channel sequence: the channels of those touchpoints in time order, consecutive repeats
  collapsed into one, keeping the last :data:`MAX_SEQUENCE` (the ones nearest the purchase).
"""

from __future__ import annotations

from typing import Any

from api.analytics.filters import Filters, acquisition_channel_sql
from api.analytics.schemas import Bucket, ChannelSequence, Distribution, Paths
from api.db import TenantConn

MAX_SEQUENCE = 5
DEFAULT_TOP = 10
MAX_TOP = 50
#: The lower bound of each bucket; each runs to the next one's bound minus one, the last is open.
TOUCHPOINT_BUCKETS = (0, 1, 2, 3, 4, 5, 10, 20)
DAY_BUCKETS = (0, 1, 7, 14, 30, 60, 90, 180)


def _paths_sql(with_channel: bool) -> str:
    # $1, $2: the period; $3, $4: bucket bounds; $5: how many sequences; $6: the channel.
    # The first purchases come from the purchases alone (a scan of purchase rows, not of every
    # customer's timeline); only the buyers' touchpoints before it are read in full.
    channel = f"AND {acquisition_channel_sql('b.id')} = $6" if with_channel else ""
    return f"""
WITH candidates AS MATERIALIZED (
    SELECT c.id, c.first_seen_at
    FROM customers AS c
    WHERE c.merged_into IS NULL AND c.last_purchase_at >= $1 AND c.first_seen_at < $2
),
buyers AS MATERIALIZED (
    SELECT b.id, b.first_seen_at, f.bought_at
    FROM (
        SELECT t.customer_ref, min(t.occurred_at) AS bought_at
        FROM touchpoints AS t
        WHERE t.type = 'purchase' AND t.occurred_at < $2
            AND t.customer_ref IN (SELECT id FROM candidates)
        GROUP BY t.customer_ref
    ) AS f
    JOIN candidates AS b ON b.id = f.customer_ref
    WHERE f.bought_at >= $1 {channel}
),
before AS (
    SELECT b.id, t.id AS touch, t.occurred_at, t.channel,
        t.channel IS DISTINCT FROM lag(t.channel) OVER ordered AS starts_run
    FROM buyers AS b
    JOIN touchpoints AS t ON t.customer_ref = b.id AND t.occurred_at < b.bought_at
        AND t.occurred_at < $2
    WINDOW ordered AS (PARTITION BY b.id ORDER BY t.occurred_at, t.id)
),
numbered AS (
    -- Runs of one channel are numbered oldest first; the last ones are kept. All three windows
    -- share the order of ``before``: no new sort.
    SELECT id, touch, occurred_at, channel, starts_run,
        count(*) OVER whole AS touches,
        count(*) FILTER (WHERE starts_run) OVER whole AS runs,
        count(*) FILTER (WHERE starts_run) OVER ordered AS run
    FROM before
    WINDOW whole AS (PARTITION BY id), ordered AS (PARTITION BY id ORDER BY occurred_at, touch)
),
paths AS (
    SELECT id, max(touches) AS touches,
        array_agg(channel ORDER BY occurred_at, touch)
            FILTER (WHERE starts_run AND run > runs - {MAX_SEQUENCE}) AS sequence
    FROM numbered
    GROUP BY id
),
per_buyer AS MATERIALIZED (
    SELECT coalesce(p.touches, 0) AS touches,
        floor(extract(epoch FROM b.bought_at - b.first_seen_at) / 86400)::int AS days,
        coalesce(p.sequence, '{{}}'::text[]) AS sequence
    FROM buyers AS b
    LEFT JOIN paths AS p ON p.id = b.id
)
SELECT 'summary' AS kind, NULL::int AS bucket, NULL::text[] AS sequence, count(*) AS customers,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY touches) AS median_touches,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY days) AS median_days
FROM per_buyer
UNION ALL
SELECT 'touches', width_bucket(touches, $3::bigint[]), NULL, count(*), NULL, NULL
FROM per_buyer GROUP BY 2
UNION ALL
SELECT 'days', width_bucket(days, $4::int[]), NULL, count(*), NULL, NULL
FROM per_buyer GROUP BY 2
UNION ALL
(SELECT 'sequence', NULL, sequence, count(*), NULL, NULL
 FROM per_buyer GROUP BY sequence ORDER BY count(*) DESC, sequence LIMIT $5)
"""


_SQL = {with_channel: _paths_sql(with_channel) for with_channel in (False, True)}


async def paths(conn: TenantConn, filters: Filters, *, top: int = DEFAULT_TOP) -> Paths:
    args: list[Any] = [
        filters.start,
        filters.end,
        list(TOUCHPOINT_BUCKETS),
        list(DAY_BUCKETS),
        top,
    ]
    if filters.channel is not None:
        args.append(filters.channel)
    rows = await conn.fetch(_SQL[filters.channel is not None], *args)
    summary = next(row for row in rows if row["kind"] == "summary")
    counts: dict[str, dict[int, int]] = {"touches": {}, "days": {}}
    for row in rows:
        if row["kind"] in counts:
            counts[row["kind"]][row["bucket"]] = row["customers"]
    return Paths(
        from_=filters.start,
        to=filters.end,
        channel=filters.channel,
        customers=summary["customers"],
        touchpoints_before_purchase=_distribution(
            summary["median_touches"], TOUCHPOINT_BUCKETS, counts["touches"]
        ),
        days_to_purchase=_distribution(summary["median_days"], DAY_BUCKETS, counts["days"]),
        top_sequences=sorted(
            (
                ChannelSequence(channels=list(row["sequence"]), customers=row["customers"])
                for row in rows
                if row["kind"] == "sequence"
            ),
            # The statement's own order (rows of a UNION come in no promised order).
            key=lambda sequence: (-sequence.customers, sequence.channels),
        ),
    )


def _distribution(
    median: float | None, bounds: tuple[int, ...], counts: dict[int, int]
) -> Distribution:
    """``counts`` is keyed by ``width_bucket``'s 1-based bucket number."""
    uppers: list[int | None] = [bound - 1 for bound in bounds[1:]]
    uppers.append(None)
    return Distribution(
        median=median,
        buckets=[
            Bucket(min=low, max=high, customers=counts.get(number, 0))
            for number, (low, high) in enumerate(zip(bounds, uppers, strict=True), start=1)
        ],
    )
