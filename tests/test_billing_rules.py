"""Billing's pure rules, without a database or Stripe: plans from configuration, and what a
subscription as Stripe reports it does to a shop's account."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from api.billing.accounts import Account, entitlement_of
from api.billing.lifecycle import UnknownPlan, apply_subscription, choose
from api.billing.plans import PlanConfigError, parse_plans
from api.billing.stripe_client import Subscription, SubscriptionItem
from api.config import SettingsError, load_settings

PLANS = parse_plans(
    json.dumps(
        {
            "growth": {"price_id": "p_growth", "overage_price_id": "p_growth_over"},
            "scale": {"price_id": "p_scale", "overage_price_id": "p_scale_over"},
        }
    )
)
NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)
GRACE = timedelta(days=7)


def subscription(
    status: str, *, sid: str = "sub_1", created: int = 1_000, price: str = "p_growth"
) -> Subscription:
    return Subscription(
        id=sid,
        customer="cus_1",
        status=status,
        created=created,
        items=(
            SubscriptionItem("si_1", price, 1_000, 2_000),
            SubscriptionItem("si_2", price + "_over", 1_000, 2_000),
        ),
    )


def account(**fields: object) -> Account:
    return Account(tenant_id=uuid.UUID(int=1), stripe_customer_id="cus_1", **fields)  # type: ignore[arg-type]


def test_default_plans_and_overrides() -> None:
    plans = parse_plans("", free_rate_per_second=20, free_burst=40)
    assert plans.free.touchpoints_per_month == 10_000
    assert plans.free.hard_quota and not plans["growth"].hard_quota
    assert plans["scale"].campaigns is None
    assert (plans.free.rate_limit.per_second, plans.free.rate_limit.burst) == (20, 40)
    lifted = parse_plans('{"free": {"campaigns": -1, "rate_limit_burst": 9}}')
    assert lifted.free.campaigns is None and lifted.free.rate_limit.burst == 9
    # A paid plan never gets less than Free.
    roomy = parse_plans("", free_rate_per_second=1e9, free_burst=10**9)
    assert roomy["growth"].rate_limit.per_second == 1e9
    assert PLANS.by_price(("p_scale", "p_scale_over")) == PLANS["scale"]
    assert PLANS.by_price(("p_other",)) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{", "SJAAK_BILLING_PLANS"),
        ('{"gold": {}}', "gold"),
        ('{"free": {"price_id": "p"}}', "free plan has no Stripe prices"),
        ('{"growth": {"price_id": "p"}}', "both price_id and overage_price_id"),
        ('{"growth": {"touchpoints_per_month": -1}}', "touchpoints_per_month"),
        ('{"growth": {"nope": 1}}', "nope"),
        (
            '{"growth": {"price_id": "p", "overage_price_id": "q"},'
            ' "scale": {"price_id": "p", "overage_price_id": "r"}}',
            "used twice",
        ),
    ],
)
def test_bad_plan_configuration_is_refused_naming_the_variable(raw: str, message: str) -> None:
    with pytest.raises(PlanConfigError, match=message):
        parse_plans(raw)
    with pytest.raises(SettingsError, match="SJAAK_BILLING_PLANS"):
        load_settings({"SJAAK_BILLING_PLANS": raw})


def test_subscription_states_map_onto_the_account() -> None:
    start = account()
    assert entitlement_of(start, PLANS, NOW).plan.id == "free"
    active = apply_subscription(start, subscription("active"), PLANS, NOW, GRACE)
    assert (active.account.status, active.account.plan, active.outcome) == (
        "active",
        "growth",
        "applied",
    )
    assert active.account.current_period_end == datetime.fromtimestamp(2_000, UTC)
    assert apply_subscription(
        active.account, subscription("active"), PLANS, NOW, GRACE
    ).outcome == ("unchanged")

    past_due = apply_subscription(active.account, subscription("past_due"), PLANS, NOW, GRACE)
    assert past_due.account.status == "past_due"
    assert past_due.account.grace_until == NOW + GRACE
    # Fetched again later: the grace period still counts from when it began.
    later = apply_subscription(
        past_due.account, subscription("past_due"), PLANS, NOW + timedelta(days=2), GRACE
    )
    assert later.account.grace_until == NOW + GRACE
    # Once it has passed, the account is restricted, with or without the sweep.
    assert entitlement_of(later.account, PLANS, NOW + GRACE).restricted
    assert not entitlement_of(later.account, PLANS, NOW + GRACE - timedelta(seconds=1)).restricted
    over = apply_subscription(later.account, subscription("past_due"), PLANS, NOW + GRACE, GRACE)
    assert over.account.status == "restricted"
    assert "grace period ended" in str(over.account.status_reason)

    recovered = apply_subscription(over.account, subscription("active"), PLANS, NOW, GRACE)
    assert (recovered.account.status, recovered.account.past_due_since) == ("active", None)
    canceled = apply_subscription(recovered.account, subscription("canceled"), PLANS, NOW, GRACE)
    assert (canceled.account.status, canceled.account.plan) == ("canceled", "free")
    assert entitlement_of(canceled.account, PLANS, NOW).plan.id == "free"

    # An incomplete subscription is not the shop's until Stripe settles it.
    assert apply_subscription(start, subscription("incomplete"), PLANS, NOW, GRACE).account == start


def test_only_the_newest_live_subscription_counts() -> None:
    on_growth = apply_subscription(account(), subscription("active"), PLANS, NOW, GRACE).account
    newer = subscription("active", sid="sub_2", created=2_000, price="p_scale")
    upgrade = apply_subscription(on_growth, newer, PLANS, NOW, GRACE)
    assert (upgrade.account.plan, upgrade.account.subscription_id) == ("scale", "sub_2")
    assert upgrade.superseded == "sub_1"
    # The older one, seen again while still live, is to be cancelled and changes nothing.
    stale = apply_subscription(upgrade.account, subscription("active"), PLANS, NOW, GRACE)
    assert (stale.account, stale.superseded) == (upgrade.account, "sub_1")
    # Ended and not the shop's: ignored.
    old_end = apply_subscription(upgrade.account, subscription("canceled"), PLANS, NOW, GRACE)
    assert old_end.account == upgrade.account
    assert old_end.outcome.startswith("ignored")
    assert choose([subscription("canceled"), newer], on_growth) == newer
    assert choose([subscription("canceled")], on_growth) == subscription("canceled")
    assert choose([], on_growth) is None


def test_a_subscription_to_an_unknown_price_is_an_error_unless_its_metadata_names_the_plan() -> (
    None
):
    odd = subscription("active", price="p_retired")
    with pytest.raises(UnknownPlan, match="p_retired"):
        apply_subscription(account(), odd, PLANS, NOW, GRACE)
    named = Subscription(
        id=odd.id,
        customer=odd.customer,
        status="active",
        created=odd.created,
        items=odd.items,
        metadata={"plan": "scale"},
    )
    assert apply_subscription(account(), named, PLANS, NOW, GRACE).account.plan == "scale"
