"""The drift job: time-based rules applied without a new touchpoint (the worker runs it).

A customer who has bought drifts to ``at_risk``, then ``lapsed``, as days pass without a new
purchase; ingest ends drift when one arrives. Time alone moves nobody on ingest, so this job
re-applies the shop's drift rules to every buyer in one statement per shop. It is incremental (it
writes only the profiles whose stage changes, one transition each) and idempotent: a second run,
or a concurrent one on another worker, finds nothing left to move.
"""

from __future__ import annotations

from datetime import UTC, datetime

from api.db import Database, Tenant, TenantConn
from api.journey.rules import drift_sql
from api.journey.stages import STAGE_EVENTS_SQL, current_rules
from api.tenants.fanout import in_every_shop

# $1 now, $2..$4 the reasons recorded for a move to lapsed, to at_risk, and back to the reached
# stage (the rules no longer call the customer drifting: the shop relaxed them, or a manual move
# put a recent buyer in a drift state). The rows are locked in id order (as ingest locks them),
# and FOR UPDATE re-evaluates a row that a concurrent transaction changed meanwhile, so a
# purchase committing mid-run is seen and a second run waits for the first and skips its rows.
_DRIFT_SQL = """
WITH due AS (
    SELECT c.id, c.stage AS from_stage, {target} AS to_stage
    FROM customers AS c
    WHERE c.merged_into IS NULL AND c.order_count > 0
      AND c.stage IS DISTINCT FROM {target}
    ORDER BY c.id
    FOR UPDATE
),
moved AS (
    UPDATE customers AS c
    SET stage = due.to_stage, stage_since = greatest($1::timestamptz, c.stage_since)
    FROM due
    WHERE c.id = due.id
    RETURNING c.id, due.from_stage, due.to_stage, c.stage_since
),
transitions AS (
    INSERT INTO stage_transitions (customer_ref, from_stage, to_stage, occurred_at, cause,
        reason)
    SELECT moved.id, moved.from_stage, moved.to_stage, moved.stage_since, 'drift',
        CASE moved.to_stage WHEN 'lapsed' THEN $2 WHEN 'at_risk' THEN $3 ELSE $4 END
    FROM moved
    RETURNING *
),
events AS ({STAGE_EVENTS_SQL})
SELECT count(*) FROM transitions
"""


async def apply_drift(conn: TenantConn, schema: str, now: datetime | None = None) -> int:
    """Move the shop's buyers to the drift state (or back to the stage they reached) that their
    last purchase calls for at ``now``; returns how many moved."""
    _, rules = await current_rules(conn, schema)
    target = f"coalesce({drift_sql(rules, '$1::timestamptz')}, c.reached_stage)"
    at_risk, lapsed = rules.drift.at_risk_after_days, rules.drift.lapsed_after_days
    moved: int = await conn.fetchval(
        _DRIFT_SQL.format(target=target, STAGE_EVENTS_SQL=STAGE_EVENTS_SQL),
        now or datetime.now(UTC),
        f"no purchase in {lapsed} days",
        f"no purchase in {at_risk} days",
        f"a purchase within {at_risk} days",
    )
    return moved


async def apply_drift_all_shops(db: Database) -> int:
    """Run :func:`apply_drift` in every active shop; returns the total moved."""

    async def work(conn: TenantConn, tenant: Tenant) -> int:
        return await apply_drift(conn, tenant.schema)

    return await in_every_shop(db, "journey-drift", work)
