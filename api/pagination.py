"""Cursor pagination, as everywhere in the API: `limit` and `starting_after`, newest first."""

from __future__ import annotations

from typing import Annotated, Generic, TypeVar

import msgspec
from litestar.params import Parameter

T = TypeVar("T")

DEFAULT_LIMIT = 20
MAX_LIMIT = 100

Limit = Annotated[
    int,
    Parameter(
        ge=1,
        le=MAX_LIMIT,
        description=f"How many items to return (1 to {MAX_LIMIT}).",
    ),
]
StartingAfter = Annotated[
    str | None,
    Parameter(
        description="An object id from the previous page: return the items after it.",
        max_length=100,
    ),
]


class Page(msgspec.Struct, Generic[T]):
    data: list[T]
    has_more: bool


def page_of(items: list[T], limit: int) -> Page[T]:
    """Queries fetch ``limit + 1`` rows; the extra row only says whether there is more."""
    return Page(data=items[:limit], has_more=len(items) > limit)
