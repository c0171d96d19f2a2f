"""The scopes a credential can carry, and what each route needs."""

from __future__ import annotations

SCOPES: dict[str, str] = {
    "touchpoints:write": "Record touchpoints",
    "customers:read": "Read customer profiles, timelines and identities",
    "customers:write": "Change, identify, merge and erase customers",
    "loyalty:read": "Read points balances and ledger entries",
    "loyalty:write": "Earn, adjust and redeem points",
    "offers:read": "Read campaigns and issued offers",
    "offers:write": "Change campaigns, trigger and redeem offers",
    "analytics:read": "Read journey and programme analytics",
    "config:write": "Change journey and loyalty configuration",
    "webhooks:write": "Manage webhook endpoints",
    "keys:write": "Manage API keys and OAuth clients",
    "billing:read": "Read plan, usage and invoices",
    "billing:write": "Change plan and billing details",
}
ALL_SCOPES = frozenset(SCOPES)
#: A publishable key lives in browsers: it may only record touchpoints.
PUBLISHABLE_SCOPES = frozenset({"touchpoints:write"})


class UnknownScope(ValueError):
    pass


def parse_scopes(value: str | list[str] | tuple[str, ...]) -> frozenset[str]:
    """Scopes from a space-separated string (OAuth) or a list (JSON); unknown ones are refused."""
    items = value.split() if isinstance(value, str) else list(value)
    unknown = sorted(set(items) - ALL_SCOPES)
    if unknown:
        raise UnknownScope(f"unknown scope(s): {', '.join(unknown)}")
    return frozenset(items)


def scope_string(scopes: frozenset[str] | list[str] | tuple[str, ...]) -> str:
    return " ".join(sorted(scopes))
