"""The points ledger: every change is an entry; balances are the sums of the entries.

All writes for one customer happen under that customer's ``loyalty_accounts`` row lock, taken by
:func:`lock_accounts` at the start of the shop transaction (in customer order, so two writers
never deadlock). Under the lock the account is read once, every operation below changes it in
memory and appends entries that carry the balances after them, and :func:`save` writes it back.
So parallel redemptions queue on the row and never overspend, and a failure midway rolls the
whole transaction back.

Points are held in lots with their own activation and expiry. available = the active lots'
remaining points - debt; pending = the pending lots' remaining points. Spending takes the
earliest-expiring lots first; the expiry job expires only what is left of a lot.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import msgspec

from api.db import TenantConn
from api.db.tenant import RACED_KEYS

# An earning checks its key under the account lock, but that check reads the statement's snapshot:
# a concurrent earning of the same order can commit while we wait for the lock. The insert then
# hits the unique key, and the transaction is retried, when the check sees it.
RACED_KEYS.add("loyalty_entries_dedupe_key_key")

Kind = Literal["earn", "activate", "redeem", "expire", "reverse", "adjust"]
_encode = msgspec.json.Encoder().encode


@dataclass
class Account:
    ref: int
    customer_id: str | None
    available: int
    pending: int
    lifetime_earned: int
    debt: int
    tier: str | None
    tier_since: datetime | None
    tier_review_at: datetime | None
    #: Lots, entries and events made in this transaction, written by :func:`save`.
    new_lots: list[tuple[Any, ...]] = field(default_factory=list)
    entries: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any], datetime]] = field(default_factory=list)
    #: (from, to, reason, when)
    tier_changes: list[tuple[str | None, str | None, str, datetime]] = field(default_factory=list)
    changed: bool = False
    #: The tier changed other than by a recorded change (a merge): copy it to the profile.
    tier_moved: bool = False
    #: Lifetime points earned (less reversed) by this transaction's entries, saved or not.
    earned_here: int = 0
    #: Extra columns the caller asked :func:`lock_accounts` to read with the account.
    loaded: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    """What an entry is put down to; each field is optional."""

    reason: str
    event_id: str | None = None
    order_id: str | None = None
    redemption_id: str | None = None
    actor: str | None = None
    #: Makes the write happen once whatever is re-sent (``earn:order:<id>`` …).
    dedupe_key: str | None = None


@dataclass(frozen=True)
class Lot:
    id: int
    remaining: int
    expires_at: datetime | None


_ACCOUNT_FIELDS = (
    "customer_ref",
    "customer_id",
    "available",
    "pending",
    "lifetime_earned",
    "debt",
    "tier",
    "tier_since",
    "tier_review_at",
)
_ACCOUNT_COLUMNS = ", ".join(
    f"c.{name}" if name == "customer_id" else f"a.{name}" for name in _ACCOUNT_FIELDS
)


async def lock_accounts(
    conn: TenantConn, refs: Iterable[int], extra: str = "", *args: Any
) -> dict[int, Account]:
    """Each customer's account, created if new, locked until the transaction ends.

    ``extra`` adds select-list columns over ``loyalty_accounts a`` (parameters from ``$2``, given
    in ``args``), read in the same round trip into :attr:`Account.loaded`.
    """
    ordered = sorted(set(refs))
    if not ordered:
        return {}
    sql = (
        f"SELECT {_ACCOUNT_COLUMNS}{extra} FROM loyalty_accounts a JOIN customers c"
        " ON c.id = a.customer_ref WHERE a.customer_ref = ANY($1::bigint[])"
        " ORDER BY a.customer_ref FOR UPDATE OF a"
    )
    rows = await conn.fetch(sql, ordered, *args)
    if len(rows) < len(ordered):
        # First points for some: create their accounts (a concurrent creator wins harmlessly),
        # then lock them all again, in order.
        await conn.execute(
            "INSERT INTO loyalty_accounts (customer_ref) SELECT unnest($1::bigint[])"
            " ON CONFLICT DO NOTHING",
            ordered,
        )
        rows = await conn.fetch(sql, ordered, *args)
    own = frozenset(_ACCOUNT_FIELDS)
    return {
        row["customer_ref"]: Account(
            ref=row["customer_ref"],
            customer_id=row["customer_id"],
            available=row["available"],
            pending=row["pending"],
            lifetime_earned=row["lifetime_earned"],
            debt=row["debt"],
            tier=row["tier"],
            tier_since=row["tier_since"],
            tier_review_at=row["tier_review_at"],
            loaded={k: v for k, v in row.items() if k not in own},
        )
        for row in rows
    }


async def lock_account(conn: TenantConn, ref: int) -> Account:
    return (await lock_accounts(conn, [ref]))[ref]


def append(
    account: Account,
    kind: Kind,
    source: Source,
    at: datetime,
    *,
    available: int = 0,
    pending: int = 0,
    lifetime: int = 0,
    lot_id: int | None = None,
    new_lot: str | None = None,
) -> None:
    """Apply the deltas to the account and queue the entry that records them. The entry's lot
    is ``lot_id``, or ``new_lot``: the key of a lot queued by :func:`add_lot`."""
    account.available += available
    account.pending += pending
    account.lifetime_earned += lifetime
    account.earned_here += lifetime
    account.changed = True
    account.entries.append(
        (
            account.ref,
            kind,
            available,
            pending,
            lifetime,
            account.available,
            account.pending,
            account.lifetime_earned,
            source.reason,
            source.event_id,
            source.order_id,
            source.redemption_id,
            source.actor,
            lot_id,
            new_lot,
            at,
            source.dedupe_key,
        )
    )


def emit(account: Account, event_type: str, payload: dict[str, Any], at: datetime) -> None:
    """Queue a domain event, written to the outbox with the entries."""
    account.events.append((event_type, {"customer_id": account.customer_id, **payload}, at))


# Everything a transaction changed in the ledger goes out in one statement, made of the parts
# this save needs: new lots, then the entries (joined to the lots they made by key, in the order
# they were appended), events, tier changes, the accounts, and the tier copied to the profile
# (where journey rules read it). Fewer parts plan faster; each shape is prepared once per
# connection.
_LOTS = """lots AS (
    INSERT INTO loyalty_lots (customer_ref, points, remaining, state, order_id, earned_at,
        activates_at, expires_at, source)
    SELECT * FROM unnest({}::bigint[], {}::bigint[], {}::bigint[], {}::text[], {}::text[],
        {}::timestamptz[], {}::timestamptz[], {}::timestamptz[], {}::text[])
    RETURNING id, source
)"""
_ENTRIES = """entries AS (
    INSERT INTO loyalty_entries (customer_ref, kind, available_delta, pending_delta,
        lifetime_delta, available_after, pending_after, lifetime_after, reason, event_id,
        order_id, redemption_id, actor, lot_id, occurred_at, dedupe_key)
    SELECT e.ref, e.kind, e.available, e.pending, e.lifetime, e.available_after,
        e.pending_after, e.lifetime_after, e.reason, e.event_id, e.order_id, e.redemption_id,
        e.actor, {lot_id}, e.at, e.dedupe_key
    FROM unnest({}::bigint[], {}::text[], {}::bigint[], {}::bigint[], {}::bigint[],
        {}::bigint[], {}::bigint[], {}::bigint[], {}::text[], {}::text[], {}::text[],
        {}::text[], {}::text[], {}::bigint[], {}::text[], {}::timestamptz[], {}::text[])
        WITH ORDINALITY AS e(ref, kind, available, pending, lifetime, available_after,
            pending_after, lifetime_after, reason, event_id, order_id, redemption_id, actor,
            lot_id, new_lot, at, dedupe_key, n)
    {join}
    ORDER BY e.n
)"""
_EVENTS = """events AS (
    INSERT INTO outbox (type, customer_ref, payload, occurred_at)
    SELECT t, r, p::jsonb, at
    FROM unnest({}::text[], {}::bigint[], {}::text[], {}::timestamptz[]) AS u(t, r, p, at)
)"""
_TIER_CHANGES = """tier_changes AS (
    INSERT INTO loyalty_tier_changes (customer_ref, from_tier, to_tier, reason, occurred_at)
    SELECT * FROM unnest({}::bigint[], {}::text[], {}::text[], {}::text[], {}::timestamptz[])
)"""
_BALANCES = """u AS (
    SELECT * FROM unnest({}::bigint[], {}::bigint[], {}::bigint[], {}::bigint[],
        {}::bigint[], {}::text[], {}::timestamptz[], {}::timestamptz[])
        AS u(ref, available, pending, lifetime, debt, tier, tier_since, review)
)"""
_UPDATE_ACCOUNTS = """UPDATE loyalty_accounts a SET available = u.available, pending = u.pending,
    lifetime_earned = u.lifetime, debt = u.debt, tier = u.tier,
    tier_since = u.tier_since, tier_review_at = u.review, updated_at = now()
