"""A shop's loyalty programme: what earns points, when they become spendable and expire, the
tiers, and what a refund takes back.

The programme is configuration, stored as versions (``loyalty_programs``; the highest is in
force). A shop that never saved one has none: nothing is earned until it does.
"""

from __future__ import annotations

import calendar
import time
import zoneinfo
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from typing import Annotated, Literal

import msgspec

from api.db import TenantConn
from api.errors import FieldError, Problem, decode_json
from api.touchpoints.schemas import CUSTOM_TYPE, STANDARD_TYPES

Points = Annotated[int, msgspec.Meta(ge=0, le=10**9)]
PositiveCount = Annotated[int, msgspec.Meta(ge=1, le=10**9)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=40, pattern=r"^[a-z][a-z0-9_]*$")]
RefundPolicy = Literal["pending_only", "within_balance", "allow_negative"]
#: Types that earn through the spend rule, never as an action.
ORDER_TYPES = frozenset({"purchase", "refund"})
MAX_PROGRAM_BYTES = 32 * 1024
#: How long a worker keeps a shop's programme before reading it again (a PUT in the same worker
#: takes effect at once).
PROGRAM_TTL_SECONDS = 5.0


class SpendRule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``points`` for every ``per_minor_units`` of eligible spend: 1 per 100 is one point per
    euro. Orders in another currency than ``currency`` earn nothing from spend."""

    currency: Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")] = "EUR"
    points: Points = 1
    per_minor_units: PositiveCount = 100
    #: How a fraction of a point is settled: ``floor`` (the default) drops it.
    rounding: Literal["floor", "half_up", "ceil"] = "floor"
    #: Shipping costs earn nothing.
    exclude_shipping: bool = True
    #: Order items marked ``excluded`` (gift cards, for example) earn nothing.
    exclude_marked_items: bool = True


class Caps(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The most points one customer can earn per calendar day, month and year (in the
    programme's time zone); ``null`` is no cap."""

    per_day: Points | None = None
    per_month: Points | None = None
    per_year: Points | None = None


class Expiry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Points expire at the end of the day ``months`` after they were earned (in the programme's
    time zone), or at the end of that month with ``end_of_month``; ``months: null`` is never.
    31 January + 1 month is the end of 28 (or 29) February."""

    months: Annotated[int, msgspec.Meta(ge=1, le=120)] | None = 12
    end_of_month: bool = False
    #: How long before expiry a ``loyalty.points_expiring`` event is written, once per lot.
    notify_days_before: Annotated[int, msgspec.Meta(ge=1, le=365)] = 30


class Tier(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    name: Name
    #: Points earned (or minor units spent) in the window that reach this tier.
    threshold: Points
    #: Earned points are multiplied by this percentage (150: half as many again).
    multiplier_percent: Annotated[int, msgspec.Meta(ge=100, le=1000)] = 100


class Tiers(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Tiers from lowest to highest. A customer moves up as soon as they qualify, and down only
    when their tier is reviewed (``review_after_days`` after reaching or last confirming it)."""

    levels: Annotated[list[Tier], msgspec.Meta(max_length=10)] = msgspec.field(default_factory=list)
    #: ``points_earned``: points earned minus reversed; ``spend``: purchases minus refunds in
    #: the spend currency, in minor units.
    basis: Literal["points_earned", "spend"] = "points_earned"
    window_days: Annotated[int, msgspec.Meta(ge=1, le=3660)] = 365
    review_after_days: Annotated[int, msgspec.Meta(ge=1, le=3660)] = 365
    #: ``one_step``: a review lowers by one tier at most; ``to_qualified``: to the tier earned.
    downgrade: Literal["one_step", "to_qualified"] = "one_step"


