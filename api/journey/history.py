"""The journey view of one customer: where they are, how they got there, and what each stage held.

Everything is derived from the stored transitions: the customer spends one interval in a stage from
the transition into it to the next one. The first interval (in the stage before the first
transition, normally awareness) starts when the profile was first seen; the current one runs to
now. Transitions are read in time order (``occurred_at``, then id), the order every writer keeps:
ingest, the drift job and manual moves all date a move no earlier than the start of the stage it
leaves.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, TypeVar

import asyncpg
import msgspec

from api.customers.profiles import customer_ref_or_404, not_found
from api.customers.schemas import Stage
from api.db import TenantConn
from api.journey.rules import DRIFT_STATES, STAGES

Cause = Literal["touchpoint", "drift", "manual", "merge"]
V = TypeVar("V")
_ORDER = {stage: rank for rank, stage in enumerate((*STAGES, *DRIFT_STATES))}


class StageTransition(msgspec.Struct, frozen=True, kw_only=True):
    """One move between stages and what caused it: the touchpoint (``touchpoint_id``), a run of
    the drift rules (``reason`` names the rule), a person (``actor`` and ``reason``) or a merge."""

    from_stage: Stage
    to_stage: Stage
    occurred_at: datetime
    cause: Cause
    touchpoint_id: str | None
    actor: str | None
    reason: str | None


class CustomerJourney(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["customer_journey"] = "customer_journey"
    customer_id: str
    stage: Stage
    #: When the customer entered the current stage (first seen, if they never moved).
    stage_since: datetime | None
    #: The furthest of the six stages reached; a new purchase ends drift by returning here.
    reached_stage: Stage
    #: Every transition, oldest first.
    history: list[StageTransition]
    #: Whole seconds spent in each stage visited, summed over its intervals; the current stage's
    #: interval runs to now.
    time_in_stage_seconds: dict[str, int]
    #: Touchpoints that occurred before the first purchase; null if the customer never bought.
    touchpoints_before_first_purchase: int | None
    #: The channels (sorted) of the touchpoints that occurred during each stage visited.
    channels_by_stage: dict[str, list[str]]


@dataclass(frozen=True)
class Interval:
    """``stage`` from ``start`` to ``end``; ``None`` ends are open (the first and current)."""

    stage: str
    start: datetime | None
    end: datetime | None


_PROFILE_SQL = """
SELECT c.stage, c.reached_stage, c.stage_since, coalesce(c.first_seen_at, c.created_at) AS began,
    (SELECT count(*) FROM touchpoints AS t
     WHERE t.customer_ref = c.id AND t.occurred_at < p.first_purchase_at) AS before_purchase,
    p.first_purchase_at
FROM customers AS c
CROSS JOIN LATERAL (
    SELECT min(t.occurred_at) AS first_purchase_at FROM touchpoints AS t
    WHERE t.customer_ref = c.id AND t.type = 'purchase'
) AS p
WHERE c.id = $1"""

_TRANSITIONS_SQL = """
SELECT from_stage, to_stage, occurred_at, cause, touchpoint_event_id, actor, reason
FROM stage_transitions WHERE customer_ref = $1 ORDER BY occurred_at, id"""

# The channels seen in each interval ($2..$4, one row per interval; null bounds are open). Each
# interval is one range scan of ``touchpoints_timeline``.
_CHANNELS_SQL = """
SELECT i.stage, array_agg(DISTINCT t.channel ORDER BY t.channel) AS channels
FROM unnest($2::text[], $3::timestamptz[], $4::timestamptz[]) AS i(stage, starts, ends)
JOIN touchpoints AS t ON t.customer_ref = $1
    AND (i.starts IS NULL OR t.occurred_at >= i.starts)
    AND (i.ends IS NULL OR t.occurred_at < i.ends)
GROUP BY i.stage"""


async def customer_journey(
    conn: TenantConn, customer_id: str, *, now: datetime | None = None
) -> CustomerJourney:
    """The journey of the profile ``customer_id`` leads to (following merges); 404 if none."""
    ref = await customer_ref_or_404(conn, customer_id)
    return await journey_of(conn, ref, customer_id, now=now)


async def journey_of(
    conn: TenantConn, ref: int, customer_id: str, *, now: datetime | None = None
) -> CustomerJourney:
    """The journey of the profile ``ref`` (already resolved), shown as ``customer_id``."""
    now = now or datetime.now(UTC)
    profile = await conn.fetchrow(_PROFILE_SQL, ref)
    if profile is None:
        raise not_found(customer_id)
    rows = await conn.fetch(_TRANSITIONS_SQL, ref)
    history = [_transition(row) for row in rows]
    spans = intervals(profile["stage"], history)
    channels = await conn.fetch(
        _CHANNELS_SQL,
        ref,
        [span.stage for span in spans],
        [span.start for span in spans],
        [span.end for span in spans],
    )
    return CustomerJourney(
        customer_id=customer_id,
        stage=profile["stage"],
        stage_since=profile["stage_since"] or profile["began"],
        reached_stage=profile["reached_stage"],
        history=history,
        time_in_stage_seconds=time_in_stage(spans, profile["began"], now),
        touchpoints_before_first_purchase=(
            None if profile["first_purchase_at"] is None else profile["before_purchase"]
        ),
        channels_by_stage=_in_stage_order(
            {stage: [] for stage in {span.stage for span in spans}}
            | {row["stage"]: list(row["channels"]) for row in channels}
        ),
    )


def _transition(row: asyncpg.Record) -> StageTransition:
    return StageTransition(
        from_stage=row["from_stage"],
        to_stage=row["to_stage"],
        occurred_at=row["occurred_at"],
        cause=row["cause"],
        touchpoint_id=row["touchpoint_event_id"],
        actor=row["actor"],
        reason=row["reason"],
    )


def intervals(current: str, history: list[StageTransition]) -> list[Interval]:
    """The stays in each stage, oldest first: before the first transition (from its
    ``from_stage``, or the current stage if there is none), then after each transition."""
    first = history[0].from_stage if history else current
    spans = []
    start: datetime | None = None
    stage = first
    for move in history:
        spans.append(Interval(stage, start, move.occurred_at))
        stage, start = move.to_stage, move.occurred_at
    spans.append(Interval(stage, start, None))
    return spans


def time_in_stage(spans: list[Interval], began: datetime, now: datetime) -> dict[str, int]:
    """Whole seconds per stage: the first interval starts at ``began`` (first seen), the last
    one ends at ``now``; an interval that would end before it starts counts as zero."""
    totals: dict[str, timedelta] = defaultdict(timedelta)
    for span in spans:
        start = span.start or min(began, span.end or began)
        end = span.end or now
        totals[span.stage] += max(end - start, timedelta(0))
    return _in_stage_order({stage: int(total.total_seconds()) for stage, total in totals.items()})


def _in_stage_order(by_stage: dict[str, V]) -> dict[str, V]:
    return {stage: by_stage[stage] for stage in sorted(by_stage, key=lambda s: _ORDER.get(s, 99))}
