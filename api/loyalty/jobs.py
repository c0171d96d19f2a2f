"""The loyalty jobs the worker runs: activate pending points, expire lots, warn before expiry,
review tiers.

Each looks only at what is due (partial indexes keep that cheap), works customer by customer
under the same account lock as every other ledger write, and re-checks under the lock, so it is
incremental, idempotent and safe to run twice or on two workers at once: a second run finds
nothing left to do.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from api.db import Database, Tenant, TenantConn, rows_affected
from api.loyalty import ledger, tiers
from api.loyalty.program import current_program
from api.tenants.fanout import in_every_shop

#: Customers settled per transaction; the next run takes the rest.
BATCH = 500


async def settle_due(conn: TenantConn, now: datetime, batch: int = BATCH) -> int:
    """Activate and expire what is due at ``now``; returns how many customers were settled."""
    refs = await conn.fetch(
        "SELECT DISTINCT customer_ref FROM ("
        " (SELECT customer_ref FROM loyalty_lots"
        "  WHERE state = 'pending' AND remaining > 0 AND activates_at <= $1 LIMIT $2)"
        " UNION ALL"
        " (SELECT customer_ref FROM loyalty_lots WHERE state = 'active' AND remaining > 0"
        "  AND expires_at IS NOT NULL AND expires_at <= $1 LIMIT $2)) AS due",
        now,
        batch,
    )
    accounts = await ledger.lock_accounts(conn, (r["customer_ref"] for r in refs))
    for account in accounts.values():
        await ledger.settle(conn, account, now)
    await ledger.save(conn, accounts.values())
    return sum(1 for _ in refs)


async def warn_expiring(conn: TenantConn, schema: str, now: datetime) -> int:
    """One ``loyalty.points_expiring`` event per lot entering the notice period."""
    program = await current_program(conn, schema)
    horizon = now + timedelta(days=program.expiry.notify_days_before)
    status = await conn.execute(
        """
        WITH due AS (
            UPDATE loyalty_lots l SET expiry_notified = true
            WHERE l.state = 'active' AND l.remaining > 0 AND NOT l.expiry_notified
              AND l.expires_at > $1 AND l.expires_at <= $2
            RETURNING l.customer_ref, l.remaining, l.expires_at
        )
        INSERT INTO outbox (type, customer_ref, payload, occurred_at)
        SELECT 'loyalty.points_expiring', due.customer_ref,
            jsonb_build_object('customer_id', c.customer_id, 'points', due.remaining,
                'expires_at', due.expires_at),
            $1
        FROM due JOIN customers c ON c.id = due.customer_ref
        """,
        now,
        horizon,
    )
    return rows_affected(status)


async def review_tiers(conn: TenantConn, schema: str, now: datetime, batch: int = BATCH) -> int:
    """Review the tiers whose review date has come; returns how many were reviewed."""
    program = await current_program(conn, schema)
    if not program.tiers.levels:
        return 0
    refs = await conn.fetch(
        "SELECT customer_ref FROM loyalty_accounts WHERE tier_review_at <= $1"
        " ORDER BY tier_review_at LIMIT $2",
        now,
        batch,
    )
    accounts = await ledger.lock_accounts(conn, (r["customer_ref"] for r in refs))
    # Re-checked under the lock: a concurrent run may have reviewed some already.
    due = {ref: a for ref, a in accounts.items() if a.tier_review_at and a.tier_review_at <= now}
    values = await tiers.window_values(conn, program, due.keys(), now)
    for ref, account in due.items():
        tiers.review(account, program, values[ref], now)
    await ledger.save(conn, due.values())
    return len(due)


async def loyalty_chores_all_shops(db: Database, now: datetime | None = None) -> int:
    """Every shop: settle due points, warn of expiry, review tiers. Returns rows touched."""

    async def work(conn: TenantConn, tenant: Tenant) -> int:
        at = now or datetime.now(UTC)
        done = await settle_due(conn, at)
        done += await warn_expiring(conn, tenant.schema, at)
        return done + await review_tiers(conn, tenant.schema, at)

    return await in_every_shop(db, "loyalty", work)
