"""The journey rule set: its shape, its validation, and two evaluators of one meaning.

A shop's rules say, for each stage after awareness, the condition that puts a customer there,
over the profile's aggregates only (so a stage costs constant time per touchpoint). A customer is
in the highest stage whose condition holds, and never moves back on a new touchpoint; drift
(`at_risk`, `lapsed`) is recency since the last purchase, and a new purchase ends it.

The same rules are evaluated in Python (ingest, one profile at a time) and compiled to SQL
(preview and the drift job, over all profiles at once); a test holds the two to the same answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

import msgspec

from api.errors import FieldError, Problem, field_error
from api.touchpoints.schemas import CUSTOM_TYPE, STANDARD_TYPES, Channel

STAGES: tuple[str, ...] = (
    "awareness",
    "consideration",
    "acquisition",
    "service",
    "loyalty",
    "advocacy",
)
DRIFT_STATES = ("at_risk", "lapsed")
MAX_DEPTH = 5
_RANK = {stage: rank for rank, stage in enumerate(STAGES)}

Count = Annotated[int, msgspec.Meta(ge=0, le=10**9)]
Days = Annotated[int, msgspec.Meta(ge=0, le=36500)]


class Between(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    at_least: Count | None = None
    at_most: Count | None = None


class TouchpointCount(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """How many touchpoints of these types (or on these channels) the customer has had."""

    at_least: Annotated[int, msgspec.Meta(ge=1, le=10**9)]
    types: Annotated[list[str], msgspec.Meta(min_length=1, max_length=50)] | None = None
    channels: Annotated[list[Channel], msgspec.Meta(min_length=1, max_length=12)] | None = None


class Spend(msgspec.Struct, forbid_unknown_fields=True):
    """Revenue in one currency, in minor units."""

    currency: Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")]
    at_least: Count


class LoyaltyTier(msgspec.Struct, forbid_unknown_fields=True):
    """The customer's loyalty tier is one of these (names from the loyalty programme)."""

    in_: Annotated[
        list[Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]*$", max_length=40)]],
        msgspec.Meta(min_length=1, max_length=10),
    ] = msgspec.field(name="in")


