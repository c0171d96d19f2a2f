"""Customer profiles: finding one by the shop's customer id, reading it, listing them.

A shop names its customers by its own ``customer_id``; the ``identities`` table leads from that id
to a profile. A profile absorbed by a merge has ``merged_into`` set: its ids lead to the survivor
(the merge re-points identities, so normally no hop is needed; the chain is followed anyway, a
bounded number of hops, so a half-finished or looping merge cannot hang a request).
"""

from __future__ import annotations

import logging
from datetime import datetime

import asyncpg
import msgspec

from api.customers.schemas import Customer, CustomerIds, CustomerRfm, Stage
from api.db import TenantConn
from api.errors import FieldError, Problem
from api.pagination import Page, page_of

log = logging.getLogger("sjaak.customers")

#: How many ``merged_into`` links a lookup follows before it gives up on the chain.
MAX_MERGE_HOPS = 8


class BrokenMergeChain(RuntimeError):
    """A profile's ``merged_into`` chain loops or is longer than :data:`MAX_MERGE_HOPS`: the data
    is inconsistent, which is our fault, not the caller's (so a 500, never a 404)."""


class CustomerFilter(msgspec.Struct, frozen=True, kw_only=True):
    """What ``GET /v1/customers`` narrows the list to. Time bounds are half-open:
    ``last_seen_after <= last_seen_at < last_seen_before``."""

    last_seen_after: datetime | None = None
    last_seen_before: datetime | None = None
    #: A case-insensitive substring of the e-mail address or the name.
    text: str | None = None
    stage: Stage | None = None


def not_found(customer_id: str) -> Problem:
    return Problem("not-found", f"No customer {customer_id}.")


# The chain from a customer id to the profile it leads to, one row per hop; the last row is the
# survivor unless the chain is broken (then its ``next_ref`` is still set).
_MERGE_CHAIN = """
WITH RECURSIVE chain (ref, next_ref, hops) AS (
    SELECT c.id, c.merged_into, 0
    FROM identities AS i
    JOIN customers AS c ON c.id = i.customer_ref
    WHERE i.kind = 'customer_id' AND i.value = $1
  UNION ALL
    SELECT c.id, c.merged_into, chain.hops + 1
    FROM chain
    JOIN customers AS c ON c.id = chain.next_ref
    WHERE chain.hops < $2
),
last_link AS (
    SELECT ref, next_ref FROM chain ORDER BY hops DESC LIMIT 1
)"""

RESOLVE_CUSTOMER_SQL = _MERGE_CHAIN + "\nSELECT ref, next_ref FROM last_link"

# Every column of the public profile, from ``_PROFILE_SOURCE``; ids oldest first. One probe of
# ``identities_by_customer`` per profile gathers both kinds of id.
_PROFILE_COLUMNS = """
    c.id, c.customer_id, c.email, c.name, c.traits, c.first_seen_at, c.last_seen_at,
    c.touchpoint_count, c.counts_by_type, c.counts_by_channel, c.order_count, c.revenue,
    c.last_purchase_at, c.stage, c.created_at, c.updated_at,
    c.rfm_recency, c.rfm_frequency, c.rfm_monetary, c.rfm_segment, c.rfm_computed_at,
    (SELECT r.computed_at FROM rfm_runs AS r ORDER BY r.id DESC LIMIT 1) AS rfm_run_at,
    coalesce(ids.customer_ids, '{}') AS customer_ids,
    coalesce(ids.anonymous_ids, '{}') AS anonymous_ids"""
_PROFILE_IDS = """
CROSS JOIN LATERAL (
    SELECT
        array_agg(i.value ORDER BY i.created_at, i.value)
            FILTER (WHERE i.kind = 'customer_id') AS customer_ids,
        array_agg(i.value ORDER BY i.created_at, i.value)
            FILTER (WHERE i.kind = 'anonymous_id') AS anonymous_ids
    FROM identities AS i
    WHERE i.customer_ref = c.id
) AS ids"""

