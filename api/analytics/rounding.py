"""Rounding, done once at the end: SQL sums exact shares, these turn them into published numbers."""

from __future__ import annotations

from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal

_FOUR_PLACES = Decimal("0.0001")


def ratio(part: int, whole: int) -> float | None:
    """``part / whole`` rounded half up to 4 decimals; null when ``whole`` is 0."""
    if whole == 0:
        return None
    return float((Decimal(part) / Decimal(whole)).quantize(_FOUR_PLACES, ROUND_HALF_UP))


def four_places(value: Decimal | float) -> float:
    return float(Decimal(str(value)).quantize(_FOUR_PLACES, ROUND_HALF_UP))


def whole(value: float | None) -> int | None:
    """A float rounded half up to an integer (``None`` stays ``None``)."""
    if value is None:
        return None
    return int(Decimal(str(value)).quantize(Decimal(1), ROUND_HALF_UP))


def apportion(shares: dict[str, Decimal], total: int) -> dict[str, int]:
    """Whole units for fractional ``shares`` that add up to exactly ``total`` (largest remainder):
    each share is rounded down, then the units left over go one each to the shares with the
    largest fractional parts (ties: by key)."""
    floors = {key: int(share.to_integral_value(ROUND_FLOOR)) for key, share in shares.items()}
    left = total - sum(floors.values())
    if left >= 0:
        order = sorted(shares, key=lambda key: (floors[key] - shares[key], key))
        for key in order[:left]:
            floors[key] += 1
    else:  # only if the shares were computed a hair above their sum: take back the smallest
        order = sorted(shares, key=lambda key: (shares[key] - floors[key], key))
        for key in order[:-left]:
            floors[key] -= 1
    return floors