FROM u WHERE a.customer_ref = u.ref"""
_UPDATE_PROFILES = """UPDATE customers c SET loyalty_tier = u.tier
FROM u WHERE c.id = u.ref AND c.loyalty_tier IS DISTINCT FROM u.tier"""


class _Statement:
    """The parts of a save and their parameters, numbered as they are added."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.args: list[Any] = []

    def add(self, template: str, rows: list[tuple[Any, ...]], width: int, **named: str) -> None:
        columns = [list(c) for c in zip(*rows, strict=True)] if rows else [[]] * width
        first = len(self.args) + 1
        self.args.extend(columns)
        self.parts.append(template.format(*(f"${first + i}" for i in range(width)), **named))


async def save(conn: TenantConn, accounts: Iterable[Account]) -> None:
    """Write what the accounts queued, and their new balances, in one round trip."""
    changed = [a for a in accounts if a.changed]
    if not changed:
        return
    lots = [lot for a in changed for lot in a.new_lots]
    entries = [entry for a in changed for entry in a.entries]
    events = [(t, a.ref, _encode(p).decode(), at) for a in changed for t, p, at in a.events]
    tier_changes = [(a.ref, *change) for a in changed for change in a.tier_changes]
    balances = [
        (
            a.ref,
            a.available,
            a.pending,
            a.lifetime_earned,
            a.debt,
            a.tier,
            a.tier_since,
            a.tier_review_at,
        )
        for a in changed
    ]
    statement = _Statement()
    if lots:
        statement.add(_LOTS, lots, 9)
    if entries:
        joined = {
            "lot_id": "coalesce(e.lot_id, lots.id)",
            "join": "LEFT JOIN lots ON lots.source = e.new_lot",
        }
        plain = {"lot_id": "e.lot_id", "join": ""}
        statement.add(_ENTRIES, entries, 17, **(joined if lots else plain))
    if events:
        statement.add(_EVENTS, events, 4)
    if tier_changes:
        statement.add(_TIER_CHANGES, tier_changes, 5)
    statement.add(_BALANCES, balances, 8)
    if tier_changes or any(a.tier_moved for a in changed):
        statement.parts.append(f"accounts AS ({_UPDATE_ACCOUNTS})")
        final = _UPDATE_PROFILES
    else:
        final = _UPDATE_ACCOUNTS
    await conn.execute(f"WITH {', '.join(statement.parts)} {final}", *statement.args)
    for account in changed:
        account.new_lots.clear()
        account.entries.clear()
        account.events.clear()
        account.tier_changes.clear()
        account.changed = account.tier_moved = False


