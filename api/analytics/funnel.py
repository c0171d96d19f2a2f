"""The funnel: how far the customers first seen in a period got, and how fast, per acquisition
channel.

- The cohort: profiles not merged into another whose ``first_seen_at`` is in the period.
- A customer *reached* a stage when the furthest of the six stages they ever reached is that
  stage or a later one: their ``reached_stage``, or a later stage a transition once took them to
  (so a manual move back does not undo a conversion). Reaching a later stage counts as passing
  every earlier one, so the counts never increase along the funnel.
- The time a customer reached a stage: awareness at ``first_seen_at``; any other stage at the
  earliest transition into it *or any later stage* (a skipped stage is passed at the moment of the
  stage that skipped it, so a step a customer jumped over takes 0 seconds).
- Per step, the median and 75th percentile (``percentile_cont``) of the time between reaching the
  two stages, over the customers who reached the second one.
"""

from __future__ import annotations

from typing import Any, cast

import asyncpg

from api.analytics.filters import Filters, acquisition_channel_sql
from api.analytics.rounding import ratio, whole
from api.analytics.schemas import Funnel, FunnelGroup, FunnelStep
from api.customers.schemas import Stage
from api.db import TenantConn
from api.journey.rules import STAGES

_LEVELS = range(1, len(STAGES) + 1)


def _funnel_sql(with_channel: bool) -> str:
    # $1, $2: the period; $3: the stages in order (their 1-based rank is the position); $4 the
    # channel. Generated from constants only.
    reach_times = "".join(
        f",\n        min(s.occurred_at) FILTER (WHERE s.rank >= {k}) AS at{k}" for k in _LEVELS[1:]
    )
    reached = ", ".join(f"count(*) FILTER (WHERE top >= {k})" for k in _LEVELS)
    # Median then 75th percentile of each step (the two share one sort).
    times = ", ".join(
        f"percentile_cont({fraction}) WITHIN GROUP"
        f" (ORDER BY extract(epoch FROM at{k + 1} - at{k})::float8)"
        for k in _LEVELS[:-1]
        for fraction in ("0.5", "0.75")
    )
    channel = "AND co.channel = $4" if with_channel else ""
    return f"""
WITH cohort AS MATERIALIZED (
    SELECT c.id, c.first_seen_at, array_position($3::text[], c.reached_stage) AS reached_rank,
        {acquisition_channel_sql("c.id")} AS channel
    FROM customers AS c
    WHERE c.merged_into IS NULL AND c.first_seen_at >= $1 AND c.first_seen_at < $2
),
reach AS (
    SELECT co.channel,
        coalesce(greatest(co.reached_rank, max(s.rank)), 1) AS top,
        co.first_seen_at AS at1{reach_times}
    FROM cohort AS co
    LEFT JOIN (
        SELECT customer_ref, occurred_at, array_position($3::text[], to_stage) AS rank
        FROM stage_transitions
    ) AS s ON s.customer_ref = co.id
    WHERE co.channel IS NOT NULL {channel}
    GROUP BY co.id, co.channel, co.first_seen_at, co.reached_rank
)
SELECT grouping(channel) = 1 AS is_total, channel,
    ARRAY[{reached}] AS reached,
    ARRAY[{times}] AS times
FROM reach
GROUP BY GROUPING SETS ((channel), ())
"""


_SQL = {with_channel: _funnel_sql(with_channel) for with_channel in (False, True)}


async def funnel(conn: TenantConn, filters: Filters) -> Funnel:
    args: list[Any] = [filters.start, filters.end, list(STAGES)]
    if filters.channel is not None:
        args.append(filters.channel)
    rows = await conn.fetch(_SQL[filters.channel is not None], *args)
    groups = [_group(row) for row in rows]
    total = next((g for g, row in zip(groups, rows, strict=True) if row["is_total"]), _group(None))
    by_channel = [g for g, row in zip(groups, rows, strict=True) if not row["is_total"]]
    by_channel.sort(key=lambda g: (-g.customers, g.acquisition_channel or ""))
    return Funnel(
        from_=filters.start,
        to=filters.end,
        channel=filters.channel,
        total=total,
        by_channel=by_channel,
    )


def _group(row: asyncpg.Record | None) -> FunnelGroup:
    reached: list[int] = list(row["reached"]) if row else [0] * len(STAGES)
    times: list[float | None] = list(row["times"]) if row else [None] * (2 * len(STAGES) - 2)
    steps = []
    for k in range(len(STAGES) - 1):
        median, p75 = times[2 * k], times[2 * k + 1]
        steps.append(
            FunnelStep(
                from_stage=cast(Stage, STAGES[k]),
                to_stage=cast(Stage, STAGES[k + 1]),
                reached_from=reached[k],
                reached_to=reached[k + 1],
                conversion_rate=ratio(reached[k + 1], reached[k]),
                median_seconds=whole(median),
                p75_seconds=whole(p75),
            )
        )
    return FunnelGroup(
        acquisition_channel=None if row is None or row["is_total"] else row["channel"],
        customers=reached[0],
        reached=dict(zip(STAGES, reached, strict=True)),
        steps=steps,
    )
