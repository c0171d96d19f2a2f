"""``python -m api tenants export ID DIR``: a whole shop as JSON Lines, one file per table."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from api.db import Database, tenant_tx
from api.tenants.lifecycle import TenantRecord

#: Table -> the columns exported (named, never ``*``) and their order.
TABLES: dict[str, tuple[str, str]] = {
    "customers": (
        "id, customer_id, email, name, traits, trait_times, first_seen_at, last_seen_at,"
        " touchpoint_count, counts_by_type, counts_by_channel, order_count, revenue,"
        " last_purchase_at, stage, stage_since, reached_stage, stage_basis, rfm_recency,"
        " rfm_frequency, rfm_monetary, rfm_segment, rfm_computed_at, loyalty_tier, merged_into,"
        " created_at, updated_at",
        "id",
    ),
    "identities": ("kind, value, customer_ref, created_at", "kind, value"),
    "stage_transitions": (
        "id, customer_ref, from_stage, to_stage, occurred_at, cause, touchpoint_event_id, actor,"
        " reason",
        "id",
    ),
    "touchpoints": (
        "id, event_id, customer_ref, type, channel, customer_id, anonymous_id, occurred_at,"
        " sent_at, received_at, email, order_id, amount, currency, order_details, properties,"
        " context",
        "id",
    ),
    "journey_rule_versions": ("version, rules, created_at, created_by, restored_from", "version"),
    "rfm_settings": ("window_days, currency, updated_at, updated_by", "updated_at"),
    "rfm_runs": (
        "id, computed_at, as_of, window_days, currency, currency_setting, customers, segments,"
        " movement, changed, orders_recent, trigger",
        "id",
    ),
    "loyalty_programs": ("version, config, created_at, created_by", "version"),
    "loyalty_accounts": (
        "customer_ref, available, pending, lifetime_earned, debt, tier, tier_since,"
        " tier_review_at, updated_at",
        "customer_ref",
    ),
    "loyalty_lots": (
        "id, customer_ref, points, remaining, state, order_id, earned_at, activates_at,"
        " expires_at, expiry_notified, source",
        "id",
    ),
    "loyalty_entries": (
        "id, customer_ref, kind, available_delta, pending_delta, lifetime_delta,"
        " available_after, pending_after, lifetime_after, reason, event_id, order_id,"
        " redemption_id, actor, lot_id, occurred_at, created_at, dedupe_key",
        "id",
    ),
    "loyalty_redemptions": (
        "id, customer_ref, points, restored, reason, reference, created_at, created_by",
        "id",
    ),
    "loyalty_refunds": (
        "event_id, customer_ref, order_id, amount, share, reversed, restored, occurred_at",
        "event_id",
    ),
    "loyalty_tier_changes": ("id, customer_ref, from_tier, to_tier, reason, occurred_at", "id"),
    "outbox": ("id, type, customer_ref, payload, occurred_at, created_at, delivered_at", "id"),
    # Webhook endpoints without their signing secrets (encrypted under this server's secret).
    "webhook_endpoints": (
        "id, seq, url, description, event_types, enabled, previous_secret_expires_at,"
        " failing_since, consecutive_failures, disabled_reason, disabled_at, created_at,"
        " updated_at",
        "seq",
    ),
    "webhook_events": ("id, outbox_id, type, customer_ref, data, occurred_at, created_at", "id"),
    "webhook_deliveries": (
        "id, seq, endpoint_id, event_id, trigger, redelivery_of, status, attempts,"
        " next_attempt_at, leased_until, created_at, finished_at",
        "seq",
    ),
    "webhook_attempts": (
        "delivery_id, number, attempted_at, url, address, request_headers, request_body,"
        " response_status, response_body, duration_ms, error",
        "delivery_id, number",
    ),
    "campaigns": (
        "id, name, status, priority, starts_at, ends_at, definition, issued_count,"
        " redeemed_count, discount_total, created_at, updated_at, created_by",
        "id",
    ),
    "campaign_assignments": (
        "campaign_id, customer_ref, arm, variant, assigned_at",
        "campaign_id, customer_ref",
    ),
    "offers": (
        "id, campaign_id, customer_ref, variant, code, reward, stackable, issued_at, expires_at,"
        " redeemed_at, redeemed_order_id, discount, cause",
        "id",
    ),
    "offer_triggers": (
        "id, campaign_id, customer_ref, event_id, occurred_at, due_at, state, outcome, decided_at",
        "id",
    ),
    "usage_log": ("period_start, touchpoints", "period_start"),
    "usage_totals": ("period_start, touchpoints, folded_at", "period_start"),
    "usage_alerts": (
        "period_start, quota, percent, touchpoints, created_at",
        "period_start, quota, percent",
    ),
    # Hashes only: a restored shop must keep refusing the ids of people it erased.
    "suppressed_ids": ("value_hash, kind, suppressed_at", "value_hash"),
}
#: Tables left out: stored responses for retries are transient.
NOT_EXPORTED = frozenset({"idempotency_keys"})
_encode = msgspec.json.Encoder().encode


async def export_shop(db: Database, shop: TenantRecord, directory: Path) -> dict[str, Any]:
    """Write ``<directory>/<schema>/<table>.jsonl`` and ``manifest.json``; returns the manifest.

    Everything is read in one transaction, so the files are a consistent snapshot.
    """
    target = directory / shop.schema_name
    target.mkdir(parents=True, exist_ok=False)
    counts: dict[str, int] = {}
    async with tenant_tx(db, shop.as_tenant()) as conn:
        # A snapshot: every table as of the same moment, however long the export takes.
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        for table, (columns, order) in TABLES.items():
            counts[table] = 0
            with (target / f"{table}.jsonl").open("wb") as out:
                query = f"SELECT {columns} FROM {table} ORDER BY {order}"
                async for row in conn.cursor(query, prefetch=1000):
                    out.write(_encode(dict(row)) + b"\n")
                    counts[table] += 1
    manifest = {
        "tenant": {"id": str(shop.id), "name": shop.name, "schema": shop.schema_name},
        "schema_version": shop.schema_version,
        "exported_at": datetime.now(UTC).isoformat(),
        "files": {f"{table}.jsonl": n for table, n in counts.items()},
    }
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
