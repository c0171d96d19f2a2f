"""``/v1/customers``: profiles (``customers:read``), trait updates (``customers:write``) and each
customer's timeline (``customers:read``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Request, get, patch
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody, Parameter

from api.auth.guards import principal_of
from api.customers import profiles, timeline, traits
from api.customers.profiles import CustomerFilter
from api.customers.schemas import Customer, Stage, TimelineTouchpoint, TraitsUpdate
from api.customers.timeline import TimelineFilter
from api.db import TenantConn, in_tenant
from api.errors import FieldError, Problem, problem_responses
from api.pagination import DEFAULT_LIMIT, Limit, Page
from api.touchpoints.schemas import Channel

READ = {"scopes": ("customers:read",)}
WRITE = {"scopes": ("customers:write",)}
#: The shop's customer ids (and, as cursors, the clients' event ids) are up to 255 characters.
MAX_ID_LENGTH = 255

CustomerCursor = Annotated[
    str | None,
    Parameter(
        description="A `customer_id` from the previous page: return the customers after it.",
        min_length=1,
        max_length=MAX_ID_LENGTH,
    ),
]
TouchpointCursor = Annotated[
    str | None,
    Parameter(
        description="A touchpoint `id` from the previous page: return the touchpoints after it.",
        min_length=1,
        max_length=MAX_ID_LENGTH,
    ),
]


def _since(what: str) -> Any:
    return Parameter(
        description=f"Only {what} at or after this time (RFC 3339, with an offset).",
    )


def _until(what: str) -> Any:
    return Parameter(
        description=f"Only {what} before this time (RFC 3339, with an offset).",
    )


class CustomerController(Controller):
    path = "/v1/customers"
    tags = ["customers"]

    @get(
        "/",
        operation_id="listCustomers",
        summary="List customers",
        opt=READ,
        responses=problem_responses(422),
    )
    async def list_customers(
        self,
        state: State,
        request: Request[Any, Any, Any],
        limit: Limit = DEFAULT_LIMIT,
        starting_after: CustomerCursor = None,
        q: Annotated[
            str | None,
            Parameter(
                description="A case-insensitive part of the e-mail address or the name.",
                min_length=1,
                max_length=100,
            ),
        ] = None,
        last_seen_after: Annotated[datetime | None, _since("customers last seen")] = None,
        last_seen_before: Annotated[datetime | None, _until("customers last seen")] = None,
        stage: Annotated[
            Stage | None,
            Parameter(
                description=("Only customers currently in this journey stage (or drift state).")
            ),
        ] = None,
    ) -> Page[Customer]:
        """The shop's known customers (those with a `customer_id`), most recently seen first;
        customers never seen come last. Profiles absorbed by a merge are not listed."""
        principal = principal_of(request)
        filters = CustomerFilter(
            last_seen_after=_aware(last_seen_after, "last_seen_after"),
            last_seen_before=_aware(last_seen_before, "last_seen_before"),
            text=q,
            stage=stage,
        )
        _ordered(filters.last_seen_after, filters.last_seen_before, "last_seen")

        async def work(conn: TenantConn) -> Page[Customer]:
            return await profiles.list_customers(
                conn, filters, limit=limit, starting_after=starting_after
            )

        return await in_tenant(state.db, principal.tenant, work)

    @get(
        "/{customer_id:str}",
        operation_id="getCustomer",
        summary="Get a customer",
        opt=READ,
        responses=problem_responses(404),
    )
    async def get_customer(
        self, state: State, request: Request[Any, Any, Any], customer_id: FromPath[str]
    ) -> Customer:
        """The profile of the customer with this `customer_id`: traits, activity, channels and
        every id they go by. A customer merged into another is answered with the survivor."""
        principal = principal_of(request)

        return await in_tenant(
            state.db, principal.tenant, lambda conn: profiles.get_customer(conn, customer_id)
        )

    @patch(
        "/{customer_id:str}",
        operation_id="updateCustomer",
        summary="Update a customer's traits",
        opt=WRITE,
        responses=problem_responses(404, 422),
    )
    async def update_customer(
        self,
        state: State,
        request: Request[Any, Any, Any],
        customer_id: FromPath[str],
        data: JSONBody[TraitsUpdate],
    ) -> Customer:
        """`set` overwrites traits, `set_once` only fills traits the customer does not have yet.
        The `email` and `name` traits also change the profile's e-mail address and name. A trait
        written here is newer than any touchpoint that occurred before this request. An unknown
        customer is a 404: this does not create customers."""
        principal = principal_of(request)
        writes = traits.validated_writes(data)

        return await in_tenant(
            state.db, principal.tenant, lambda conn: traits.update_traits(conn, customer_id, writes)
        )

    @get(
        "/{customer_id:str}/touchpoints",
        operation_id="listCustomerTouchpoints",
        summary="List a customer's touchpoints",
        opt=READ,
        responses=problem_responses(404, 422),
    )
    async def list_touchpoints(
        self,
        state: State,
        request: Request[Any, Any, Any],
        customer_id: FromPath[str],
        limit: Limit = DEFAULT_LIMIT,
        starting_after: TouchpointCursor = None,
        type: Annotated[  # the query parameter's name; the builtin is not needed here
            str | None,
            Parameter(
                description="Only touchpoints of this type.",
                min_length=1,
                max_length=100,
            ),
        ] = None,
        channel: Annotated[
            Channel | None, Parameter(description="Only touchpoints on this channel.")
        ] = None,
        occurred_after: Annotated[datetime | None, _since("touchpoints that occurred")] = None,
        occurred_before: Annotated[datetime | None, _until("touchpoints that occurred")] = None,
    ) -> Page[TimelineTouchpoint]:
        """The customer's timeline: their touchpoints on every channel, newest `occurred_at`
        first, including those from before they were identified."""
        principal = principal_of(request)
        filters = TimelineFilter(
            type=type,
            channel=channel,
            occurred_after=_aware(occurred_after, "occurred_after"),
            occurred_before=_aware(occurred_before, "occurred_before"),
        )
        _ordered(filters.occurred_after, filters.occurred_before, "occurred")

        async def work(conn: TenantConn) -> Page[TimelineTouchpoint]:
            return await timeline.list_timeline(
                conn, customer_id, filters, limit=limit, starting_after=starting_after
            )

        return await in_tenant(state.db, principal.tenant, work)


def _aware(value: datetime | None, name: str) -> datetime | None:
    """RFC 3339 times carry an offset; a naive time would be read in an unknown zone."""
    if value is not None and value.tzinfo is None:
        raise Problem(
            "validation",
            f"{name} has no time zone offset.",
            errors=[FieldError(f"query.{name}", "must include a time zone offset (e.g. Z)")],
        )
    return value


def _ordered(after: datetime | None, before: datetime | None, prefix: str) -> None:
    if after is not None and before is not None and after >= before:
        raise Problem(
            "validation",
            f"{prefix}_before must be later than {prefix}_after.",
            errors=[FieldError(f"query.{prefix}_before", f"must be later than {prefix}_after")],
        )