CUSTOMER_SQL = (
    _MERGE_CHAIN
    + f"""
SELECT last_link.next_ref AS unresolved_merge, {_PROFILE_COLUMNS}
FROM last_link
JOIN customers AS c ON c.id = last_link.ref{_PROFILE_IDS}"""
)

CUSTOMER_BY_REF_SQL = f"""
SELECT {_PROFILE_COLUMNS}
FROM customers AS c{_PROFILE_IDS}
WHERE c.id = $1"""


async def resolve_customer_ref(conn: TenantConn, customer_id: str) -> int | None:
    """The profile ``customer_id`` leads to (the survivor of any merge), or ``None`` if the shop
    has no such customer. This is the way other domains turn a customer id into a profile."""
    row = await conn.fetchrow(RESOLVE_CUSTOMER_SQL, customer_id, MAX_MERGE_HOPS)
    if row is None:
        return None
    _ensure_resolved(customer_id, row["next_ref"])
    ref: int = row["ref"]
    return ref


async def customer_ref_or_404(conn: TenantConn, customer_id: str) -> int:
    """:func:`resolve_customer_ref`, or the ``not-found`` problem a route answers with."""
    ref = await resolve_customer_ref(conn, customer_id)
    if ref is None:
        raise not_found(customer_id)
    return ref


async def get_customer(conn: TenantConn, customer_id: str) -> Customer:
    """The profile ``customer_id`` leads to; a 404 problem if the shop has no such customer."""
    row = await conn.fetchrow(CUSTOMER_SQL, customer_id, MAX_MERGE_HOPS)
    if row is None:
        raise not_found(customer_id)
    _ensure_resolved(customer_id, row["unresolved_merge"])
    return customer_from_row(row, customer_id)


async def customer_by_ref(conn: TenantConn, ref: int, customer_id: str) -> Customer:
    """The profile with primary key ``ref``, which the caller has just resolved."""
    row = await conn.fetchrow(CUSTOMER_BY_REF_SQL, ref)
    if row is None:
        raise not_found(customer_id)
    return customer_from_row(row, customer_id)


def _ensure_resolved(customer_id: str, next_ref: int | None) -> None:
    if next_ref is not None:
        log.error(
            "merge chain of a customer does not end within %d hops",
            MAX_MERGE_HOPS,
            extra={"customer_ref_next": next_ref},
        )
        raise BrokenMergeChain(f"the merge chain of {customer_id!r} does not end")


