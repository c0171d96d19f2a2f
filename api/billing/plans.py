"""The plans a shop can be on (Free, Growth, Scale) and what each allows, from configuration.

The defaults below hold until ``SJAAK_BILLING_PLANS`` overrides them: a JSON object keyed by plan
id whose values set any of :class:`PlanOverride`'s fields, for example the Stripe prices::

    SJAAK_BILLING_PLANS='{"growth": {"price_id": "price_1Q…", "overage_price_id": "price_1R…"}}'

Free's API rate limit defaults to ``SJAAK_SHOP_RATE_LIMIT_*`` (the limit every shop had before
plans), and a paid plan never gets less than Free.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

if TYPE_CHECKING:
    from api.config import Settings

PlanId = Literal["free", "growth", "scale"]
PaidPlanId = Literal["growth", "scale"]
PLAN_IDS: tuple[PlanId, ...] = ("free", "growth", "scale")

Count = Annotated[int, msgspec.Meta(ge=0, le=10**12)]
PriceId = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]


class RateLimitView(msgspec.Struct, frozen=True):
    per_second: float
    burst: int


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """What a plan allows. ``None`` for campaigns or webhook endpoints means no limit."""

    id: PlanId
    name: str
    #: Accepted touchpoints per calendar month (UTC). Free stops there (429); paid plans go on
    #: and the touchpoints above it are billed through the overage price.
    touchpoints_per_month: int
    rate_limit: RateLimitView
    campaigns: int | None
    webhook_endpoints: int | None
    #: Stripe price of the monthly fee (licensed, quantity 1). Unset: the plan cannot be bought.
    price_id: str | None = None
    #: Stripe metered price on the touchpoints meter, billing touchpoints above the quota.
    overage_price_id: str | None = None
    #: Days of trial a first subscription to this plan starts with.
    trial_days: int = 0

    @property
    def paid(self) -> bool:
        return self.id != "free"

    @property
    def hard_quota(self) -> bool:
        """Free refuses ingest over its quota; paid plans bill the overage instead."""
        return not self.paid


class PlanOverride(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The fields ``SJAAK_BILLING_PLANS`` may set for one plan."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=60)] | None = None
    touchpoints_per_month: Count | None = None
    rate_limit_per_second: Annotated[float, msgspec.Meta(gt=0)] | None = None
    rate_limit_burst: Annotated[int, msgspec.Meta(ge=1)] | None = None
    #: ``-1`` lifts the limit.
    campaigns: Annotated[int, msgspec.Meta(ge=-1)] | None = None
    webhook_endpoints: Annotated[int, msgspec.Meta(ge=-1)] | None = None
    price_id: PriceId | None = None
    overage_price_id: PriceId | None = None
    trial_days: Annotated[int, msgspec.Meta(ge=0, le=730)] | None = None


_DEFAULTS: dict[PlanId, dict[str, object]] = {
    "free": {
        "name": "Free",
        "touchpoints_per_month": 10_000,
        "campaigns": 1,
        "webhook_endpoints": 1,
    },
    "growth": {
        "name": "Growth",
        "touchpoints_per_month": 1_000_000,
        "rate_limit": RateLimitView(1_000.0, 2_000),
        "campaigns": 25,
        "webhook_endpoints": 5,
    },
    "scale": {
        "name": "Scale",
        "touchpoints_per_month": 10_000_000,
        "rate_limit": RateLimitView(5_000.0, 10_000),
        "campaigns": None,
        "webhook_endpoints": 25,
    },
}

_overrides = msgspec.json.Decoder(dict[PlanId, PlanOverride])


class PlanConfigError(ValueError):
    """``SJAAK_BILLING_PLANS`` cannot be used; the message says why."""


class PlanBook(msgspec.Struct, frozen=True):
    """Every plan, by id, and by the Stripe price that sells it."""

    plans: dict[PlanId, Plan]

    def __getitem__(self, plan_id: PlanId) -> Plan:
        return self.plans[plan_id]

    @property
    def free(self) -> Plan:
        return self.plans["free"]

    def by_price(self, price_ids: tuple[str, ...] | list[str]) -> Plan | None:
        """The paid plan whose fee price is among ``price_ids`` (a subscription's items)."""
        for plan in self.plans.values():
            if plan.price_id is not None and plan.price_id in price_ids:
                return plan
        return None


def parse_plans(
    raw: str, *, free_rate_per_second: float = 200.0, free_burst: int = 400
) -> PlanBook:
    """The plans, defaults overridden by ``raw`` (the JSON of ``SJAAK_BILLING_PLANS``)."""
    try:
        overrides = _overrides.decode(raw) if raw.strip() else {}
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise PlanConfigError(f"SJAAK_BILLING_PLANS: {exc}") from exc
    free_limit = RateLimitView(free_rate_per_second, free_burst)
    plans: dict[PlanId, Plan] = {}
    for plan_id in PLAN_IDS:
        fields = {"id": plan_id, "rate_limit": free_limit, **_DEFAULTS[plan_id]}
        override = overrides.get(plan_id)
        if override is not None:
            for name in ("name", "touchpoints_per_month", "price_id", "overage_price_id"):
                value = getattr(override, name)
                if value is not None:
                    fields[name] = value
            if override.trial_days is not None:
                fields["trial_days"] = override.trial_days
            for name in ("campaigns", "webhook_endpoints"):
                value = getattr(override, name)
                if value is not None:
                    fields[name] = None if value == -1 else value
            current = fields["rate_limit"]
            assert isinstance(current, RateLimitView)
            fields["rate_limit"] = RateLimitView(
                override.rate_limit_per_second or current.per_second,
                override.rate_limit_burst or current.burst,
            )
        plans[plan_id] = msgspec.convert(fields, Plan, from_attributes=True)
    free = plans["free"]
    if free.price_id is not None or free.overage_price_id is not None:
        raise PlanConfigError("SJAAK_BILLING_PLANS: the free plan has no Stripe prices")
    for plan_id in ("growth", "scale"):
        plan = plans[plan_id]
        if (plan.price_id is None) != (plan.overage_price_id is None):
            raise PlanConfigError(
                f"SJAAK_BILLING_PLANS: {plan_id} needs both price_id and overage_price_id, or"
                " neither"
            )
        # A paid plan never limits a shop more than Free does.
        plans[plan_id] = msgspec.structs.replace(
            plan,
            rate_limit=RateLimitView(
                max(plan.rate_limit.per_second, free.rate_limit.per_second),
                max(plan.rate_limit.burst, free.rate_limit.burst),
            ),
        )
    prices = [p for plan in plans.values() for p in (plan.price_id, plan.overage_price_id) if p]
    if len(prices) != len(set(prices)):
        raise PlanConfigError("SJAAK_BILLING_PLANS: a Stripe price is used twice")
    return PlanBook(plans)


def plan_book(settings: Settings) -> PlanBook:
    """The plans ``settings`` configure (parsed once per distinct configuration)."""
    return _cached_book(
        settings.billing_plans, settings.shop_rate_limit_per_second, settings.shop_rate_limit_burst
    )


@functools.lru_cache(maxsize=32)
def _cached_book(raw: str, free_rate_per_second: float, free_burst: int) -> PlanBook:
    return parse_plans(raw, free_rate_per_second=free_rate_per_second, free_burst=free_burst)
