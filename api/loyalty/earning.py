"""Earning on ingest: the touchpoints a batch stored earn points, and refunds take them back, in
the batch's transaction.

Only touchpoints that were newly stored come here (a re-sent event id never does), and a
purchase earns under the key ``earn:order:<order_id>``, so an order re-sent with another event id
earns nothing more. Earning needs a known customer: the touchpoint's ``customer_id``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from api.db import TenantConn
from api.loyalty import ledger, tiers
from api.loyalty.ledger import Account, Source
from api.loyalty.program import Program, SpendRule, current_program, expires_at, period_starts
from api.touchpoints.schemas import Order, TouchpointIn


@dataclass(frozen=True)
class Stored:
    """A touchpoint the batch stored, with its profile and corrected time."""

    ref: int
    item: TouchpointIn
    occurred_at: datetime


def spend_points(rule: SpendRule, order: Order) -> int:
    """Points for an order's eligible spend, before tier multiplier and caps."""
    if order.currency != rule.currency:
        return 0
    eligible = order.amount
    if rule.exclude_shipping:
        eligible -= order.shipping
    if rule.exclude_marked_items:
        eligible -= sum(i.unit_price * i.quantity for i in order.items if i.excluded)
    numerator, denominator = max(0, eligible) * rule.points, rule.per_minor_units
    if rule.rounding == "floor":
        return numerator // denominator
    if rule.rounding == "ceil":
        return -(-numerator // denominator)
    return (2 * numerator + denominator) // (2 * denominator)


def _earns(program: Program, item: TouchpointIn) -> bool:
    if item.customer_id is None:
        return False
    if item.type in ("purchase", "refund"):
        return item.order is not None
    return item.type in program.actions


async def on_ingest(conn: TenantConn, schema: str, stored: Sequence[Stored], now: datetime) -> None:
    """Earn and reverse points for what a batch stored."""
    program = await current_program(conn, schema)
    if not program.enabled:
        return
    earning = sorted((s for s in stored if _earns(program, s.item)), key=lambda s: s.occurred_at)
    if not earning:
        return
    order_keys = [_order_key(s.item) for s in earning if s.item.type == "purchase" and s.item.order]
    # One round trip locks the accounts and reads what earning needs: which orders earned
    # before, the tier window, and what the caps have left.
    params = tiers.Params()
    keys = params.add(order_keys, "text[]")
    extra = (
        f", ARRAY(SELECT dedupe_key FROM loyalty_entries WHERE dedupe_key = ANY({keys})) AS seen"
    )
    if program.tiers.levels:
        extra += f", {tiers.window_value_sql(program, now, params)} AS tier_value"
    extra += _caps_sql(program, now, params)
    accounts = await ledger.lock_accounts(conn, (s.ref for s in earning), extra, *params.values)
    first = next(iter(accounts.values()))
    done = set(first.loaded["seen"])
    caps = _cap_room(program, accounts)
    for s in earning:
        account = accounts[s.ref]
        if s.item.type == "refund":
            await ledger.save(conn, [account])  # the refund reads the lots this batch made
            await ledger.settle(conn, account, now)
            await refund(conn, account, program, s, now)
            continue
        if s.item.type == "purchase":
            key = _order_key(s.item)
            if key in done:
                continue
            done.add(key)
            assert s.item.order is not None
            base = spend_points(program.spend, s.item.order)
        else:
            key, base = f"earn:event:{s.item.id}", program.actions[s.item.type]
        points = base * tiers.multiplier_percent(program, account.tier) // 100
        if caps is not None:
            points = min(points, caps[s.ref])
            caps[s.ref] -= points
        if points > 0:
            await _earn(conn, account, program, s, points, key, now)
    if program.tiers.levels:
        for account in accounts.values():
            value = account.loaded["tier_value"]
            if program.tiers.basis == "points_earned":
                value += account.earned_here
            tiers.upgrade(account, program, value, now)
    await ledger.save(conn, accounts.values())


def _order_key(item: TouchpointIn) -> str:
    assert item.order is not None
    return f"earn:order:{item.order.order_id}"


async def _earn(
    conn: TenantConn,
    account: Account,
    program: Program,
    s: Stored,
    points: int,
    key: str,
    now: datetime,
) -> None:
    is_purchase = s.item.type == "purchase"
    order_id = s.item.order.order_id if is_purchase and s.item.order else None
    ledger.add_lot(
        account,
        points,
        kind="earn",
        source=Source(
            reason=f"{s.item.type} earned points",
            event_id=s.item.id,
            order_id=order_id,
            dedupe_key=key,
        ),
        at=s.occurred_at,
        now=now,
        activates_at=s.occurred_at + timedelta(days=program.pending_days if is_purchase else 0),
        expires_at=expires_at(program, s.occurred_at),
        lifetime=True,
    )
    ledger.emit(
        account,
        "loyalty.points_earned",
        {"points": points, "event_id": s.item.id, "order_id": order_id},
        s.occurred_at,
    )


def _caps_sql(program: Program, now: datetime, params: tiers.Params) -> str:
    """Columns with what each customer earned so far this day, month and year ('' without
    caps)."""
    caps = program.caps
    if caps.per_day is None and caps.per_month is None and caps.per_year is None:
        return ""
    day, month, year = (params.add(start, "timestamptz") for start in period_starts(program, now))
    earned = (
        "(SELECT coalesce(sum(e.lifetime_delta), 0) FROM loyalty_entries e"
        " WHERE e.customer_ref = a.customer_ref AND e.kind = 'earn' AND e.occurred_at >= {})"
    )
    return (
        f", {earned.format(day)} AS earned_day, {earned.format(month)} AS earned_month,"
        f" {earned.format(year)} AS earned_year"
    )


def _cap_room(program: Program, accounts: dict[int, Account]) -> dict[int, int] | None:
    """How many more points each customer may earn now under the caps (None: no caps)."""
    caps = program.caps
    limits = (
        (caps.per_day, "earned_day"),
        (caps.per_month, "earned_month"),
        (caps.per_year, "earned_year"),
    )
    if all(limit is None for limit, _ in limits):
        return None
    return {
        ref: max(
            0,
            min(
                limit - int(account.loaded[column]) for limit, column in limits if limit is not None
            ),
        )
        for ref, account in accounts.items()
    }


async def refund(
    conn: TenantConn, account: Account, program: Program, s: Stored, now: datetime
) -> None:
    """Take back the refunded share of the order's points (as the policy allows) and give back
    the same share of any points that paid for it; each refund event counts once, and shares
    add up to exactly the whole when the whole order is refunded."""
    order = s.item.order
    assert order is not None
    purchase_amount = await conn.fetchval(
        "SELECT amount FROM touchpoints WHERE order_id = $1 AND type = 'purchase'"
        " AND customer_ref = $2 ORDER BY id LIMIT 1",
        order.order_id,
        account.ref,
    )
    if purchase_amount is None:
        return
    before = await conn.fetchrow(
        "SELECT coalesce(sum(amount), 0) AS amount, coalesce(sum(share), 0) AS share"
        " FROM loyalty_refunds WHERE order_id = $1 AND customer_ref = $2",
        order.order_id,
        account.ref,
    )
    assert before is not None
    refunded = before["amount"] + order.amount

    def share_of(whole: int) -> int:
        return whole if refunded >= purchase_amount else whole * refunded // purchase_amount

    earned = await conn.fetchval(
        "SELECT coalesce(sum(lifetime_delta), 0) FROM loyalty_entries"
        " WHERE kind = 'earn' AND order_id = $1 AND customer_ref = $2",
        order.order_id,
        account.ref,
    )
    share = max(0, share_of(earned) - before["share"])
    source = Source(
        reason="order refunded",
        event_id=s.item.id,
        order_id=order.order_id,
        dedupe_key=f"reverse:event:{s.item.id}",
    )
    reversed_points = 0
    if share:
        reversed_points = await ledger.take_back_order(
            conn,
            account,
            share,
            order_id=order.order_id,
            policy=program.refund_policy,
            source=source,
            at=s.occurred_at,
        )
    restored = await _give_back_redemptions(conn, account, program, s, share_of, now)
    await conn.execute(
        "INSERT INTO loyalty_refunds (event_id, customer_ref, order_id, amount, share, reversed,"
        " restored, occurred_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        s.item.id,
        account.ref,
        order.order_id,
        order.amount,
        share,
        reversed_points,
        restored,
        s.occurred_at,
    )


async def _give_back_redemptions(
    conn: TenantConn,
    account: Account,
    program: Program,
    s: Stored,
    share_of: Callable[[int], int],
    now: datetime,
) -> int:
    """Points that paid for the refunded order come back (the refunded share), exactly once."""
    assert s.item.order is not None
    rows = await conn.fetch(
        "SELECT id, points, restored FROM loyalty_redemptions"
        " WHERE reference = $1 AND customer_ref = $2 ORDER BY created_at, id",
        s.item.order.order_id,
        account.ref,
    )
    total = 0
    for row in rows:
        give = share_of(row["points"]) - row["restored"]
        if give <= 0:
            continue
        await conn.execute(
            "UPDATE loyalty_redemptions SET restored = restored + $2 WHERE id = $1",
            row["id"],
            give,
        )
        ledger.add_lot(
            account,
            give,
            kind="reverse",
            source=Source(
                reason="points that paid for a refunded order given back",
                event_id=s.item.id,
                order_id=s.item.order.order_id,
                redemption_id=row["id"],
            ),
            at=s.occurred_at,
            now=now,
            activates_at=now,
            expires_at=expires_at(program, now),
            lifetime=False,
        )
        total += give
    return total
