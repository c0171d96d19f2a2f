"""Campaigns: who gets an offer, when, what it gives, and how often.

A campaign is stored as a row with its definition (targeting, trigger, reward, limits, holdout,
variants, code format) as validated JSON, and budget counters that only conditional updates
change, so concurrent issues and redemptions never pass a budget.
"""

from __future__ import annotations

import secrets
import time
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
import msgspec

from api.customers.schemas import RfmSegment, Stage
from api.db import TenantConn
from api.errors import FieldError, Problem, decode_json
from api.pagination import Page, page_of
from api.touchpoints.schemas import CUSTOM_TYPE, STANDARD_TYPES

Status = Literal["draft", "active", "paused", "ended"]
Name = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]*$", max_length=40)]
Count = Annotated[int, msgspec.Meta(ge=0, le=10**12)]
Positive = Annotated[int, msgspec.Meta(ge=1, le=10**12)]
EventType = Annotated[str, msgspec.Meta(min_length=1, max_length=62)]
MAX_CAMPAIGN_BYTES = 64 * 1024
#: Moves a campaign may make; ``ended`` is final.
TRANSITIONS: dict[str, frozenset[str]] = {
    "draft": frozenset({"draft", "active", "ended"}),
    "active": frozenset({"active", "paused", "ended"}),
    "paused": frozenset({"paused", "active", "ended"}),
    "ended": frozenset({"ended"}),
}
#: How long a worker keeps a shop's active campaigns before reading them again.
CACHE_SECONDS = 5.0


