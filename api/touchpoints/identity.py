"""Who a touchpoint is about: ids to profiles, new profiles, and joining anonymous histories.

A profile (a ``customers`` row) is one person. ``identities`` maps every id that leads to it:
the shop's ``customer_id`` and the ``anonymous_id`` of each device. Two rules hold everywhere:

- an anonymous profile joins a known customer when the two ids are seen together (identify, or a
  touchpoint carrying both), and its history, counts and traits move with it;
- two different known customers are never merged implicitly; only ``merge`` does that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from api.db import TenantConn
from api.loyalty.ledger import merge_accounts
from api.offers.decide import merge_offers

IdKey = tuple[str, str]  # (kind, value)


def lock_key(kind: str, value: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock`` on one id."""
    digest = hashlib.blake2b(f"{kind}:{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def lock_ids(conn: TenantConn, ids: Iterable[IdKey]) -> None:
    """Serialise concurrent writers of the same people; sorted, so no two lock in opposite order."""
    keys = sorted({lock_key(kind, value) for kind, value in ids})
    if keys:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k ORDER BY k", keys
        )


@dataclass
class ProfileIds:
    """Resolved ids of one batch: id -> profile, which profiles are known customers, and which
    of the asked-about suppression hashes are suppressed (erased people)."""

    refs: dict[IdKey, int]
    known: set[int]
    suppressed: set[bytes] = field(default_factory=set)


async def resolve(
    conn: TenantConn, ids: Iterable[IdKey], suppression_hashes: Iterable[bytes] = ()
) -> ProfileIds:
    """Look the ids up, and in the same round trip whether any of the hashes is suppressed."""
    pairs = sorted(set(ids))
    hashes = list(set(suppression_hashes))
    if not pairs and not hashes:
        return ProfileIds({}, set())
    rows = await conn.fetch(
        "SELECT i.kind, i.value, i.customer_ref, c.customer_id IS NOT NULL AS known,"
        " NULL::bytea AS suppressed"
        " FROM unnest($1::text[], $2::text[]) AS u(kind, value)"
        " JOIN identities i ON i.kind = u.kind AND i.value = u.value"
        " JOIN customers c ON c.id = i.customer_ref"
        " UNION ALL"
        " SELECT NULL, NULL, NULL, NULL, value_hash FROM suppressed_ids"
        " WHERE value_hash = ANY($3::bytea[])",
        [kind for kind, _ in pairs],
        [value for _, value in pairs],
        hashes,
    )
    found = [r for r in rows if r["suppressed"] is None]
    return ProfileIds(
        refs={(r["kind"], r["value"]): r["customer_ref"] for r in found},
        known={r["customer_ref"] for r in found if r["known"]},
        suppressed={r["suppressed"] for r in rows if r["suppressed"] is not None},
    )


async def new_profile_refs(conn: TenantConn, count: int) -> list[int]:
    """Ids for new profiles, taken up front so rows and identities can be written in bulk."""
    if count == 0:
        return []
    rows = await conn.fetch(
        "SELECT nextval(pg_get_serial_sequence('customers', 'id')) AS id"
        " FROM generate_series(1, $1)",
        count,
    )
    return [r["id"] for r in rows]


async def create_profiles(conn: TenantConn, profiles: list[tuple[int, str | None]]) -> None:
    """``(ref, customer_id)`` pairs: new profiles, known when customer_id is set."""
    if profiles:
        await conn.execute(
            "INSERT INTO customers (id, customer_id) OVERRIDING SYSTEM VALUE"
            " SELECT * FROM unnest($1::bigint[], $2::text[])",
            [ref for ref, _ in profiles],
            [customer_id for _, customer_id in profiles],
        )


async def add_identities(conn: TenantConn, identities: list[tuple[str, str, int]]) -> None:
    if identities:
        await conn.execute(
            "INSERT INTO identities (kind, value, customer_ref)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])",
            [kind for kind, _, _ in identities],
            [value for _, value, _ in identities],
            [ref for _, _, ref in identities],
        )


async def make_known(conn: TenantConn, ref: int, customer_id: str) -> None:
    """An anonymous profile learns its customer id (the person logged in or signed up)."""
    await conn.execute(
        "UPDATE customers SET customer_id = $2, updated_at = now() WHERE id = $1", ref, customer_id
    )
    await add_identities(conn, [("customer_id", customer_id, ref)])


async def absorb(conn: TenantConn, absorbed: int, survivor: int) -> None:
    """Fold ``absorbed`` into ``survivor``: ids, touchpoints, counts and traits move; nothing is
    lost or counted twice. The survivor's traits win; the absorbed ones fill gaps."""
    if absorbed == survivor:
        return
    # Both rows locked first, in id order: an ingest that read the absorbed profile before this
    # commits either finishes first (and its rows move with the rest) or sees ``merged_into``
    # when it updates the profile, and follows it (see ingest._update_profiles).
    await conn.execute(
        "SELECT id FROM customers WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE",
        [absorbed, survivor],
    )
    await conn.execute(
        "UPDATE identities SET customer_ref = $2 WHERE customer_ref = $1", absorbed, survivor
    )
    await conn.execute(
        "UPDATE touchpoints SET customer_ref = $2 WHERE customer_ref = $1", absorbed, survivor
    )
    await conn.execute(
        "UPDATE stage_transitions SET customer_ref = $2 WHERE customer_ref = $1",
        absorbed,
        survivor,
    )
    await merge_accounts(conn, absorbed, survivor)
    await merge_offers(conn, absorbed, survivor)
    await conn.execute(
        """
        UPDATE customers s SET
            email = coalesce(s.email, a.email),
            name = coalesce(s.name, a.name),
            traits = a.traits || s.traits,
            trait_times = a.trait_times || s.trait_times,
            first_seen_at = least(s.first_seen_at, a.first_seen_at),
            last_seen_at = greatest(s.last_seen_at, a.last_seen_at),
            touchpoint_count = s.touchpoint_count + a.touchpoint_count,
            counts_by_type = add_counts(s.counts_by_type, a.counts_by_type),
            counts_by_channel = add_counts(s.counts_by_channel, a.counts_by_channel),
            order_count = s.order_count + a.order_count,
            revenue = add_counts(s.revenue, a.revenue),
            last_purchase_at = greatest(s.last_purchase_at, a.last_purchase_at),
            updated_at = now()
        FROM customers a
        WHERE s.id = $2 AND a.id = $1
        """,
        absorbed,
        survivor,
    )
    await conn.execute(
        """
        UPDATE customers SET merged_into = $2, touchpoint_count = 0, counts_by_type = '{}',
            counts_by_channel = '{}', order_count = 0, revenue = '{}', updated_at = now()
        WHERE id = $1
        """,
        absorbed,
        survivor,
    )
    # Anything that pointed at the absorbed profile now points at the survivor.
    await conn.execute(
        "UPDATE customers SET merged_into = $2 WHERE merged_into = $1", absorbed, survivor
    )