async def seen(conn: TenantConn, dedupe_keys: Sequence[str]) -> set[str]:
    """Which of these writes happened before."""
    if not dedupe_keys:
        return set()
    rows = await conn.fetch(
        "SELECT dedupe_key FROM loyalty_entries WHERE dedupe_key = ANY($1::text[])",
        list(dedupe_keys),
    )
    return {row["dedupe_key"] for row in rows}


# --- the operations -----------------------------------------------------------------------------


def add_lot(
    account: Account,
    points: int,
    *,
    kind: Kind,
    source: Source,
    at: datetime,
    now: datetime,
    activates_at: datetime,
    expires_at: datetime | None,
    lifetime: bool,
) -> None:
    """New points dated ``at``: a lot, pending until ``activates_at`` or active at once when
    that has passed by ``now`` (paying off debt first). ``lifetime`` counts them as earned (an
    earning, not a give-back or a gift). Written by :func:`save`."""
    active = activates_at <= now
    paid = min(account.debt, points) if active else 0
    # The key ties the entry to its lot when both are written; an earning's own key serves.
    key = source.dedupe_key or f"lot:{uuid.uuid4().hex}"
    account.new_lots.append(
        (
            account.ref,
            points,
            points - paid,
            "active" if active else "pending",
            source.order_id,
            at,
            activates_at,
            expires_at,
            key,
        )
    )
    account.debt -= paid
    append(
        account,
        kind,
        source,
        at,
        available=points if active else 0,
        pending=0 if active else points,
        lifetime=points if lifetime else 0,
        new_lot=key,
    )