class Between(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    at_least: Count | None = None
    at_most: Count | None = None


class SpendAtLeast(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    currency: Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")]
    at_least: Count


class RecentTouchpoints(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """At least one touchpoint of these types within the last ``within_days`` days."""

    types: Annotated[list[EventType], msgspec.Meta(min_length=1, max_length=20)]
    within_days: Annotated[int, msgspec.Meta(ge=1, le=3650)]


class Targeting(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """Every given condition must hold; none given: every known customer."""

    #: Journey stages or drift states (``at_risk``, ``lapsed``).
    stages: Annotated[list[Stage], msgspec.Meta(min_length=1)] | None = None
    rfm_segments: Annotated[list[RfmSegment], msgspec.Meta(min_length=1)] | None = None
    loyalty_tiers: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=10)] | None = None
    #: Available loyalty points.
    points: Between | None = None
    orders: Between | None = None
    spend: SpendAtLeast | None = None
    recent_touchpoints: RecentTouchpoints | None = None
    #: The cart's value in minor units is at least this: the request's ``context.cart_value``,
    #: or the triggering touchpoint's ``properties.cart_value``.
    min_cart_value: Count | None = None


PropertyValue = str | int | float | bool


class Trigger(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Decide automatically when a touchpoint of type ``event`` arrives (whose ``properties``
    include these key/value pairs), after ``delay_minutes``, unless a touchpoint of a
    ``cancel_on`` type arrived meanwhile (the abandoned-cart reminder: ``cart_abandoned``, 60,
    ``["purchase"]``)."""

    event: EventType
    delay_minutes: Annotated[int, msgspec.Meta(ge=0, le=60 * 24 * 30)] = 0
    cancel_on: Annotated[list[EventType], msgspec.Meta(max_length=20)] = msgspec.field(
        default_factory=list
    )
    properties: dict[str, PropertyValue] = msgspec.field(default_factory=dict)


RewardType = Literal[
    "percent_off", "amount_off", "free_shipping", "bonus_points", "points_multiplier"
]


class Reward(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """``percent_off`` needs ``percent``; ``amount_off`` needs ``amount`` (minor units) and
    ``currency``; ``bonus_points`` needs ``points`` (credited to the loyalty ledger when the
    offer is redeemed); ``points_multiplier`` needs ``multiplier_percent`` (the points of the
    order that redeems it are multiplied); ``free_shipping`` needs nothing."""

    type: RewardType
    percent: Annotated[int, msgspec.Meta(ge=1, le=100)] | None = None
    amount: Positive | None = None
    currency: Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")] | None = None
    points: Annotated[int, msgspec.Meta(ge=1, le=10**9)] | None = None
    multiplier_percent: Annotated[int, msgspec.Meta(ge=101, le=1000)] | None = None


_REWARD_FIELDS: dict[str, tuple[str, ...]] = {
    "percent_off": ("percent",),
    "amount_off": ("amount", "currency"),
    "free_shipping": (),
    "bonus_points": ("points",),
    "points_multiplier": ("multiplier_percent",),
}


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    #: Offers of this campaign one customer may receive in all (null: no limit).
    per_customer: Positive | None = 1
    #: Days after an offer before the same customer can get another from this campaign.
    cooldown_days: Annotated[int, msgspec.Meta(ge=0, le=3650)] = 0
    #: The global budget: offers issued, offers redeemed, discount given (minor units).
    max_issued: Positive | None = None
    max_redeemed: Positive | None = None
    max_discount: Positive | None = None
    #: Whether this offer can be held next to other campaigns' active offers.
    stackable: bool = False


class Variant(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    name: Name
    weight: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1
    #: This variant's reward; the campaign's when left out.
    reward: Reward | None = None


class CodeFormat(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Codes are ``prefix`` + ``length`` characters from an alphabet without look-alikes
    (no 0/O, 1/I/L), drawn by a CSPRNG: unguessable, and unique in the shop."""

    prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Z0-9-]{0,12}$")] = ""
    length: Annotated[int, msgspec.Meta(ge=8, le=32)] = 10


class CampaignSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    status: Status = "draft"
    #: Higher goes first when several campaigns are eligible.
    priority: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] = 0
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    targeting: Targeting = msgspec.field(default_factory=Targeting)
    #: Null: only on request (``POST /v1/customers/{id}/offers/trigger``).
    trigger: Trigger | None = None
    reward: Reward
    limits: Limits = msgspec.field(default_factory=Limits)
    #: Share of targeted customers kept as a control group: they get nothing but are tracked.
    holdout_percent: Annotated[int, msgspec.Meta(ge=0, le=90)] = 0
    variants: Annotated[list[Variant], msgspec.Meta(max_length=10)] = msgspec.field(
        default_factory=list
    )
    code: CodeFormat = msgspec.field(default_factory=CodeFormat)
    #: How long an issued offer can be redeemed.
    offer_valid_days: Annotated[int, msgspec.Meta(ge=1, le=365)] = 14


class CampaignPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Any of the campaign's fields; those left out keep their value."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | msgspec.UnsetType = (
        msgspec.UNSET
    )
    status: Status | msgspec.UnsetType = msgspec.UNSET
    priority: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] | msgspec.UnsetType = msgspec.UNSET
    starts_at: datetime | msgspec.UnsetType | None = msgspec.UNSET
    ends_at: datetime | msgspec.UnsetType | None = msgspec.UNSET
    targeting: Targeting | msgspec.UnsetType = msgspec.UNSET
    trigger: Trigger | msgspec.UnsetType | None = msgspec.UNSET
    reward: Reward | msgspec.UnsetType = msgspec.UNSET
    limits: Limits | msgspec.UnsetType = msgspec.UNSET
    holdout_percent: Annotated[int, msgspec.Meta(ge=0, le=90)] | msgspec.UnsetType = msgspec.UNSET
    variants: Annotated[list[Variant], msgspec.Meta(max_length=10)] | msgspec.UnsetType = (
        msgspec.UNSET
    )
    code: CodeFormat | msgspec.UnsetType = msgspec.UNSET
    offer_valid_days: Annotated[int, msgspec.Meta(ge=1, le=365)] | msgspec.UnsetType = msgspec.UNSET


