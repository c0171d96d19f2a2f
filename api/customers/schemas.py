"""What the customer endpoints accept and return (msgspec, snake_case, RFC 3339 in UTC)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

#: The journey stages of ``DOMAIN.md``, in order, then the two drift states of the cycle.
Stage = Literal[
    "awareness",
    "consideration",
    "acquisition",
    "service",
    "loyalty",
    "advocacy",
    "at_risk",
    "lapsed",
]


#: The RFM segments of ``DOMAIN.md``, best first (see ``api.journey.rfm`` for how R and F map).
RfmSegment = Literal[
    "champions",
    "loyal",
    "potential_loyalists",
    "new",
    "promising",
    "need_attention",
    "at_risk",
    "hibernating",
    "lost",
]


class CustomerRfm(msgspec.Struct, frozen=True, kw_only=True):
    """The customer's RFM scores, 1 to 5 by quintile within the shop (5 the best: most recent
    purchase, most orders and highest spend in the shop's window), and the segment they make."""

    recency: int
    frequency: int
    monetary: int
    segment: RfmSegment
    #: The shop's latest computation, which these scores are current as of.
    computed_at: datetime
    #: The computation that last changed these scores (a computation writes only changes).
    changed_at: datetime


class CustomerIds(msgspec.Struct, frozen=True, kw_only=True):
    """Every id that leads to this profile, oldest first."""

    customer_ids: list[str]
    anonymous_ids: list[str]


class Customer(msgspec.Struct, frozen=True, kw_only=True):
    """One person as the shop knows them: traits, what they did, and every id they go by."""

    customer_id: str
    object: Literal["customer"] = "customer"
    email: str | None
    name: str | None
    traits: dict[str, Any]
    first_seen_at: datetime | None
    last_seen_at: datetime | None
    touchpoint_count: int
    counts_by_type: dict[str, int]
    counts_by_channel: dict[str, int]
    #: The channels with at least one touchpoint, sorted.
    channels: list[str]
    order_count: int
    #: Revenue per ISO 4217 currency, in minor units: ``{"EUR": 12950}``.
    revenue: dict[str, int]
    last_purchase_at: datetime | None
    ids: CustomerIds
    #: The customer's journey stage, or a drift state (``at_risk``, ``lapsed``).
    stage: Stage | None = None
    #: RFM scores and segment; ``null`` until a computation has scored the customer (only
    #: customers with a purchase are scored).
    rfm: CustomerRfm | None = None
    created_at: datetime
    updated_at: datetime


class TraitsUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``set`` overwrites traits; ``set_once`` only fills traits the profile does not have yet.

    Keys match ``^[a-z][a-z0-9_]{0,63}$``; values are JSON scalars or objects; at most 100
    traits and 16 KB of JSON per request; a key may not be in both maps. The ``email`` and
    ``name`` traits (strings or null) also update the profile's ``email`` and ``name``.
    """

    set_: dict[str, Any] | None = msgspec.field(default=None, name="set")
    set_once: dict[str, Any] | None = None


class TimelineTouchpoint(msgspec.Struct, frozen=True, kw_only=True):
    """One touchpoint on a customer's timeline. ``id`` is the client's ``event_id``."""

    id: str
    object: Literal["touchpoint"] = "touchpoint"
    type: str
    channel: str
    occurred_at: datetime
    received_at: datetime
    sent_at: datetime | None
    customer_id: str | None
    anonymous_id: str | None
    email: str | None
    #: ``{order_id, amount, currency, …order details}``, or ``null`` without an order.
    order: dict[str, Any] | None
    properties: dict[str, Any]
    context: dict[str, Any]
