"""A customer's points: the balance view, the ledger's pages, redemptions and adjustments."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Annotated, Literal

import asyncpg
import msgspec

from api.db import TenantConn
from api.errors import PROBLEM_TYPES, Problem, ProblemType
from api.loyalty import ledger, tiers
from api.loyalty.ledger import Account, Source
from api.loyalty.program import Program, expires_at
from api.pagination import Page, page_of

INSUFFICIENT = "insufficient-points"
PROBLEM_TYPES[INSUFFICIENT] = ProblemType(
    INSUFFICIENT,
    409,
    "Not enough points",
    "The customer's available balance does not cover the points asked for. Pending points "
    "(still in the return window) cannot be spent. `detail` gives the balance; nothing was "
    "written.",
)
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
PointsAmount = Annotated[int, msgspec.Meta(ge=1, le=10**9)]


class PendingPoints(msgspec.Struct, frozen=True, kw_only=True):
    points: int
    #: When these points become spendable (the end of the return window).
    activates_at: datetime
    order_id: str | None


class ExpiringPoints(msgspec.Struct, frozen=True, kw_only=True):
    points: int
    #: The first instant at which they are gone.
    expires_at: datetime


class TierStatus(msgspec.Struct, frozen=True, kw_only=True):
    #: The tier now (null: below the lowest).
    name: str | None
    since: datetime | None
    multiplier_percent: int
    #: When the tier is next reviewed (the only time it can go down).
    review_at: datetime | None
    basis: Literal["points_earned", "spend"]
    #: Points earned (or minor units spent) in the rolling window up to now.
    value: int
    next_tier: str | None
    next_threshold: int | None
    #: How much more ``value`` the next tier needs.
    remaining_to_next: int | None


class LoyaltyAccount(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["loyalty_account"] = "loyalty_account"
    customer_id: str
    #: Spendable now (negative only if the programme lets refunds go below zero).
    available: int
    #: Earned but still in the return window.
    pending: int
    #: Points earned minus points reversed by refunds, ever.
    lifetime_earned: int
    pending_points: list[PendingPoints]
    #: Points that expire within the programme's notice period (default 30 days).
    expiring_soon: list[ExpiringPoints]
    #: Null when the programme has no tiers.
    tier: TierStatus | None


class LoyaltyTransaction(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["loyalty_transaction"] = "loyalty_transaction"
    id: int
    kind: Literal["earn", "activate", "redeem", "expire", "reverse", "adjust"]
    #: The change to available + pending (signed).
    points: int
    available_delta: int
    pending_delta: int
    lifetime_delta: int
    available_after: int
    pending_after: int
    lifetime_earned_after: int
    reason: str
    event_id: str | None
    order_id: str | None
    redemption_id: str | None
    #: The credential that made a redemption or adjustment.
    actor: str | None
    occurred_at: datetime
    created_at: datetime


class RedemptionIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    points: PointsAmount
    reason: Reason
    #: Your reference, e.g. the order the points paid for: a refund of an order with this id
    #: gives the points back.
    reference: Annotated[str, msgspec.Meta(min_length=1, max_length=255)] | None = None


class Redemption(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["loyalty_redemption"] = "loyalty_redemption"
    id: str
    customer_id: str
    points: int
    reason: str
    reference: str | None
    #: The balance after the redemption.
    available: int
    created_at: datetime


class AdjustmentIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Signed: positive adds spendable points, negative removes them.
    points: Annotated[int, msgspec.Meta(ge=-(10**9), le=10**9)]
    reason: Reason


def short(account: Account, points: int) -> Problem:
    return Problem(
        INSUFFICIENT,
        f"{points:,} points asked for; {max(0, account.available):,} available.",
    )


async def settled(conn: TenantConn, ref: int, now: datetime) -> None:
    """Activate and expire what is due for this customer, if anything is (a read then reports
    the balance as of now, even if the jobs have not run yet)."""
    due = await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM loyalty_lots WHERE customer_ref = $1 AND {ledger.DUE_LOTS})",
        ref,
        now,
    )
    if due:
        account = await ledger.lock_account(conn, ref)
        await ledger.settle(conn, account, now)
        await ledger.save(conn, [account])


async def account_view(
    conn: TenantConn, ref: int, customer_id: str, program: Program, now: datetime
) -> LoyaltyAccount:
    await settled(conn, ref, now)
    row = await conn.fetchrow(
        "SELECT available, pending, lifetime_earned, tier, tier_since, tier_review_at"
        " FROM loyalty_accounts WHERE customer_ref = $1",
        ref,
    )
    lots = await conn.fetch(
        "SELECT remaining, state, activates_at, expires_at, order_id FROM loyalty_lots"
        " WHERE customer_ref = $1 AND remaining > 0"
        " AND (state = 'pending' OR expires_at < $2) ORDER BY activates_at, expires_at, id",
        ref,
        now + timedelta(days=program.expiry.notify_days_before),
    )
    return LoyaltyAccount(
        customer_id=customer_id,
        available=row["available"] if row else 0,
        pending=row["pending"] if row else 0,
        lifetime_earned=row["lifetime_earned"] if row else 0,
        pending_points=[
            PendingPoints(
                points=lot["remaining"], activates_at=lot["activates_at"], order_id=lot["order_id"]
            )
            for lot in lots
            if lot["state"] == "pending"
        ],
        expiring_soon=[
            ExpiringPoints(points=lot["remaining"], expires_at=lot["expires_at"])
            for lot in sorted(lots, key=lambda lot: lot["expires_at"] or now)
            if lot["state"] == "active"
        ],
        tier=await _tier_status(conn, program, ref, row, now),
    )


async def _tier_status(
    conn: TenantConn,
    program: Program,
    ref: int,
    row: asyncpg.Record | None,
    now: datetime,
) -> TierStatus | None:
    levels = program.tiers.levels
    if not levels:
        return None
    name = row["tier"] if row else None
    value = (await tiers.window_values(conn, program, [ref], now))[ref]
    following = tiers.rank(program, name) + 1
    upcoming = levels[following] if following < len(levels) else None
    return TierStatus(
        name=name,
        since=row["tier_since"] if row else None,
        multiplier_percent=tiers.multiplier_percent(program, name),
        review_at=row["tier_review_at"] if row else None,
        basis=program.tiers.basis,
        value=value,
        next_tier=upcoming.name if upcoming else None,
        next_threshold=upcoming.threshold if upcoming else None,
        remaining_to_next=max(0, upcoming.threshold - value) if upcoming else None,
    )


async def transactions(
    conn: TenantConn, ref: int, *, limit: int, starting_after: int | None
) -> Page[LoyaltyTransaction]:
    rows = await conn.fetch(
        "SELECT * FROM loyalty_entries WHERE customer_ref = $1"
        " AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
        ref,
        starting_after,
        limit + 1,
    )
    return page_of([_transaction(row) for row in rows], limit)


def _transaction(row: asyncpg.Record) -> LoyaltyTransaction:
    return LoyaltyTransaction(
        id=row["id"],
        kind=row["kind"],
        points=row["available_delta"] + row["pending_delta"],
        available_delta=row["available_delta"],
        pending_delta=row["pending_delta"],
        lifetime_delta=row["lifetime_delta"],
        available_after=row["available_after"],
        pending_after=row["pending_after"],
        lifetime_earned_after=row["lifetime_after"],
        reason=row["reason"],
        event_id=row["event_id"],
        order_id=row["order_id"],
        redemption_id=row["redemption_id"],
        actor=row["actor"],
        occurred_at=row["occurred_at"],
        created_at=row["created_at"],
    )


async def redeem(
    conn: TenantConn,
    ref: int,
    customer_id: str,
    body: RedemptionIn,
    actor: str,
    now: datetime,
) -> Redemption:
    """Spend points, earliest-expiring first, or a 409 when the balance is short."""
    account = await ledger.lock_account(conn, ref)
    await ledger.settle(conn, account, now)
    if body.points > account.available:
        raise short(account, body.points)
    redemption_id = "red_" + secrets.token_hex(12)
    reason = body.reason.strip() or body.reason
    await conn.execute(
        "INSERT INTO loyalty_redemptions (id, customer_ref, points, reason, reference,"
        " created_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        redemption_id,
        ref,
        body.points,
        reason,
        body.reference,
        now,
        actor,
    )
    source = Source(reason=reason, redemption_id=redemption_id, actor=actor)
    await ledger.take(conn, account, body.points, "redeem", source, now)
    await ledger.save(conn, [account])
    return Redemption(
        id=redemption_id,
        customer_id=customer_id,
        points=body.points,
        reason=reason,
        reference=body.reference,
        available=account.available,
        created_at=now,
    )


async def adjust(
    conn: TenantConn,
    ref: int,
    program: Program,
    body: AdjustmentIn,
    actor: str,
    now: datetime,
) -> LoyaltyTransaction:
    """Add spendable points (a new lot, expiring like earned points) or remove some (never
    below zero); either way an ``adjust`` entry with the reason and who made it."""
    account = await ledger.lock_account(conn, ref)
    await ledger.settle(conn, account, now)
    source = Source(reason=body.reason.strip() or body.reason, actor=actor)
    if body.points > 0:
        ledger.add_lot(
            account,
            body.points,
            kind="adjust",
            source=source,
            at=now,
            now=now,
            activates_at=now,
            expires_at=expires_at(program, now),
            lifetime=False,
        )
    else:
        if -body.points > account.available:
            raise short(account, -body.points)
        await ledger.take(conn, account, -body.points, "adjust", source, now)
    await ledger.save(conn, [account])
    row = await conn.fetchrow(
        "SELECT * FROM loyalty_entries WHERE customer_ref = $1 ORDER BY id DESC LIMIT 1", ref
    )
    assert row is not None
    return _transaction(row)
