"""Stages on ingest: evaluate the rules on the profiles a batch changed, store the transitions."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import msgspec

from api.db import TenantConn
from api.journey.rules import (
    DEFAULT_RULES,
    Aggregates,
    RuleSet,
    forward_stage,
    new_evidence,
    next_stage,
)

#: How long a worker keeps a shop's rules before reading them again (a PUT in the same worker
#: takes effect at once).
RULES_TTL_SECONDS = 5.0
_rules_cache: dict[str, tuple[float, int, RuleSet]] = {}

#: Columns the aggregate update returns (of ``customers c``), so stages cost no extra read.
PROFILE_COLUMNS = ", ".join(
    f"c.{column}"
    for column in (
        "id",
        "merged_into",
        "stage",
        "reached_stage",
        "stage_since",
        "stage_basis",
        "counts_by_type",
        "counts_by_channel",
        "order_count",
        "revenue",
        "last_seen_at",
        "last_purchase_at",
        "loyalty_tier",
    )
)


async def current_rules(conn: TenantConn, schema: str) -> tuple[int, RuleSet]:
    """The shop's rules in force and their version (0: the defaults)."""
    cached = _rules_cache.get(schema)
    if cached is not None and time.monotonic() - cached[0] < RULES_TTL_SECONDS:
        return cached[1], cached[2]
    row = await conn.fetchrow(
        "SELECT version, rules FROM journey_rule_versions ORDER BY version DESC LIMIT 1"
    )
    version, rules = (
        (0, DEFAULT_RULES)
        if row is None
        else (
            row["version"],
            msgspec.convert(row["rules"], RuleSet),
        )
    )
    _rules_cache[schema] = (time.monotonic(), version, rules)
    return version, rules


def forget_rules(schema: str) -> None:
    _rules_cache.pop(schema, None)


def aggregates_of(row: asyncpg.Record) -> Aggregates:
    return Aggregates(
        counts_by_type=row["counts_by_type"],
        counts_by_channel=row["counts_by_channel"],
        order_count=row["order_count"],
        revenue=row["revenue"],
        last_seen_at=row["last_seen_at"],
        last_purchase_at=row["last_purchase_at"],
        loyalty_tier=row["loyalty_tier"],
    )


@dataclass(frozen=True)
class Move:
    ref: int
    from_stage: str
    to_stage: str
    reached: str
    at: datetime
    event_id: str | None
    #: What the rules gave when a stage was set by hand (see rules.next_stage); else None.
    basis: str | None = None


async def advance_stages(
    conn: TenantConn,
    rules: RuleSet,
    profiles: Sequence[asyncpg.Record],
    causes: dict[int, tuple[str, datetime]],
    now: datetime,
) -> list[Move]:
    """Move each profile to the stage its aggregates now earn (forward only, drift on top), and
    record each move with the touchpoint that caused it. ``causes``: ref -> (event id, time)."""
    moves = []
    for profile in profiles:
        if profile["merged_into"] is not None:
            continue
        aggregates = aggregates_of(profile)
        basis = profile["stage_basis"]
        stage, reached = next_stage(rules, profile["reached_stage"], aggregates, now, basis)
        if stage == profile["stage"] and reached == profile["reached_stage"]:
            continue
        if basis is not None and new_evidence(forward_stage(rules, aggregates, now), basis):
            basis = None
        event_id, occurred_at = causes.get(profile["id"], (None, now))
        since = profile["stage_since"]
        # A late event moves the stage now, but never to before the stage it leaves began.
        at = max(occurred_at, since) if since is not None else occurred_at
        moves.append(Move(profile["id"], profile["stage"], stage, reached, at, event_id, basis))
    await record_moves(conn, moves, cause="touchpoint")
    return moves


#: Appended to a statement whose CTE ``transitions`` returns new ``stage_transitions`` rows:
#: a ``customer.stage_changed`` event for each known customer's move, in the same statement.
STAGE_EVENTS_SQL = """
INSERT INTO outbox (type, customer_ref, payload, occurred_at)
SELECT 'customer.stage_changed', t.customer_ref,
    jsonb_build_object('customer_id', c.customer_id, 'from', t.from_stage, 'to', t.to_stage,
        'cause', t.cause, 'touchpoint_event_id', t.touchpoint_event_id,
        'occurred_at', t.occurred_at),
    t.occurred_at
FROM transitions t JOIN customers c ON c.id = t.customer_ref
WHERE c.customer_id IS NOT NULL"""


async def record_moves(
    conn: TenantConn,
    moves: Sequence[Move],
    *,
    cause: str,
    actor: str | None = None,
    reason: str | None = None,
) -> None:
    """Write the new stages and one transition row per real change of stage."""
    if not moves:
        return
    await conn.execute(
        "UPDATE customers c SET stage = u.stage, reached_stage = u.reached,"
        " stage_basis = u.basis,"
        " stage_since = CASE WHEN c.stage = u.stage THEN c.stage_since ELSE u.at END"
        " FROM unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[], $5::text[])"
        " AS u(id, stage, reached, at, basis) WHERE c.id = u.id",
        [m.ref for m in moves],
        [m.to_stage for m in moves],
        [m.reached for m in moves],
        [m.at for m in moves],
        [m.basis for m in moves],
    )
    changed = [m for m in moves if m.from_stage != m.to_stage]
    if changed:
        await conn.execute(
            "WITH transitions AS (INSERT INTO stage_transitions (customer_ref, from_stage,"
            " to_stage, occurred_at, cause, touchpoint_event_id, actor, reason)"
            " SELECT r, f, t, a, $6, e, $7, $8"
            " FROM unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[], $5::text[])"
            f" AS u(r, f, t, a, e) RETURNING *) {STAGE_EVENTS_SQL}",
            [m.ref for m in changed],
            [m.from_stage for m in changed],
            [m.to_stage for m in changed],
            [m.at for m in changed],
            [m.event_id for m in changed],
            cause,
            actor,
            reason,
        )


async def reevaluate(
    conn: TenantConn, schema: str, ref: int, *, cause: str, actor: str | None = None
) -> None:
    """Re-derive one profile's stage after its aggregates changed outside ingest (a merge)."""
    profile = await conn.fetchrow(f"SELECT {PROFILE_COLUMNS} FROM customers c WHERE c.id = $1", ref)
    if profile is None or profile["merged_into"] is not None:
        return
    _, rules = await current_rules(conn, schema)
    now = datetime.now(UTC)
    # A merge is new evidence: the merged history decides, not an earlier hand-set stage.
    stage, reached = next_stage(rules, profile["reached_stage"], aggregates_of(profile), now)
    if stage != profile["stage"] or reached != profile["reached_stage"]:
        move = Move(ref, profile["stage"], stage, reached, now, None)
        await record_moves(conn, [move], cause=cause, actor=actor)
