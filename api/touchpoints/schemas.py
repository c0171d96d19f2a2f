"""What a touchpoint looks like on the wire, and the rules a single one must obey."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

STANDARD_TYPES = frozenset(
    {
        "page_view",
        "product_view",
        "search",
        "add_to_cart",
        "cart_abandoned",
        "checkout_started",
        "purchase",
        "refund",
        "email_open",
        "email_click",
        "newsletter_signup",
        "account_created",
        "store_visit",
        "service_contact",
        "review_written",
        "referral_made",
        "social_share",
        "birthday",
    }
)
CUSTOM_TYPE = re.compile(r"^x_[a-z0-9_]{1,60}$")
Channel = Literal[
    "web",
    "mobile_app",
    "email",
    "sms",
    "social",
    "ads",
    "store",
    "phone",
    "chat",
    "marketplace",
    "referral",
    "other",
]
#: Ids that trackers send when they have none; storing them would merge strangers.
PLACEHOLDER_IDS = frozenset(
    {
        "",
        "null",
        "none",
        "nil",
        "undefined",
        "0",
        "-1",
        "anonymous",
        "unknown",
        "guest",
        "nan",
        "n/a",
        "na",
        "[object object]",
        "false",
        "true",
        "user",
        "test",
    }
)

MAX_BATCH_ITEMS = 1000
MAX_BATCH_BYTES = 1024 * 1024
MAX_ITEM_BYTES = 32 * 1024
MAX_PROPERTY_DEPTH = 5
MAX_PROPERTY_KEYS = 200

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
LongText = Annotated[str, msgspec.Meta(max_length=2048)]
MinorUnits = Annotated[int, msgspec.Meta(ge=0, le=10**13)]
Currency = Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")]


class OrderItem(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    product_id: Text
    quantity: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1
    #: Price of one unit, in minor units of the order's currency.
    unit_price: MinorUnits = 0
    name: Annotated[str, msgspec.Meta(max_length=255)] | None = None
    category: Annotated[str, msgspec.Meta(max_length=255)] | None = None
    #: Left out of loyalty earning (gift cards, for example).
    excluded: bool = False


class Order(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    order_id: Text
    #: The order's total in minor units (cents): 12950 is EUR 129.50.
    amount: MinorUnits
    currency: Currency
    shipping: MinorUnits = 0
    items: Annotated[list[OrderItem], msgspec.Meta(max_length=500)] = msgspec.field(
        default_factory=list
    )
    coupon_codes: Annotated[list[Text], msgspec.Meta(max_length=50)] = msgspec.field(
        default_factory=list
    )


class Context(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    page_url: LongText | None = None
    referrer: LongText | None = None
    utm_campaign: Annotated[str, msgspec.Meta(max_length=255)] | None = None
    utm_source: Annotated[str, msgspec.Meta(max_length=255)] | None = None
    utm_medium: Annotated[str, msgspec.Meta(max_length=255)] | None = None
    user_agent: Annotated[str, msgspec.Meta(max_length=1024)] | None = None
    store_id: Annotated[str, msgspec.Meta(max_length=255)] | None = None


class TouchpointIn(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One contact with a (possibly anonymous) person. ``id`` is yours: resending is harmless."""

    id: Text
    type: Annotated[str, msgspec.Meta(min_length=1, max_length=62)]
    channel: Channel
    occurred_at: datetime
    customer_id: Text | None = None
    anonymous_id: Text | None = None
    sent_at: datetime | None = None
    email: Annotated[str, msgspec.Meta(max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")] | None = None
    order: Order | None = None
    properties: dict[str, Any] = msgspec.field(default_factory=dict)
    context: Context | None = None


class ItemError(msgspec.Struct, frozen=True):
    path: str
    message: str


def rule_violations(item: TouchpointIn) -> list[ItemError]:
    """What msgspec's types cannot say: cross-field rules, placeholders, property bounds."""
    errors: list[ItemError] = []
    if item.type not in STANDARD_TYPES and not CUSTOM_TYPE.fullmatch(item.type):
        errors.append(
            ItemError(
                "$.type",
                "not a standard type; custom types start with x_ (lowercase, digits, _)",
            )
        )
    if item.customer_id is None and item.anonymous_id is None:
        errors.append(ItemError("$", "customer_id or anonymous_id is required"))
    for field_name in ("customer_id", "anonymous_id"):
        value = getattr(item, field_name)
        if value is not None and is_placeholder(value):
            errors.append(ItemError(f"$.{field_name}", f"{value!r} is a placeholder, not an id"))
    for field_name in ("occurred_at", "sent_at"):
        value = getattr(item, field_name)
        if value is not None and value.tzinfo is None:
            errors.append(ItemError(f"$.{field_name}", "must include a time zone offset"))
    if item.type in ("purchase", "refund") and item.order is None:
        errors.append(ItemError("$.order", f"a {item.type} needs an order"))
    errors.extend(property_violations(item.properties))
    return errors


def is_placeholder(value: str) -> bool:
    return value.strip().lower() in PLACEHOLDER_IDS


def property_violations(properties: dict[str, Any]) -> list[ItemError]:
    keys = 0
    stack: list[tuple[Any, str, int]] = [(properties, "$.properties", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_PROPERTY_DEPTH:
                return [ItemError(path, f"nested deeper than {MAX_PROPERTY_DEPTH} levels")]
            keys += len(value)
            stack.extend((v, f"{path}.{k}", depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            if depth > MAX_PROPERTY_DEPTH:
                return [ItemError(path, f"nested deeper than {MAX_PROPERTY_DEPTH} levels")]
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
        if keys > MAX_PROPERTY_KEYS:
            return [ItemError("$.properties", f"more than {MAX_PROPERTY_KEYS} keys in all")]
    return []


ItemStatus = Literal["accepted", "duplicate", "rejected"]


class ItemResult(msgspec.Struct, omit_defaults=True):
    index: int
    status: ItemStatus
    id: str | None = None
    errors: list[ItemError] | None = None


class BatchResult(msgspec.Struct):
    object: Literal["touchpoint_batch"]
    accepted: int
    duplicate: int
    rejected: int
    results: list[ItemResult]


class SingleResult(msgspec.Struct, omit_defaults=True):
    object: Literal["touchpoint"]
    id: str
    status: Literal["accepted", "duplicate"]
    received_at: datetime
    occurred_at: datetime