class CampaignCounts(msgspec.Struct, frozen=True, kw_only=True):
    issued: int
    redeemed: int
    #: Discount given by redeemed offers, in minor units.
    discount: int


class Campaign(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["campaign"] = "campaign"
    id: str
    spec: CampaignSpec
    counts: CampaignCounts
    created_at: datetime
    updated_at: datetime
    created_by: str


# --- validation ---------------------------------------------------------------------------------


def parse_spec(body: bytes) -> CampaignSpec:
    spec = decode_json(body, CampaignSpec)
    _check(spec)
    return spec


def parse_patch(body: bytes) -> CampaignPatch:
    return decode_json(body, CampaignPatch)


def patched(spec: CampaignSpec, patch: CampaignPatch) -> CampaignSpec:
    """``spec`` with the patch's fields, validated as a whole."""
    changes = {
        name: getattr(patch, name)
        for name in patch.__struct_fields__
        if getattr(patch, name) is not msgspec.UNSET
    }
    if changes.get("status", spec.status) not in TRANSITIONS[spec.status]:
        move = f"a campaign cannot go from {spec.status} to {changes['status']}"
        raise invalid([FieldError("$.status", move)])
    merged = msgspec.structs.replace(spec, **changes)
    _check(merged)
    return merged


def _type_errors(path: str, names: list[str]) -> list[FieldError]:
    """``path[i]`` for each name that is neither a standard nor an ``x_`` touchpoint type."""
    return [
        FieldError(f"{path}[{i}]", f"{name!r} is not a touchpoint type")
        for i, name in enumerate(names)
        if name not in STANDARD_TYPES and not CUSTOM_TYPE.fullmatch(name)
    ]


def _reward_errors(reward: Reward, path: str) -> list[FieldError]:
    needed = _REWARD_FIELDS[reward.type]
    errors = [
        FieldError(f"{path}.{name}", f"required for {reward.type}")
        for name in needed
        if getattr(reward, name) is None
    ]
    errors += [
        FieldError(f"{path}.{name}", f"not used by {reward.type}")
        for name in ("percent", "amount", "currency", "points", "multiplier_percent")
        if name not in needed and getattr(reward, name) is not None
    ]
    return errors


def _check(spec: CampaignSpec) -> None:
    errors = _reward_errors(spec.reward, "$.reward")
    for index, variant in enumerate(spec.variants):
        if variant.reward is not None:
            errors += _reward_errors(variant.reward, f"$.variants[{index}].reward")
    names = [v.name for v in spec.variants]
    errors += [
        FieldError(f"$.variants[{i}].name", f"{n!r} is used twice")
        for i, n in enumerate(names)
        if names.index(n) != i
    ]
    if spec.starts_at and spec.ends_at and spec.ends_at <= spec.starts_at:
        errors.append(FieldError("$.ends_at", "must be later than starts_at"))
    for name in ("starts_at", "ends_at"):
        value = getattr(spec, name)
        if value is not None and value.tzinfo is None:
            errors.append(FieldError(f"$.{name}", "must include a time zone offset"))
    if spec.trigger is not None:
        event = spec.trigger.event
        if event not in STANDARD_TYPES and not CUSTOM_TYPE.fullmatch(event):
            errors.append(FieldError("$.trigger.event", f"{event!r} is not a touchpoint type"))
        errors += _type_errors("$.trigger.cancel_on", spec.trigger.cancel_on)
    recent = spec.targeting.recent_touchpoints
    if recent is not None:
        errors += _type_errors("$.targeting.recent_touchpoints.types", recent.types)
    for name in ("points", "orders"):
        bounds = getattr(spec.targeting, name)
        if (
            bounds
            and None not in (bounds.at_least, bounds.at_most)
            and (bounds.at_least > bounds.at_most)
        ):
            errors.append(
                FieldError(f"$.targeting.{name}.at_most", "must not be less than at_least")
            )
    if errors:
        raise invalid(errors)


def invalid(errors: list[FieldError]) -> Problem:
    return Problem("validation", f"{len(errors)} field(s) failed validation.", errors=errors)


# --- storage ------------------------------------------------------------------------------------

_COLUMNS = (
    "id, name, status, priority, starts_at, ends_at, definition, issued_count, redeemed_count,"
    " discount_total, created_at, updated_at, created_by"
)


def _definition(spec: CampaignSpec) -> dict[str, Any]:
    """What the ``definition`` column holds: the spec without its own columns."""
    data: dict[str, Any] = msgspec.to_builtins(spec)
    for column in ("name", "status", "priority", "starts_at", "ends_at"):
        data.pop(column, None)
    return data


def campaign_of(row: asyncpg.Record) -> Campaign:
    spec = msgspec.convert(
        {
            **row["definition"],
            "name": row["name"],
            "status": row["status"],
            "priority": row["priority"],
            "starts_at": row["starts_at"],
            "ends_at": row["ends_at"],
        },
        CampaignSpec,
    )
    return Campaign(
        id=row["id"],
        spec=spec,
        counts=CampaignCounts(
            issued=row["issued_count"],
            redeemed=row["redeemed_count"],
            discount=row["discount_total"],
        ),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        created_by=row["created_by"],
    )


async def create(conn: TenantConn, spec: CampaignSpec, actor: str) -> Campaign:
    row = await conn.fetchrow(
        f"INSERT INTO campaigns (id, name, status, priority, starts_at, ends_at, definition,"
        f" created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {_COLUMNS}",
        "cmp_" + secrets.token_hex(10),
        spec.name,
        spec.status,
        spec.priority,
        spec.starts_at,
        spec.ends_at,
        _definition(spec),
        actor,
    )
    assert row is not None
    return campaign_of(row)


async def get(conn: TenantConn, campaign_id: str, *, lock: bool = False) -> Campaign:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM campaigns WHERE id = $1{' FOR UPDATE' if lock else ''}",
        campaign_id,
    )
    if row is None:
        raise Problem("not-found", f"No campaign {campaign_id}.")
    return campaign_of(row)


