"""Shop schema names: made by the server, checked everywhere they enter SQL."""

from __future__ import annotations

import re
import secrets
import string

CONTROL_SCHEMA = "sjaak"
SHOP_SCHEMA_PATTERN = re.compile(r"^shop_[a-z0-9]{6,40}$")
_ALPHABET = string.ascii_lowercase + string.digits


class InvalidSchemaName(ValueError):
    """A schema name that did not come from :func:`new_shop_schema_name`."""


def new_shop_schema_name() -> str:
    """A fresh ``shop_<12 random chars>`` name (about 62 bits of randomness)."""
    return "shop_" + "".join(secrets.choice(_ALPHABET) for _ in range(12))


def checked_shop_schema(name: str) -> str:
    """Return ``name`` if it is a valid shop schema name; the only gate into SQL text."""
    if not SHOP_SCHEMA_PATTERN.fullmatch(name):
        raise InvalidSchemaName(f"not a shop schema name: {name!r}")
    return name