#: A lot with something to settle at ``$2``: pending past its activation, or active past expiry.
DUE_LOTS = (
    "remaining > 0 AND ((state = 'pending' AND activates_at <= $2)"
    " OR (expires_at IS NOT NULL AND expires_at <= $2))"
)


async def settle(conn: TenantConn, account: Account, now: datetime) -> None:
    """Activate the pending lots whose time has come, then expire the active lots whose time has
    passed: what the jobs do, done first by any write so it never spends an expired point."""
    _no_unsaved_lots(account)
    due = await conn.fetch(
        "SELECT id, remaining, state, activates_at, expires_at FROM loyalty_lots"
        f" WHERE customer_ref = $1 AND {DUE_LOTS} ORDER BY activates_at, id",
        account.ref,
        now,
    )
    for lot in due:
        remaining = lot["remaining"]
        if lot["state"] == "pending":
            remaining = await _activate(conn, account, lot["id"], remaining, lot["activates_at"])
        expires_at = lot["expires_at"]
        if expires_at is not None and expires_at <= now and remaining > 0:
            await conn.execute("UPDATE loyalty_lots SET remaining = 0 WHERE id = $1", lot["id"])
            append(
                account,
                "expire",
                Source(reason="points expired"),
                expires_at,
                available=-remaining,
                lot_id=lot["id"],
            )


async def _activate(
    conn: TenantConn, account: Account, lot_id: int, points: int, at: datetime
) -> int:
    """A pending lot becomes spendable (paying off debt first); returns what is left in it."""
    paid = min(account.debt, points)
    account.debt -= paid
    await conn.execute(
        "UPDATE loyalty_lots SET state = 'active', remaining = $2 WHERE id = $1",
        lot_id,
        points - paid,
    )
    append(
        account,
        "activate",
        Source(reason="return window passed"),
        at,
        available=points,
        pending=-points,
        lot_id=lot_id,
    )
    return points - paid


async def take(
    conn: TenantConn, account: Account, points: int, kind: Kind, source: Source, at: datetime
) -> None:
    """Spend ``points`` of the available balance, earliest-expiring lots first. The caller has
    checked that the balance covers it."""
    assert 0 < points <= account.available
    _no_unsaved_lots(account)
    await _take_from_lots(conn, account.ref, points)
    append(account, kind, source, at, available=-points)


async def _spendable_lots(conn: TenantConn, ref: int) -> list[Lot]:
    rows = await conn.fetch(
        "SELECT id, remaining, expires_at FROM loyalty_lots"
        " WHERE customer_ref = $1 AND state = 'active' AND remaining > 0"
        " ORDER BY expires_at NULLS LAST, id",
        ref,
    )
    return [Lot(row["id"], row["remaining"], row["expires_at"]) for row in rows]


