"""The filters every analytics endpoint takes: a period and the customers' acquisition channel.

- ``from`` (inclusive) and ``to`` (exclusive) are RFC 3339 date-times with an offset. ``to``
  defaults to now and ``from`` to 90 days before ``to``; ``to`` must be later than ``from``, and
  the period is at most 366 days long. Errors are 422s naming ``query.from`` or ``query.to``.
- ``channel`` keeps only customers *acquired* on that channel: the channel of their first
  touchpoint (earliest ``occurred_at``, then the earliest stored). It is a property of the
  customer, so every endpoint filters the same people the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec
from litestar.params import Parameter, QueryParameter

from api.db import TenantConn
from api.errors import FieldError, Problem
from api.touchpoints.schemas import Channel

DEFAULT_DAYS = 90
MAX_DAYS = 366

_DATE_TIME: dict[str, Any] = {"format": "date-time"}

# ``from`` is a Python keyword, so the handler's argument is ``from_``. Both bounds arrive as text
# and are parsed here, so an error names the query parameter as the client spelled it.
From = Annotated[
    str | None,
    QueryParameter(
        name="from",
        description=(
            "Start of the period, inclusive: an RFC 3339 date-time with an offset "
            "(`2025-05-01T00:00:00Z`; send `+` as `%2B`). Default: 90 days before `to`."
        ),
        schema_extra=_DATE_TIME,
    ),
]
To = Annotated[
    str | None,
    Parameter(
        description=(
            "End of the period, exclusive: an RFC 3339 date-time with an offset, later than "
            f"`from` and at most {MAX_DAYS} days after it. Default: now."
        ),
        schema_extra=_DATE_TIME,
    ),
]
AcquisitionChannel = Annotated[
    Channel | None,
    Parameter(
        description=(
            "Only customers acquired on this channel: the channel of their first touchpoint."
        )
    ),
]


@dataclass(frozen=True)
class Filters:
    start: datetime
    end: datetime
    channel: Channel | None


def filters(
    from_: str | None, to: str | None, channel: Channel | None, *, now: datetime | None = None
) -> Filters:
    """The period and channel a request asks for, or a 422 naming each bad parameter."""
    errors: list[FieldError] = []
    start = _moment(from_, "from", errors)
    end = _moment(to, "to", errors)
    if not errors:
        end = end or (now or datetime.now(UTC))
        start = start or end - timedelta(days=DEFAULT_DAYS)
        if end <= start:
            errors.append(FieldError("query.to", "must be later than from"))
        elif end - start > timedelta(days=MAX_DAYS):
            errors.append(FieldError("query.from", f"must be at most {MAX_DAYS} days before to"))
    if errors or start is None or end is None:
        raise Problem(
            "validation", f"{len(errors)} field(s) failed validation.", errors=errors or None
        )
    return Filters(start.astimezone(UTC), end.astimezone(UTC), channel)


def _moment(value: str | None, name: str, errors: list[FieldError]) -> datetime | None:
    if value is None:
        return None
    try:
        moment = msgspec.convert(value, datetime)
    except msgspec.ValidationError:
        errors.append(FieldError(f"query.{name}", "must be an RFC 3339 date-time"))
        return None
    if moment.tzinfo is None:
        errors.append(FieldError(f"query.{name}", "must include a time zone offset (e.g. Z)"))
        return None
    return moment


#: Memory for each sort and hash of an analytics statement (the server default, 4 MB, sends the
#: window sorts of a large shop to disk). Set for the analytics transaction only.
WORK_MEM = "32MB"


async def analytics_session(conn: TenantConn) -> None:
    """Prepare the tenant transaction for one analytics statement: more memory for its sorts."""
    await conn.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")


def acquisition_channel_sql(customer_ref: str) -> str:
    """The channel of the first touchpoint of the profile ``customer_ref`` (an SQL expression):
    one backward step of the ``touchpoints_timeline`` index."""
    return (
        "(SELECT a.channel FROM touchpoints AS a WHERE a.customer_ref = "
        f"{customer_ref} ORDER BY a.occurred_at, a.id LIMIT 1)"
    )
