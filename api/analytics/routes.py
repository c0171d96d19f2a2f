"""``/v1/analytics``: journey analytics over the shop's own data (``analytics:read``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from inspect import cleandoc
from typing import Annotated, Any, TypeVar

from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.handlers import HTTPRouteHandler
from litestar.params import Parameter

from api.analytics import attribution as attribution_queries
from api.analytics import flow, funnel, paths
from api.analytics.attribution import DEFAULT_LOOKBACK_DAYS, MAX_LOOKBACK_DAYS
from api.analytics.filters import AcquisitionChannel, From, To, analytics_session, filters
from api.analytics.paths import DEFAULT_TOP, MAX_TOP
from api.analytics.schemas import Attribution, Funnel, Paths, StageFlow
from api.auth.guards import principal_of
from api.db import TenantConn, in_tenant
from api.errors import problem_responses
from api.journey.history import Cause

READ = {"scopes": ("analytics:read",)}
T = TypeVar("T")

# Per handler: a controller's ``responses`` attribute does not reach the spec.
_PROBLEMS = problem_responses(401, 403, 422, 429)


FILTERS = (
    "Filters: the period runs from `from` (inclusive) to `to` (exclusive), RFC 3339 with an"
    " offset, by default the 90 days up to now and at most 366 days; `channel` keeps only"
    " customers acquired on that channel (the channel of their first touchpoint). Profiles"
    " merged into another are not counted apart: their history is the survivor's."
)


def _described(controller: type[Controller]) -> type[Controller]:
    """Each operation's OpenAPI description: its docstring, then the filters all of them share."""
    for value in vars(controller).values():
        if isinstance(value, HTTPRouteHandler) and value.description is None and value.fn.__doc__:
            value.description = f"{cleandoc(value.fn.__doc__)}\n\n{FILTERS}"
    return controller


async def _answer(
    request: Request[Any, Any, Any],
    state: State,
    fetch: Callable[[TenantConn], Awaitable[T]],
) -> T:
    """Run one analytics query in the caller's shop, in a transaction tuned for it."""

    async def work(conn: TenantConn) -> T:
        await analytics_session(conn)
        return await fetch(conn)

    return await in_tenant(state.db, principal_of(request).tenant, work)