class Condition(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Exactly one of these keys."""

    touchpoints: TouchpointCount | None = None
    orders: Between | None = None
    spend: Spend | None = None
    days_since_last_seen: Between | None = None
    days_since_purchase: Between | None = None
    loyalty_tier: LoyaltyTier | None = None
    all: list[Condition] | None = None
    any: list[Condition] | None = None


class Drift(msgspec.Struct, forbid_unknown_fields=True):
    """A customer who has bought drifts after this many days without a new purchase."""

    at_risk_after_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 90
    lapsed_after_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 180


class RuleSet(msgspec.Struct, forbid_unknown_fields=True):
    #: Keys: consideration, acquisition, service, loyalty, advocacy (awareness needs no rule).
    stages: dict[str, Condition]
    drift: Drift = msgspec.field(default_factory=Drift)


def _types(*names: str) -> Condition:
    return Condition(touchpoints=TouchpointCount(at_least=1, types=list(names)))


def _orders(at_least: int) -> Condition:
    return Condition(orders=Between(at_least=at_least))


DEFAULT_RULES = RuleSet(
    stages={
        "consideration": _types(
            "product_view",
            "search",
            "add_to_cart",
            "cart_abandoned",
            "checkout_started",
            "newsletter_signup",
            "email_click",
            "account_created",
        ),
        "acquisition": _orders(1),
        "service": Condition(
            any=[_orders(2), Condition(all=[_orders(1), _types("service_contact", "refund")])]
        ),
        "loyalty": _orders(3),
        "advocacy": Condition(
            all=[_orders(1), _types("review_written", "referral_made", "social_share")]
        ),
    }
)


# --- validation ---------------------------------------------------------------------------------


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    # Conditions are decoded one stage at a time, so an error can name its stage in the path
    # (msgspec reports a dict value only as `[...]`).
    stages: dict[str, msgspec.Raw]
    drift: Drift = msgspec.field(default_factory=Drift)


def parse_rules(body: bytes) -> RuleSet:
    """A rule set from JSON, or a 422 naming every failing path."""
    try:
        envelope = msgspec.json.decode(body, type=_Envelope)
    except msgspec.ValidationError as exc:
        raise _invalid([field_error(exc, "$")]) from exc
    except msgspec.DecodeError as exc:
        raise Problem("malformed-body", f"The request body is not valid JSON: {exc}") from exc
    errors: list[FieldError] = []
    stages: dict[str, Condition] = {}
    for stage, raw in envelope.stages.items():
        path = f"$.stages.{stage}"
        if stage not in STAGES[1:]:
            errors.append(FieldError(path, f"not a stage with rules: one of {STAGES[1:]}"))
            continue
        try:
            stages[stage] = msgspec.json.decode(raw, type=Condition)
        except msgspec.ValidationError as exc:
            errors.append(field_error(exc, path))
            continue
        errors.extend(_condition_errors(stages[stage], path, 1))
    rules = RuleSet(stages=stages, drift=envelope.drift)
    if rules.drift.lapsed_after_days <= rules.drift.at_risk_after_days:
        errors.append(
            FieldError("$.drift.lapsed_after_days", "must be more than at_risk_after_days")
        )
    if errors:
        raise _invalid(errors)
    return rules


def _invalid(errors: list[FieldError]) -> Problem:
    return Problem("validation", f"{len(errors)} rule(s) failed validation.", errors=errors)


def _condition_errors(condition: Condition, path: str, depth: int) -> list[FieldError]:
    present = [f for f in condition.__struct_fields__ if getattr(condition, f) is not None]
    if len(present) != 1:
        return [FieldError(path, f"a condition has exactly one key, not {present or 'none'}")]
    [key] = present
    value = getattr(condition, key)
    here = f"{path}.{key}"
    if key in ("all", "any"):
        if depth >= MAX_DEPTH:
            return [FieldError(here, f"conditions nest at most {MAX_DEPTH} levels")]
        if not value:
            return [FieldError(here, "needs at least one condition")]
        return [
            error
            for index, child in enumerate(value)
            for error in _condition_errors(child, f"{here}[{index}]", depth + 1)
        ]
    if key == "touchpoints":
        if (value.types is None) == (value.channels is None):
            return [FieldError(here, "count by `types` or by `channels` (one of them)")]
        return [
            FieldError(f"{here}.types[{i}]", f"{name!r} is not a touchpoint type")
            for i, name in enumerate(value.types or [])
            if name not in STANDARD_TYPES and not CUSTOM_TYPE.fullmatch(name)
        ]
    if isinstance(value, Between):
        if value.at_least is None and value.at_most is None:
            return [FieldError(here, "give at_least and/or at_most")]
        if (
            value.at_least is not None
            and value.at_most is not None
            and (value.at_least > value.at_most)
        ):
            return [FieldError(f"{here}.at_most", "must not be less than at_least")]
    return []


# --- evaluation in Python (one profile) ---------------------------------------------------------


@dataclass(frozen=True)
class Aggregates:
    counts_by_type: dict[str, int]
    counts_by_channel: dict[str, int]
    order_count: int
    revenue: dict[str, int]
    last_seen_at: datetime | None
    last_purchase_at: datetime | None
    loyalty_tier: str | None = None


def holds(condition: Condition, profile: Aggregates, now: datetime) -> bool:
    if condition.all is not None:
        return all(holds(c, profile, now) for c in condition.all)
    if condition.any is not None:
        return any(holds(c, profile, now) for c in condition.any)
    if condition.touchpoints is not None:
        wanted = condition.touchpoints
        counts = profile.counts_by_type if wanted.types else profile.counts_by_channel
        names: list[str] = list(wanted.types or wanted.channels or [])
        return sum(counts.get(name, 0) for name in names) >= wanted.at_least
    if condition.orders is not None:
        return _between(profile.order_count, condition.orders)
    if condition.spend is not None:
        return profile.revenue.get(condition.spend.currency, 0) >= condition.spend.at_least
    if condition.days_since_last_seen is not None:
        return _days_between(profile.last_seen_at, now, condition.days_since_last_seen)
    if condition.days_since_purchase is not None:
        return _days_between(profile.last_purchase_at, now, condition.days_since_purchase)
    if condition.loyalty_tier is not None:
        return profile.loyalty_tier in condition.loyalty_tier.in_
    return False


def _between(value: int, bounds: Between) -> bool:
    return (bounds.at_least is None or value >= bounds.at_least) and (
        bounds.at_most is None or value <= bounds.at_most
    )


def _days_between(moment: datetime | None, now: datetime, bounds: Between) -> bool:
    if moment is None:
        return False
    return _between((now - moment) // timedelta(days=1), bounds)


def forward_stage(rules: RuleSet, profile: Aggregates, now: datetime) -> str:
    """The highest of the six stages whose condition holds (awareness when none does)."""
    for stage in reversed(STAGES[1:]):
        condition = rules.stages.get(stage)
        if condition is not None and holds(condition, profile, now):
            return stage
    return "awareness"


def drift_state(rules: RuleSet, profile: Aggregates, now: datetime) -> str | None:
    if profile.order_count < 1 or profile.last_purchase_at is None:
        return None
    idle = now - profile.last_purchase_at
    if idle > timedelta(days=rules.drift.lapsed_after_days):
        return "lapsed"
    if idle > timedelta(days=rules.drift.at_risk_after_days):
        return "at_risk"
    return None


def later(a: str, b: str) -> str:
    """The further of two of the six stages."""
    return a if _RANK[a] >= _RANK[b] else b


def next_stage(
    rules: RuleSet, reached: str, profile: Aggregates, now: datetime, basis: str | None = None
) -> tuple[str, str]:
    """(stage, reached) after a change to the profile: forward only, drift on top.

    ``basis`` is set after a manual move: what the rules gave then. The rules move the customer
    again only once they give more than that; a hand-set stage is not undone by the next page
    view of a customer whose history already earned a higher one.
    """
    earned = forward_stage(rules, profile, now)
    if not new_evidence(earned, basis):
        earned = "awareness"
    reached = later(reached, earned)
    return drift_state(rules, profile, now) or reached, reached


def new_evidence(earned: str, basis: str | None) -> bool:
    return basis is None or _RANK[earned] > _RANK[basis]


# --- compilation to SQL (all profiles at once) --------------------------------------------------

_NAME = re.compile(r"^[a-z0-9_]+$")


def _literal(name: str) -> str:
    # Only validated names get here (types, channels, ISO currencies); refuse anything else.
    if not _NAME.fullmatch(name.lower()):
        raise ValueError(f"unsafe name in a rule: {name!r}")
    return f"'{name}'"


def condition_sql(condition: Condition, now: str = "now()") -> str:
    if condition.all is not None:
        return "(" + " AND ".join(condition_sql(c, now) for c in condition.all) + ")"
    if condition.any is not None:
        return "(" + " OR ".join(condition_sql(c, now) for c in condition.any) + ")"
    if condition.touchpoints is not None:
        wanted = condition.touchpoints
        column = "counts_by_type" if wanted.types else "counts_by_channel"
        names: list[str] = list(wanted.types or wanted.channels or [])
        total = " + ".join(f"coalesce(({column}->>{_literal(n)})::bigint, 0)" for n in names)
        return f"(({total}) >= {int(wanted.at_least)})"
    if condition.orders is not None:
        return _between_sql("order_count", condition.orders)
    if condition.spend is not None:
        currency = _literal(condition.spend.currency)
        return f"(coalesce((revenue->>{currency})::bigint, 0) >= {int(condition.spend.at_least)})"
    if condition.days_since_last_seen is not None:
        days = f"floor(extract(epoch FROM {now} - last_seen_at) / 86400)"
        return (
            f"(last_seen_at IS NOT NULL AND {_between_sql(days, condition.days_since_last_seen)})"
        )
    if condition.days_since_purchase is not None:
        days = f"floor(extract(epoch FROM {now} - last_purchase_at) / 86400)"
        bounds = condition.days_since_purchase
        return f"(last_purchase_at IS NOT NULL AND {_between_sql(days, bounds)})"
    if condition.loyalty_tier is not None:
        tiers = ", ".join(_literal(name) for name in condition.loyalty_tier.in_)
        return f"(loyalty_tier IN ({tiers}))"
    return "false"


def _between_sql(expression: str, bounds: Between) -> str:
    parts = []
    if bounds.at_least is not None:
        parts.append(f"{expression} >= {int(bounds.at_least)}")
    if bounds.at_most is not None:
        parts.append(f"{expression} <= {int(bounds.at_most)}")
    return "(" + " AND ".join(parts) + ")"


def forward_stage_sql(rules: RuleSet, now: str = "now()") -> str:
    cases = [
        f"WHEN {condition_sql(rules.stages[stage], now)} THEN '{stage}'"
        for stage in reversed(STAGES[1:])
        if stage in rules.stages
    ]
    return f"(CASE {' '.join(cases)} ELSE 'awareness' END)" if cases else "'awareness'"


def drift_sql(rules: RuleSet, now: str = "now()") -> str:
    lapsed = int(rules.drift.lapsed_after_days)
    at_risk = int(rules.drift.at_risk_after_days)
    return (
        "(CASE WHEN order_count < 1 OR last_purchase_at IS NULL THEN NULL"
        f" WHEN {now} - last_purchase_at > interval '{lapsed} days' THEN 'lapsed'"
        f" WHEN {now} - last_purchase_at > interval '{at_risk} days' THEN 'at_risk' END)"
    )


def rules_json(rules: RuleSet) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.to_builtins(rules)
    return result
