"""The rule language: validation with paths, and the Python and SQL evaluators agreeing."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from api.db import Database, tenant_tx
from api.errors import Problem
from api.journey.rules import (
    DEFAULT_RULES,
    STAGES,
    Aggregates,
    RuleSet,
    drift_sql,
    drift_state,
    forward_stage,
    forward_stage_sql,
    next_stage,
    parse_rules,
)
from tests.conftest import ShopFactory

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def profile(**fields: Any) -> Aggregates:
    values: dict[str, Any] = {
        "counts_by_type": {},
        "counts_by_channel": {},
        "order_count": 0,
        "revenue": {},
        "last_seen_at": NOW,
        "last_purchase_at": None,
    }
    values.update(fields)
    return Aggregates(**values)


def test_the_defaults_walk_from_awareness_to_advocacy() -> None:
    steps = [
        (profile(), "awareness"),
        (profile(counts_by_type={"page_view": 3}), "awareness"),
        (profile(counts_by_type={"product_view": 1}), "consideration"),
        (profile(order_count=1, last_purchase_at=NOW), "acquisition"),
        (profile(order_count=2, last_purchase_at=NOW), "service"),
        (profile(order_count=3, last_purchase_at=NOW), "loyalty"),
        (
            profile(order_count=3, last_purchase_at=NOW, counts_by_type={"review_written": 1}),
            "advocacy",
        ),
    ]
    for aggregates, expected in steps:
        assert forward_stage(DEFAULT_RULES, aggregates, NOW) == expected


def test_stages_only_move_forward_and_drift_sits_on_top() -> None:
    buyer = profile(order_count=1, last_purchase_at=NOW - timedelta(days=10))
    assert next_stage(DEFAULT_RULES, "loyalty", buyer, NOW) == ("loyalty", "loyalty")
    idle = profile(order_count=1, last_purchase_at=NOW - timedelta(days=100))
    assert next_stage(DEFAULT_RULES, "acquisition", idle, NOW) == ("at_risk", "acquisition")
    gone = profile(order_count=1, last_purchase_at=NOW - timedelta(days=200))
    assert drift_state(DEFAULT_RULES, gone, NOW) == "lapsed"
    never_bought = profile(last_seen_at=NOW - timedelta(days=400))
    assert drift_state(DEFAULT_RULES, never_bought, NOW) is None


@pytest.mark.parametrize(
    ("rules", "path"),
    [
        ({"stages": {"awareness": {"orders": {"at_least": 1}}}}, "$.stages.awareness"),
        (
            {"stages": {"loyalty": {"touchpoints": {"at_least": 1, "types": ["clicked"]}}}},
            "$.stages.loyalty.touchpoints.types[0]",
        ),
        (
            {"stages": {"loyalty": {"touchpoints": {"at_least": 0, "types": ["search"]}}}},
            "$.stages.loyalty.touchpoints.at_least",
        ),
        (
            {
                "stages": {
                    "loyalty": {
                        "touchpoints": {"at_least": 1, "types": ["search"], "channels": ["web"]}
                    }
                }
            },
            "$.stages.loyalty.touchpoints",
        ),
        ({"stages": {"service": {"any": []}}}, "$.stages.service.any"),
        (
            {"stages": {"service": {"any": [{"orders": {"at_least": 2}}, {}]}}},
            "$.stages.service.any[1]",
        ),
        (
            {
                "stages": {
                    "service": {
                        "orders": {"at_least": 1},
                        "spend": {"currency": "EUR", "at_least": 1},
                    }
                }
            },
            "$.stages.service",
        ),
        (
            {"stages": {}, "drift": {"at_risk_after_days": 90, "lapsed_after_days": 60}},
            "$.drift.lapsed_after_days",
        ),
        ({"stages": {}, "colour": "red"}, "$"),
        (
            {"stages": {"loyalty": {"spend": {"currency": "euro", "at_least": 1}}}},
            "$.stages.loyalty.spend.currency",
        ),
        (
            {"stages": {"loyalty": {"loyalty_tier": {"in": []}}}},
            "$.stages.loyalty.loyalty_tier.in",
        ),
        (
            {"stages": {"loyalty": {"loyalty_tier": {"in": ["Gold!"]}}}},
            "$.stages.loyalty.loyalty_tier.in[0]",
        ),
    ],
)
def test_a_bad_rule_names_its_path(rules: dict[str, Any], path: str) -> None:
    with pytest.raises(Problem) as refused:
        parse_rules(msgspec.json.encode(rules))
    assert refused.value.status == 422
    assert refused.value.errors is not None
    assert path in [e.path for e in refused.value.errors]


CUSTOM = {
    "stages": {
        "consideration": {"touchpoints": {"at_least": 2, "channels": ["email", "sms"]}},
        "acquisition": {"spend": {"currency": "EUR", "at_least": 5000}},
        "service": {
            "all": [
                {"orders": {"at_least": 1, "at_most": 4}},
                {"days_since_last_seen": {"at_most": 30}},
            ]
        },
        "loyalty": {
            "any": [
                {"orders": {"at_least": 5}},
                {"days_since_purchase": {"at_least": 3, "at_most": 60}},
            ]
        },
        "advocacy": {"loyalty_tier": {"in": ["silver", "gold"]}},
    },
    "drift": {"at_risk_after_days": 45, "lapsed_after_days": 120},
}


@pytest.mark.parametrize("rules", [DEFAULT_RULES, parse_rules(msgspec.json.encode(CUSTOM))])
async def test_python_and_sql_evaluate_the_same(
    db: Database, make_shop: ShopFactory, rules: RuleSet
) -> None:
    shop = (await make_shop()).as_tenant()
    chance = random.Random(20261123)
    types = ["page_view", "product_view", "purchase", "review_written", "service_contact"]
    channels = ["web", "email", "sms", "store"]
    profiles: list[Aggregates] = []
    for _ in range(300):
        orders = chance.choice([0, 0, 1, 2, 3, 5, 8])
        profiles.append(
            profile(
                counts_by_type={t: chance.randint(0, 3) for t in chance.sample(types, 2)},
                counts_by_channel={c: chance.randint(0, 3) for c in chance.sample(channels, 2)},
                order_count=orders,
                revenue={"EUR": chance.randint(0, 9000)} if orders else {},
                last_seen_at=NOW
                - timedelta(days=chance.randint(0, 90), hours=chance.randint(0, 23)),
                last_purchase_at=(
                    NOW - timedelta(days=chance.randint(0, 250), hours=chance.randint(0, 23))
                    if orders
                    else None
                ),
                loyalty_tier=chance.choice([None, "bronze", "silver", "gold"]),
            )
        )
    async with tenant_tx(db, shop) as conn:
        refs = []
        for p in profiles:
            refs.append(
                await conn.fetchval(
                    "INSERT INTO customers (counts_by_type, counts_by_channel, order_count,"
                    " revenue, last_seen_at, last_purchase_at, loyalty_tier)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                    p.counts_by_type,
                    p.counts_by_channel,
                    p.order_count,
                    p.revenue,
                    p.last_seen_at,
                    p.last_purchase_at,
                    p.loyalty_tier,
                )
            )
        now_sql = "$1::timestamptz"
        rows = await conn.fetch(
            f"SELECT id, coalesce({drift_sql(rules, now_sql)}, {forward_stage_sql(rules, now_sql)})"
            " AS stage FROM customers c WHERE id = ANY($2::bigint[])",
            NOW,
            refs,
        )
    by_sql = {r["id"]: r["stage"] for r in rows}
    by_python = {
        ref: drift_state(rules, p, NOW) or forward_stage(rules, p, NOW)
        for ref, p in zip(refs, profiles, strict=True)
    }
    assert by_sql == by_python
    assert len(set(by_python.values())) >= 4, "the sample exercises several stages"
    assert set(by_python.values()) <= set(STAGES) | {"at_risk", "lapsed"}
