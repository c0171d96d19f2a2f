"""The right to be forgotten and the right of access.

Erasure removes the person from the shop's schema: profile, ids, touchpoints. Purchases and refunds
stay for the books, stripped of everything that points at the person, on an anonymous profile of
their own. The ids are kept only as hashes in ``suppressed_ids``, so events still arriving for the
person are refused instead of recreating them.
"""

from __future__ import annotations

from typing import Any

from api.db import TenantConn, rows_affected
from api.touchpoints.ingest import suppression_hash
from api.webhooks.events import publish

ACCOUNTING_TYPES = ("purchase", "refund")
#: Rows about the person that go with the profile: journey history, offers and campaign
#: assignments, the points ledger (an erased customer's points are forfeited), and events about
#: them (undispatched, or kept for webhook deliveries and their logs).
ERASED_WITH_PROFILE = (
    "stage_transitions",
    "offer_triggers",
    "offers",
    "campaign_assignments",
    "loyalty_entries",
    "loyalty_lots",
    "loyalty_redemptions",
    "loyalty_refunds",
    "loyalty_tier_changes",
    "loyalty_accounts",
    "outbox",
    "webhook_events",
)

_TOUCHPOINT_COLUMNS = (
    "event_id, type, channel, customer_id, anonymous_id, occurred_at, sent_at, received_at,"
    " email, order_id, amount, currency, order_details, properties, context"
)


async def profile_family(conn: TenantConn, ref: int) -> list[int]:
    """The profile and every profile ever merged into it."""
    rows = await conn.fetch(
        "WITH RECURSIVE family(id) AS (SELECT $1::bigint UNION"
        " SELECT c.id FROM customers c JOIN family f ON c.merged_into = f.id)"
        " SELECT id FROM family",
        ref,
    )
    return [r["id"] for r in rows]


async def erase(conn: TenantConn, ref: int) -> dict[str, int]:
    """Erase the person behind ``ref``; returns what was removed and what was kept, by count."""
    family = await profile_family(conn, ref)
    ids = await conn.fetch(
        "SELECT kind, value FROM identities WHERE customer_ref = ANY($1::bigint[])", family
    )
    emails = await conn.fetch(
        "SELECT DISTINCT email FROM customers WHERE id = ANY($1::bigint[]) AND email IS NOT NULL",
        family,
    )
    secrets = [r["value"] for r in ids] + [r["email"] for r in emails]
    await conn.execute(
        "INSERT INTO suppressed_ids (kind, value_hash)"
        " SELECT * FROM unnest($1::text[], $2::bytea[]) ON CONFLICT DO NOTHING",
        [r["kind"] for r in ids],
        [suppression_hash(r["kind"], r["value"]) for r in ids],
    )
    [tombstone] = await conn.fetch("INSERT INTO customers (customer_id) VALUES (NULL) RETURNING id")
    kept = await conn.execute(
        """
        UPDATE touchpoints SET customer_ref = $2, customer_id = NULL, anonymous_id = NULL,
            email = NULL, properties = '{}', context = '{}',
            event_id = 'erased_' || md5(event_id),
            order_details = CASE WHEN order_details IS NULL THEN NULL
                ELSE jsonb_build_object('shipping', order_details->'shipping') END
        WHERE customer_ref = ANY($1::bigint[]) AND type = ANY($3::text[])
        """,
        family,
        tombstone["id"],
        list(ACCOUNTING_TYPES),
    )
    removed = await conn.execute(
        "DELETE FROM touchpoints WHERE customer_ref = ANY($1::bigint[])", family
    )
    await conn.execute("DELETE FROM identities WHERE customer_ref = ANY($1::bigint[])", family)
    for table in ERASED_WITH_PROFILE:
        await conn.execute(f"DELETE FROM {table} WHERE customer_ref = ANY($1::bigint[])", family)
    # Stored idempotent responses may quote the person (an identify answer, for example).
    await conn.execute(
        "DELETE FROM idempotency_keys WHERE EXISTS (SELECT 1 FROM unnest($1::text[]) AS s(v)"
        " WHERE position(convert_to(s.v, 'UTF8') in response) > 0)",
        secrets,
    )
    # Absorbed profiles point at the survivor; remove them first.
    await conn.execute(
        "UPDATE customers SET merged_into = NULL WHERE id = ANY($1::bigint[])", family
    )
    await conn.execute("DELETE FROM customers WHERE id = ANY($1::bigint[])", family)
    customer_ids = [r["value"] for r in ids if r["kind"] == "customer_id"]
    # About no profile any more: the customer's own events went with it, this one stays.
    await publish(conn, "customer.deleted", {"customer_ids": customer_ids})
    return {
        "profiles": len(family),
        "ids": len(ids),
        "touchpoints_removed": rows_affected(removed),
        "accounting_records_kept": rows_affected(kept),
    }


async def export(conn: TenantConn, ref: int) -> dict[str, Any]:
    """Everything held about the person: profile(s), ids, every touchpoint, the journey and the
    points ledger."""
    family = await profile_family(conn, ref)
    profiles = await conn.fetch(
        "SELECT id, customer_id, email, name, traits, trait_times, first_seen_at, last_seen_at,"
        " touchpoint_count, counts_by_type, counts_by_channel, order_count, revenue,"
        " last_purchase_at, stage, stage_since, reached_stage, merged_into, created_at,"
        " updated_at"
        " FROM customers WHERE id = ANY($1::bigint[]) ORDER BY id",
        family,
    )
    ids = await conn.fetch(
        "SELECT kind, value, created_at FROM identities WHERE customer_ref = ANY($1::bigint[])"
        " ORDER BY kind, value",
        family,
    )
    touchpoints = await conn.fetch(
        f"SELECT {_TOUCHPOINT_COLUMNS} FROM touchpoints WHERE customer_ref = ANY($1::bigint[])"
        " ORDER BY occurred_at, id",
        family,
    )
    transitions = await conn.fetch(
        "SELECT from_stage, to_stage, occurred_at, cause, touchpoint_event_id, actor, reason"
        " FROM stage_transitions WHERE customer_ref = ANY($1::bigint[]) ORDER BY occurred_at, id",
        family,
    )
    ledger = await conn.fetch(
        "SELECT kind, available_delta, pending_delta, lifetime_delta, available_after,"
        " pending_after, lifetime_after, reason, event_id, order_id, redemption_id, actor,"
        " occurred_at, created_at"
        " FROM loyalty_entries WHERE customer_ref = ANY($1::bigint[]) ORDER BY id",
        family,
    )
    return {
        "loyalty_transactions": [dict(r) for r in ledger],
        "stage_transitions": [dict(r) for r in transitions],
        "profiles": [{k: v for k, v in dict(r).items() if k != "id"} for r in profiles],
        "identities": [dict(r) for r in ids],
        "touchpoints": [dict(r) for r in touchpoints],
    }