class Program(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    enabled: bool = True
    #: The IANA time zone in which days, months and expiry are counted.
    time_zone: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "UTC"
    spend: SpendRule = msgspec.field(default_factory=SpendRule)
    #: Fixed points per touchpoint type: ``{"review_written": 50, "account_created": 100}``.
    #: Any standard type but purchase and refund, or a custom ``x_`` type.
    actions: dict[str, Points] = msgspec.field(default_factory=dict)
    #: Days after a purchase before its points become spendable (the return window); action
    #: points are spendable at once.
    pending_days: Annotated[int, msgspec.Meta(ge=0, le=365)] = 14
    expiry: Expiry = msgspec.field(default_factory=Expiry)
    tiers: Tiers = msgspec.field(default_factory=Tiers)
    caps: Caps = msgspec.field(default_factory=Caps)
    #: What a refund of an order whose points are spent takes back: only the order's points
    #: still pending, as much as the balance allows, or everything (the balance may go negative
    #: and later points pay it off first).
    refund_policy: RefundPolicy = "within_balance"


#: What a shop without a saved programme reports: nothing is earned.
NO_PROGRAM = Program(enabled=False)


class LoyaltyConfig(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["loyalty_program"] = "loyalty_program"
    #: 0 while the shop never saved a programme (and ``program.enabled`` is false).
    version: int
    program: Program
    created_at: datetime | None
    created_by: str | None


def parse_program(body: bytes) -> Program:
    """A programme from JSON, or a 422 naming every failing path."""
    program = decode_json(body, Program)
    errors = program_errors(program)
    if errors:
        raise _invalid(errors)
    return program


def program_errors(program: Program) -> list[FieldError]:
    """What the types cannot say: a known time zone, earning types, tiers in order."""
    errors: list[FieldError] = []
    try:
        zoneinfo.ZoneInfo(program.time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        errors.append(FieldError("$.time_zone", "not an IANA time zone (e.g. Europe/Amsterdam)"))
    for kind in program.actions:
        if kind in ORDER_TYPES:
            errors.append(
                FieldError(f"$.actions.{kind}", "purchases earn through `spend`, not actions")
            )
        elif kind not in STANDARD_TYPES and not CUSTOM_TYPE.fullmatch(kind):
            errors.append(FieldError(f"$.actions.{kind}", "not a touchpoint type"))
    levels = program.tiers.levels
    names = [tier.name for tier in levels]
    for index, tier in enumerate(levels):
        path = f"$.tiers.levels[{index}]"
        if names.index(tier.name) != index:
            errors.append(FieldError(f"{path}.name", f"{tier.name!r} is used twice"))
        if index > 0 and tier.threshold <= levels[index - 1].threshold:
            errors.append(FieldError(f"{path}.threshold", "must be higher than the tier before it"))
    return errors


def _invalid(errors: list[FieldError]) -> Problem:
    return Problem("validation", f"{len(errors)} field(s) failed validation.", errors=errors)


_cache: dict[str, tuple[float, Program]] = {}


async def current_program(conn: TenantConn, schema: str) -> Program:
    """The programme in force (:data:`NO_PROGRAM` when none), cached briefly per worker."""
    cached = _cache.get(schema)
    if cached is not None and time.monotonic() - cached[0] < PROGRAM_TTL_SECONDS:
        return cached[1]
    stored = await conn.fetchval(
        "SELECT config FROM loyalty_programs ORDER BY version DESC LIMIT 1"
    )
    program = NO_PROGRAM if stored is None else msgspec.convert(stored, Program)
    _cache[schema] = (time.monotonic(), program)
    return program


def forget_program(schema: str) -> None:
    _cache.pop(schema, None)


async def get_config(conn: TenantConn) -> LoyaltyConfig:
    row = await conn.fetchrow(
        "SELECT version, config, created_at, created_by FROM loyalty_programs"
        " ORDER BY version DESC LIMIT 1"
    )
    if row is None:
        return LoyaltyConfig(version=0, program=NO_PROGRAM, created_at=None, created_by=None)
    return LoyaltyConfig(
        version=row["version"],
        program=msgspec.convert(row["config"], Program),
        created_at=row["created_at"],
        created_by=row["created_by"],
    )


async def save_program(conn: TenantConn, program: Program, created_by: str) -> LoyaltyConfig:
    """Store ``program`` as the next version, in force at once for new earnings."""
    # Writers queue so two saves cannot both take max + 1; readers are not blocked.
    await conn.execute("LOCK TABLE loyalty_programs IN EXCLUSIVE MODE")
    row = await conn.fetchrow(
        "INSERT INTO loyalty_programs (version, config, created_by)"
        " SELECT coalesce(max(version), 0) + 1, $1, $2 FROM loyalty_programs"
        " RETURNING version, created_at",
        msgspec.to_builtins(program),
        created_by,
    )
    assert row is not None
    return LoyaltyConfig(
        version=row["version"],
        program=program,
        created_at=row["created_at"],
        created_by=created_by,
    )


# --- time in the programme's zone ---------------------------------------------------------------


def zone(program: Program) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(program.time_zone)


def add_months(day: date, months: int) -> date:
    """The same day ``months`` later, or the month's last day when it is shorter (31 January
    + 1 month is 28 or 29 February)."""
    month_index = day.month - 1 + months
    year, month = day.year + month_index // 12, month_index % 12 + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def expires_at(program: Program, earned_at: datetime) -> datetime | None:
    """The first instant at which points earned at ``earned_at`` are expired: the midnight
    after their last valid day, in the programme's zone."""
    months = program.expiry.months
    if months is None:
        return None
    tz = zone(program)
    last_day = add_months(earned_at.astimezone(tz).date(), months)
    if program.expiry.end_of_month:
        last_day = last_day.replace(day=calendar.monthrange(last_day.year, last_day.month)[1])
    return datetime.combine(last_day + timedelta(days=1), dt_time(), tzinfo=tz).astimezone(UTC)


def period_starts(program: Program, now: datetime) -> tuple[datetime, datetime, datetime]:
    """The start of the current day, month and year in the programme's zone (for caps)."""
    local = now.astimezone(zone(program))
    day = datetime.combine(local.date(), dt_time(), tzinfo=local.tzinfo)
    return (
        day.astimezone(UTC),
        day.replace(day=1).astimezone(UTC),
        day.replace(month=1, day=1).astimezone(UTC),
    )
