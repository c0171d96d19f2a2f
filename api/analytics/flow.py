"""The flow between stages: every transition of a period, grouped by where it came from and where
it went (the links of a Sankey diagram; the nodes are the stages and drift states).

- The transitions: ``stage_transitions`` rows with ``occurred_at`` in the period (one range scan
  of ``stage_transitions_by_time``), optionally of one ``cause``; moves into and out of the drift
  states (``at_risk``, ``lapsed``) and manual moves back included.
- The channel filter keeps the transitions of customers acquired on that channel.
"""

from __future__ import annotations

from typing import Any

from api.analytics.filters import Filters, acquisition_channel_sql
from api.analytics.schemas import StageFlow, StageFlowLink
from api.db import TenantConn
from api.journey.history import Cause
from api.journey.rules import DRIFT_STATES, STAGES

_ORDER = {stage: rank for rank, stage in enumerate((*STAGES, *DRIFT_STATES))}


def _flow_sql(with_cause: bool, with_channel: bool) -> str:
    # $1, $2: the period; then the cause and the channel, numbered in that order when given.
    cause = "AND s.cause = $3" if with_cause else ""
    movers = ""
    if with_channel:
        # Each customer's acquisition channel is looked up once, however often they moved.
        movers = f"""
WHERE s.customer_ref IN (
    SELECT m.customer_ref
    FROM (SELECT DISTINCT customer_ref FROM moves) AS m
    WHERE {acquisition_channel_sql("m.customer_ref")} = ${4 if with_cause else 3}
)"""
    return f"""
WITH moves AS MATERIALIZED (
    SELECT s.customer_ref, s.from_stage, s.to_stage
    FROM stage_transitions AS s
    WHERE s.occurred_at >= $1 AND s.occurred_at < $2 {cause}
)
SELECT grouping(s.from_stage) = 1 AS is_total, s.from_stage, s.to_stage,
    count(*) AS transitions, count(DISTINCT s.customer_ref) AS customers
FROM moves AS s{movers}
GROUP BY GROUPING SETS ((s.from_stage, s.to_stage), ())
"""


_SQL = {
    (with_cause, with_channel): _flow_sql(with_cause, with_channel)
    for with_cause in (False, True)
    for with_channel in (False, True)
}


async def stage_flow(conn: TenantConn, filters: Filters, *, cause: Cause | None) -> StageFlow:
    args: list[Any] = [filters.start, filters.end]
    if cause is not None:
        args.append(cause)
    if filters.channel is not None:
        args.append(filters.channel)
    rows = await conn.fetch(_SQL[(cause is not None, filters.channel is not None)], *args)
    total = next((row for row in rows if row["is_total"]), None)
    links = [
        StageFlowLink(
            from_stage=row["from_stage"],
            to_stage=row["to_stage"],
            transitions=row["transitions"],
            customers=row["customers"],
        )
        for row in rows
        if not row["is_total"]
    ]
    links.sort(key=lambda link: (_ORDER.get(link.from_stage, 99), _ORDER.get(link.to_stage, 99)))
    return StageFlow(
        from_=filters.start,
        to=filters.end,
        channel=filters.channel,
        cause=cause,
        transitions=total["transitions"] if total else 0,
        customers=total["customers"] if total else 0,
        links=links,
    )