async def take_back_order(
    conn: TenantConn,
    account: Account,
    points: int,
    *,
    order_id: str,
    policy: str,
    source: Source,
    at: datetime,
) -> int:
    """Reverse up to ``points`` earned on ``order_id`` after a refund, as the programme's
    policy allows; returns how many were reversed.

    The order's own lots go first, pending before active. ``pending_only`` stops there (and
    takes only pending points); ``within_balance`` then takes from the other active lots, never
    below zero; ``allow_negative`` books whatever is still owed as debt.
    """
    _no_unsaved_lots(account)
    lots = await conn.fetch(
        "SELECT id, remaining, state FROM loyalty_lots"
        " WHERE order_id = $1 AND customer_ref = $2 AND remaining > 0"
        " ORDER BY state DESC, id",  # 'pending' sorts after 'active': DESC puts it first
        order_id,
        account.ref,
    )
    left = points
    from_pending = from_available = 0
    for lot in lots:
        if left == 0:
            break
        if lot["state"] == "active" and policy == "pending_only":
            continue
        used = min(left, lot["remaining"])
        await conn.execute(
            "UPDATE loyalty_lots SET remaining = remaining - $2 WHERE id = $1", lot["id"], used
        )
        left -= used
        if lot["state"] == "pending":
            from_pending += used
        else:
            from_available += used
    if left > 0 and policy != "pending_only":
        others = min(left, max(0, account.available - from_available))
        if others > 0:
            await _take_from_lots(conn, account.ref, others)
            from_available += others
            left -= others
        if left > 0 and policy == "allow_negative":
            account.debt += left
            from_available += left
            left = 0
    reversed_points = from_pending + from_available
    if reversed_points:
        append(
            account,
            "reverse",
            source,
            at,
            available=-from_available,
            pending=-from_pending,
            lifetime=-reversed_points,
        )
    return reversed_points


def _no_unsaved_lots(account: Account) -> None:
    # Lots are written by save(); reading them before would miss the new ones.
    assert not account.new_lots, "save() the account before reading its lots"


async def _take_from_lots(conn: TenantConn, ref: int, points: int) -> None:
    left = points
    for lot in await _spendable_lots(conn, ref):
        used = min(left, lot.remaining)
        await conn.execute(
            "UPDATE loyalty_lots SET remaining = remaining - $2 WHERE id = $1", lot.id, used
        )
        left -= used
        if left == 0:
            return


_MOVED_TABLES = (
    "loyalty_lots",
    "loyalty_entries",
    "loyalty_redemptions",
    "loyalty_refunds",
    "loyalty_tier_changes",
    "outbox",
)


async def merge_accounts(conn: TenantConn, absorbed: int, survivor: int) -> None:
    """A profile merge: the absorbed customer's lots, entries and redemptions move to the
    survivor, whose balances add up both, so each still equals the sum of its entries."""
    has_points = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM loyalty_accounts WHERE customer_ref = $1)", absorbed
    )
    if not has_points:
        return
    accounts = await lock_accounts(conn, [absorbed, survivor])
    for table in _MOVED_TABLES:
        await conn.execute(
            f"UPDATE {table} SET customer_ref = $2 WHERE customer_ref = $1", absorbed, survivor
        )
    gone, kept = accounts[absorbed], accounts[survivor]
    kept.available += gone.available
    kept.pending += gone.pending
    kept.lifetime_earned += gone.lifetime_earned
    kept.debt += gone.debt
    if kept.tier is None:
        kept.tier, kept.tier_since = gone.tier, gone.tier_since
        kept.tier_review_at = gone.tier_review_at
    gone.available = gone.pending = gone.lifetime_earned = gone.debt = 0
    gone.tier = gone.tier_since = gone.tier_review_at = None
    kept.changed = gone.changed = kept.tier_moved = gone.tier_moved = True
    await save(conn, [kept, gone])
