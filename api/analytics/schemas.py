"""What the analytics endpoints answer (msgspec, snake_case, RFC 3339 in UTC).

Each answer repeats the filters it was computed for: ``from`` and ``to`` as applied (defaults
filled in) and ``channel`` (null: every channel).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from api.customers.schemas import Stage
from api.journey.history import Cause
from api.touchpoints.schemas import Channel

# --- funnel -------------------------------------------------------------------------------------


class FunnelStep(msgspec.Struct, frozen=True, kw_only=True):
    """From one stage to the next, among the customers of the group."""

    from_stage: Stage
    to_stage: Stage
    #: Customers who reached ``from_stage``, and of those, ``to_stage``.
    reached_from: int
    reached_to: int
    #: ``reached_to / reached_from``, rounded half up to 4 decimals; null when no one reached
    #: ``from_stage``.
    conversion_rate: float | None
    #: Median and 75th percentile (interpolated) of the time from reaching ``from_stage`` to
    #: reaching ``to_stage``, in seconds rounded half up; null when no one converted.
    median_seconds: int | None
    p75_seconds: int | None


class FunnelGroup(msgspec.Struct, frozen=True, kw_only=True):
    #: The customers' acquisition channel; null for the group of all customers.
    acquisition_channel: Channel | None
    #: Customers in the group (all of whom reached awareness).
    customers: int
    #: Customers who reached each of the six stages, in stage order.
    reached: dict[str, int]
    #: The five steps between consecutive stages, in stage order.
    steps: list[FunnelStep]


class Funnel(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["analytics_funnel"] = "analytics_funnel"
    from_: datetime = msgspec.field(name="from")
    to: datetime
    channel: Channel | None
    total: FunnelGroup
    #: One group per acquisition channel with customers, most customers first (then by name).
    by_channel: list[FunnelGroup]


# --- paths --------------------------------------------------------------------------------------


class Bucket(msgspec.Struct, frozen=True, kw_only=True):
    #: The bucket holds values from ``min`` to ``max`` inclusive; ``max`` null: no upper bound.
    min: int
    max: int | None
    customers: int


class Distribution(msgspec.Struct, frozen=True, kw_only=True):
    #: The median over the customers (interpolated); null when there are none.
    median: float | None
    #: Every bucket, in order, empty ones included.
    buckets: list[Bucket]


class ChannelSequence(msgspec.Struct, frozen=True, kw_only=True):
    #: Channels oldest first; empty for customers who bought at their first contact.
    channels: list[Channel]
    customers: int


class Paths(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["analytics_paths"] = "analytics_paths"
    from_: datetime = msgspec.field(name="from")
    to: datetime
    channel: Channel | None
    #: Customers whose first purchase falls in the period.
    customers: int
    #: Touchpoints that occurred before the first purchase.
    touchpoints_before_purchase: Distribution
    #: Whole days (24 hours) from first seen to the first purchase.
    days_to_purchase: Distribution
    #: The most common channel sequences before the first purchase, most customers first.
    top_sequences: list[ChannelSequence]


# --- attribution --------------------------------------------------------------------------------

Model = Literal["first_touch", "last_touch", "linear", "position_based"]
MODELS: tuple[Model, ...] = ("first_touch", "last_touch", "linear", "position_based")


class Credit(msgspec.Struct, frozen=True, kw_only=True):
    #: Purchases credited (fractions summed, rounded half up to 4 decimals).
    purchases: float
    #: Revenue credited per ISO 4217 currency, in minor units (see the endpoint for rounding).
    revenue: dict[str, int]


class ChannelAttribution(msgspec.Struct, frozen=True, kw_only=True):
    channel: Channel
    first_touch: Credit
    last_touch: Credit
    linear: Credit
    position_based: Credit


class CampaignAttribution(msgspec.Struct, frozen=True, kw_only=True):
    #: The touchpoint's ``context.utm_campaign``; ``(none)`` when it has none.
    utm_campaign: str
    first_touch: Credit
    last_touch: Credit
    linear: Credit
    position_based: Credit


class Attribution(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["analytics_attribution"] = "analytics_attribution"
    from_: datetime = msgspec.field(name="from")
    to: datetime
    channel: Channel | None
    lookback_days: int
    #: Purchases that occurred in the period.
    purchases: int
    #: Of those, purchases with no touchpoint in the look-back window (credited to themselves).
    purchases_without_prior_touch: int
    #: Their revenue per currency, in minor units: what each model's rows add up to.
    revenue: dict[str, int]
    #: Sorted by channel name.
    by_channel: list[ChannelAttribution]
    #: Sorted by campaign name.
    by_utm_campaign: list[CampaignAttribution]


# --- stage flow ---------------------------------------------------------------------------------


class StageFlowLink(msgspec.Struct, frozen=True, kw_only=True):
    from_stage: Stage
    to_stage: Stage
    transitions: int
    #: Distinct customers who made this move.
    customers: int


class StageFlow(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["analytics_stage_flow"] = "analytics_stage_flow"
    from_: datetime = msgspec.field(name="from")
    to: datetime
    channel: Channel | None
    cause: Cause | None
    #: All transitions in the period, and the distinct customers who made them.
    transitions: int
    customers: int
    #: One link per (from_stage, to_stage) pair that occurred, in stage order.
    links: list[StageFlowLink]