def customer_from_row(row: asyncpg.Record, looked_up_as: str) -> Customer:
    """A profile row as the API shows it. A profile reached through an id always has a
    ``customer_id``; should a merge have left the survivor without one, it is shown under one of
    its known ids, failing that under the id it was looked up by."""
    counts_by_channel: dict[str, int] = row["counts_by_channel"]
    customer_ids: list[str] = list(row["customer_ids"])
    return Customer(
        customer_id=row["customer_id"] or (customer_ids[0] if customer_ids else looked_up_as),
        email=row["email"],
        name=row["name"],
        traits=row["traits"],
        first_seen_at=row["first_seen_at"],
        last_seen_at=row["last_seen_at"],
        touchpoint_count=row["touchpoint_count"],
        counts_by_type=row["counts_by_type"],
        counts_by_channel=counts_by_channel,
        channels=sorted(channel for channel, count in counts_by_channel.items() if count > 0),
        order_count=row["order_count"],
        revenue=row["revenue"],
        last_purchase_at=row["last_purchase_at"],
        ids=CustomerIds(customer_ids=customer_ids, anonymous_ids=list(row["anonymous_ids"])),
        stage=row["stage"],
        rfm=_rfm_of(row),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _rfm_of(row: asyncpg.Record) -> CustomerRfm | None:
    """The RFM part of a profile row, if a computation has scored the customer. The scores are
    current as of the shop's latest computation (``rfm_run_at``, selected once per query)."""
    if row["rfm_segment"] is None:
        return None
    return CustomerRfm(
        recency=row["rfm_recency"],
        frequency=row["rfm_frequency"],
        monetary=row["rfm_monetary"],
        segment=row["rfm_segment"],
        computed_at=row["rfm_run_at"] or row["rfm_computed_at"],
        changed_at=row["rfm_computed_at"],
    )


# --- the list --------------------------------------------------------------------------------

# Where a customer id sits in the list order. Merged or anonymous profiles still have a place in
# the order, so a page boundary that is merged away between two requests keeps working.
LIST_CURSOR_SQL = "SELECT c.last_seen_at, c.id FROM customers AS c WHERE c.customer_id = $1"

# Newest ``last_seen_at`` first, never-seen profiles last, then by id. The index
# ``customers_by_last_seen`` puts nulls first, so one ORDER BY ... NULLS LAST could not walk it;
# two branches each walk their part of it (both ORDER BYs match the index, which keeps the
# never-seen branch from scanning the table when there are few such profiles), each stops after
# ``limit`` rows, and the outer query keeps the first ``limit``.
# $1 last_seen_after, $2 last_seen_before, $3 text, $4/$5 the cursor's id/last_seen_at, $6 limit.
_KNOWN_UNMERGED_MATCHING = """
    c.merged_into IS NULL AND c.customer_id IS NOT NULL
    AND ($3::text IS NULL
         OR strpos(lower(c.email), lower($3)) > 0
         OR strpos(lower(c.name), lower($3)) > 0)
    AND ($7::text IS NULL OR c.stage = $7)"""

LIST_CUSTOMERS_SQL = f"""
SELECT {_PROFILE_COLUMNS}
FROM (
    (
        SELECT c.id, c.last_seen_at FROM customers AS c
        WHERE {_KNOWN_UNMERGED_MATCHING}
          AND c.last_seen_at IS NOT NULL
          AND ($1::timestamptz IS NULL OR c.last_seen_at >= $1)
          AND ($2::timestamptz IS NULL OR c.last_seen_at < $2)
          AND ($4::bigint IS NULL
               OR ($5::timestamptz IS NOT NULL AND (c.last_seen_at, c.id) < ($5, $4)))
        ORDER BY c.last_seen_at DESC, c.id DESC
        LIMIT $6
    )
    UNION ALL
    (
        SELECT c.id, c.last_seen_at FROM customers AS c
        WHERE {_KNOWN_UNMERGED_MATCHING}
          AND c.last_seen_at IS NULL
          AND $1::timestamptz IS NULL AND $2::timestamptz IS NULL
          AND ($4::bigint IS NULL OR $5::timestamptz IS NOT NULL OR c.id < $4)
        ORDER BY c.last_seen_at DESC, c.id DESC
        LIMIT $6
    )
) AS page
JOIN customers AS c ON c.id = page.id{_PROFILE_IDS}
ORDER BY page.last_seen_at DESC NULLS LAST, page.id DESC
LIMIT $6"""


async def list_customers(
    conn: TenantConn, filters: CustomerFilter, *, limit: int, starting_after: str | None
) -> Page[Customer]:
    """Known, unmerged customers matching ``filters``, most recently seen first."""
    cursor_ref: int | None = None
    cursor_seen: datetime | None = None
    if starting_after is not None:
        cursor = await conn.fetchrow(LIST_CURSOR_SQL, starting_after)
        if cursor is None:
            raise Problem(
                "validation",
                f"Invalid cursor: no customer {starting_after}.",
                errors=[FieldError("query.starting_after", "no such customer")],
            )
        cursor_ref, cursor_seen = cursor["id"], cursor["last_seen_at"]
    rows = await conn.fetch(
        LIST_CUSTOMERS_SQL,
        filters.last_seen_after,
        filters.last_seen_before,
        filters.text,
        cursor_ref,
        cursor_seen,
        limit + 1,
        filters.stage,
    )
    return page_of([customer_from_row(row, row["customer_id"]) for row in rows], limit)