async def update(conn: TenantConn, campaign_id: str, patch: CampaignPatch) -> Campaign:
    current = await get(conn, campaign_id, lock=True)
    spec = patched(current.spec, patch)
    row = await conn.fetchrow(
        f"UPDATE campaigns SET name = $2, status = $3, priority = $4, starts_at = $5,"
        f" ends_at = $6, definition = $7, updated_at = now() WHERE id = $1 RETURNING {_COLUMNS}",
        campaign_id,
        spec.name,
        spec.status,
        spec.priority,
        spec.starts_at,
        spec.ends_at,
        _definition(spec),
    )
    assert row is not None
    return campaign_of(row)


async def list_campaigns(
    conn: TenantConn, *, status: Status | None, limit: int, starting_after: str | None
) -> Page[Campaign]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM campaigns WHERE ($1::text IS NULL OR status = $1)"
        " AND ($2::text IS NULL OR (created_at, id) < (SELECT created_at, id FROM campaigns"
        " WHERE id = $2)) ORDER BY created_at DESC, id DESC LIMIT $3",
        status,
        starting_after,
        limit + 1,
    )
    return page_of([campaign_of(row) for row in rows], limit)


_active_cache: dict[str, tuple[float, list[Campaign]]] = {}


async def active_campaigns(conn: TenantConn, schema: str) -> list[Campaign]:
    """The shop's active campaigns, highest priority first, cached briefly per worker (a write
    in the same worker takes effect at once). Budgets are checked on the row, never here."""
    cached = _active_cache.get(schema)
    if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
        return cached[1]
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM campaigns WHERE status = 'active' ORDER BY priority DESC, id"
    )
    found = [campaign_of(row) for row in rows]
    _active_cache[schema] = (time.monotonic(), found)
    return found


def forget_campaigns(schema: str) -> None:
    _active_cache.pop(schema, None)