@_described
class AnalyticsController(Controller):
    path = "/v1/analytics"
    tags = ["analytics"]

    @get(
        "/funnel",
        operation_id="getFunnelAnalytics",
        summary="Journey funnel",
        opt=READ,
        responses=_PROBLEMS,
    )
    async def get_funnel(
        self,
        state: State,
        request: Request[Any, Any, Any],
        from_: From = None,
        to: To = None,
        channel: AcquisitionChannel = None,
    ) -> Funnel:
        """How far the customers *first seen* in the period got through the six stages, and how
        fast, for all of them (`total`) and per acquisition channel (`by_channel`).

        `reached` counts the customers who reached each stage: the furthest stage a customer
        ever reached (`reached_stage`, or a later stage a transition once took them to, so a
        manual move back does not undo it) counts for that stage and every stage before it, so
        the counts never rise along the funnel. Each of the five `steps` between consecutive
        stages gives `conversion_rate` = `reached_to` / `reached_from` (4 decimals, null when
        `reached_from` is 0) and the median and 75th percentile (interpolated) of the time from
        reaching the one stage to reaching the next, in whole seconds, over the customers who
        reached the next. Awareness is reached when first seen; any other stage at the earliest
        transition into it or a later stage, so a stage a customer skipped takes 0 seconds.
        Conversions count whenever they happened, also after `to`."""
        query = filters(from_, to, channel)

        return await _answer(request, state, lambda conn: funnel.funnel(conn, query))

    @get(
        "/paths",
        operation_id="getPathAnalytics",
        summary="Paths to the first purchase",
        opt=READ,
        responses=_PROBLEMS,
    )
    async def get_paths(
        self,
        state: State,
        request: Request[Any, Any, Any],
        from_: From = None,
        to: To = None,
        channel: AcquisitionChannel = None,
        limit: Annotated[
            int,
            Parameter(
                description=f"How many channel sequences to return (1 to {MAX_TOP}).",
                ge=1,
                le=MAX_TOP,
            ),
        ] = DEFAULT_TOP,
    ) -> Paths:
        """What led to a first purchase, for the customers whose first purchase (earliest
        `purchase` touchpoint) occurred in the period.

        `touchpoints_before_purchase`: how many touchpoints of any type occurred strictly
        before the first purchase. `days_to_purchase`: whole days (24 hours, rounded down) from
        first seen to the first purchase. Each gives the median and every bucket, empty ones
        included (touchpoints 0, 1, 2, 3, 4, 5-9, 10-19, 20+; days 0, 1-6, 7-13, 14-29, 30-59,
        60-89, 90-179, 180+). `top_sequences`: the most common channel sequences before the
        first purchase, most customers first, then by the sequence; a sequence lists the
        channels of those touchpoints oldest first, consecutive repeats collapsed into one,
        keeping the last 5 (nearest the purchase); it is empty for customers who
        bought at their first contact."""
        query = filters(from_, to, channel)

        return await _answer(request, state, lambda conn: paths.paths(conn, query, top=limit))

    @get(
        "/attribution",
        operation_id="getAttributionAnalytics",
        summary="Purchase attribution",
        opt=READ,
        responses=_PROBLEMS,
    )
    async def get_attribution(
        self,
        state: State,
        request: Request[Any, Any, Any],
        from_: From = None,
        to: To = None,
        channel: AcquisitionChannel = None,
        lookback_days: Annotated[
            int,
            Parameter(
                description=(
                    "How many days before a purchase a touchpoint may occur to share in its "
                    f"credit (1 to {MAX_LOOKBACK_DAYS})."
                ),
                ge=1,
                le=MAX_LOOKBACK_DAYS,
            ),
        ] = DEFAULT_LOOKBACK_DAYS,
    ) -> Attribution:
        """The purchases that occurred in the period (`purchase` touchpoints) and their revenue,
        credited to channels (`by_channel`) and UTM campaigns (`by_utm_campaign`, from the
        touchpoint's `context.utm_campaign`; none or empty: `(none)`) under four models.

        A purchase's touches are the same customer's touchpoints that occurred in the
        `lookback_days` before it (strictly before it), purchases and refunds excluded, in time
        order. With n touches, `first_touch` credits the first with the whole purchase,
        `last_touch` the last, `linear` each with 1/n, and `position_based` the first and the
        last with 40% each and those between with 20% split evenly (one touch: 100%; two: 50%
        each). A purchase without touches is credited in every model wholly to its own channel
        and campaign, and counted in `purchases_without_prior_touch`.

        Revenue is in minor units per currency. Shares are summed exactly and rounded once, at
        the end: per model and currency, each row's revenue is rounded down and the units left
        over go one each to the rows with the largest remainders (ties: by name), so each
        model's rows add up exactly to `revenue`. Purchase credits are rounded half up to 4
        decimals."""
        query = filters(from_, to, channel)

        return await _answer(
            request,
            state,
            lambda conn: attribution_queries.attribution(conn, query, lookback_days=lookback_days),
        )

    @get(
        "/stages/flow",
        operation_id="getStageFlowAnalytics",
        summary="Flow between stages",
        opt=READ,
        responses=_PROBLEMS,
    )
    async def get_stage_flow(
        self,
        state: State,
        request: Request[Any, Any, Any],
        from_: From = None,
        to: To = None,
        channel: AcquisitionChannel = None,
        cause: Annotated[
            Cause | None,
            Parameter(description="Only transitions with this cause."),
        ] = None,
    ) -> StageFlow:
        """The data of a Sankey diagram: the stage transitions that occurred in the period,
        grouped by `from_stage` and `to_stage` (drift states and manual moves back included),
        each with how many transitions and distinct customers; in stage order. `transitions`
        and `customers` are the totals."""
        query = filters(from_, to, channel)

        return await _answer(request, state, lambda conn: flow.stage_flow(conn, query, cause=cause))


analytics_routes: list[type[Controller]] = [AnalyticsController]
