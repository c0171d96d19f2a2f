"""Loyalty over HTTP: the programme (``/v1/config/loyalty``), a customer's points
(``/v1/customers/{customer_id}/loyalty…``) and the programme's figures
(``/v1/analytics/loyalty``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Controller, Request, Response, get, post, put
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, Parameter

from api.analytics.filters import From, To, filters
from api.auth.guards import principal_of
from api.customers.profiles import customer_ref_or_404
from api.db import TenantConn, in_tenant
from api.errors import FieldError, Problem, problem_responses
from api.idempotency import idempotent_json
from api.loyalty import accounts, program
from api.loyalty.accounts import (
    AdjustmentIn,
    LoyaltyAccount,
    LoyaltyTransaction,
    Redemption,
    RedemptionIn,
)
from api.loyalty.analytics import LoyaltyFigures, loyalty_figures
from api.loyalty.program import MAX_PROGRAM_BYTES, LoyaltyConfig, Program
from api.pagination import DEFAULT_LIMIT, Limit, Page
from api.touchpoints.routes import read_body

T = TypeVar("T")
READ = {"scopes": ("loyalty:read",)}
WRITE = {"scopes": ("loyalty:write",)}
CUSTOMER_PATH = "/v1/customers/{customer_id:str}/loyalty"
CONFIG_PATH = "/v1/config/loyalty"
_encode = msgspec.json.Encoder().encode

EntryCursor = Annotated[
    int | None,
    Parameter(description="A transaction `id` from the previous page: return older ones.", ge=1),
]


async def _for_customer(
    request: Request[Any, Any, Any],
    state: State,
    customer_id: str,
    work: Callable[[TenantConn, int, Program], Awaitable[T]],
) -> T:
    """Run ``work`` in the shop's transaction with the customer's profile and the programme."""
    tenant = principal_of(request).tenant

    async def run(conn: TenantConn) -> T:
        ref = await customer_ref_or_404(conn, customer_id)
        return await work(conn, ref, await program.current_program(conn, tenant.schema))

    return await in_tenant(state.db, tenant, run)


async def _write_for_customer(
    request: Request[Any, Any, Any],
    state: State,
    customer_id: str,
    route: str,
    status: int,
    work: Callable[[TenantConn, int, Program], Awaitable[msgspec.Struct]],
) -> Response[bytes]:
    """As :func:`_for_customer`, once per ``Idempotency-Key``."""
    principal = principal_of(request)

    async def run(conn: TenantConn) -> tuple[int, bytes]:
        ref = await customer_ref_or_404(conn, customer_id)
        current = await program.current_program(conn, principal.tenant.schema)
        return status, _encode(await work(conn, ref, current))

    return await idempotent_json(
        request, state.db, principal.tenant, route, await request.body(), run
    )


class CustomerLoyaltyController(Controller):
    path = CUSTOMER_PATH
    tags = ["loyalty"]

    @get(
        "/",
        operation_id="getCustomerLoyalty",
        summary="A customer's points and tier",
        opt=READ,
        responses=problem_responses(401, 403, 404, 429),
    )
    async def get_account(
        self, request: Request[Any, Any, Any], state: State, customer_id: FromPath[str]
    ) -> LoyaltyAccount:
        """Available and pending points (with the date each pending amount becomes spendable),
        points expiring within the notice period, lifetime earned, and the tier with progress to
        the next one. Points whose activation or expiry time has passed are settled first, so
        the balance is as of now."""

        async def work(conn: TenantConn, ref: int, current: Program) -> LoyaltyAccount:
            return await accounts.account_view(conn, ref, customer_id, current, datetime.now(UTC))

        return await _for_customer(request, state, customer_id, work)

    @get(
        "/transactions",
        operation_id="listLoyaltyTransactions",
        summary="A customer's points ledger",
        opt=READ,
        responses=problem_responses(401, 403, 404, 422, 429),
    )
    async def list_transactions(
        self,
        request: Request[Any, Any, Any],
        state: State,
        customer_id: FromPath[str],
        limit: Limit = DEFAULT_LIMIT,
        starting_after: EntryCursor = None,
    ) -> Page[LoyaltyTransaction]:
        """Every ledger entry, newest first: `earn`, `activate` (the return window passed),
        `redeem`, `expire`, `reverse` (a refund took points back, or gave back points that
        paid for the order) and `adjust`, each with its effect on each balance, the balances
        after it, the reason and its source."""

        async def work(conn: TenantConn, ref: int, _: Program) -> Page[LoyaltyTransaction]:
            return await accounts.transactions(
                conn, ref, limit=limit, starting_after=starting_after
            )

        return await _for_customer(request, state, customer_id, work)

    @post(
        "/redemptions",
        operation_id="redeemLoyaltyPoints",
        summary="Spend a customer's points",
        opt=WRITE,
        status_code=201,
        responses={
            201: ResponseSpec(
                data_container=Redemption,
                description="The points were spent.",
                generate_examples=False,
            ),
            **problem_responses(401, 403, 404, 409, 422, 429),
        },
    )
    async def redeem(
        self,
        request: Request[Any, Any, Any],
        state: State,
        customer_id: FromPath[str],
        data: JSONBody[RedemptionIn],
    ) -> Response[bytes]:
        """Spend points from the available balance, earliest-expiring points first. A balance
        that does not cover it is a 409 (`insufficient-points`) and nothing is written;
        concurrent redemptions queue on the customer's balance and never overspend. Give the
        order the points paid for as `reference`: a refund of that order gives them back. Send
        an `Idempotency-Key` to retry safely."""
        _not_blank(data.reason)
        actor = principal_of(request).credential_id

        async def work(conn: TenantConn, ref: int, _: Program) -> Redemption:
            return await accounts.redeem(conn, ref, customer_id, data, actor, datetime.now(UTC))

        route = f"POST /v1/customers/{customer_id}/loyalty/redemptions"
        return await _write_for_customer(request, state, customer_id, route, 201, work)

    @post(
        "/adjustments",
        operation_id="adjustLoyaltyPoints",
        summary="Add or remove points by hand",
        opt=WRITE,
        status_code=201,
        responses={
            201: ResponseSpec(
                data_container=LoyaltyTransaction,
                description="The adjustment's ledger entry.",
                generate_examples=False,
            ),
            **problem_responses(401, 403, 404, 409, 422, 429),
        },
    )
    async def adjust(
        self,
        request: Request[Any, Any, Any],
        state: State,
        customer_id: FromPath[str],
        data: JSONBody[AdjustmentIn],
    ) -> Response[bytes]:
        """A signed correction with a reason, recorded with the credential that made it. Added
        points are spendable at once and expire like earned points; removing more than is
        available is a 409. Adjustments do not count as earned (tiers and `lifetime_earned`
        ignore them). Send an `Idempotency-Key` to retry safely."""
        _not_blank(data.reason)
        if data.points == 0:
            raise _invalid("$.points", "must not be 0")
        actor = principal_of(request).credential_id

        async def work(conn: TenantConn, ref: int, current: Program) -> LoyaltyTransaction:
            return await accounts.adjust(conn, ref, current, data, actor, datetime.now(UTC))

        route = f"POST /v1/customers/{customer_id}/loyalty/adjustments"
        return await _write_for_customer(request, state, customer_id, route, 201, work)


def _invalid(path: str, message: str) -> Problem:
    return Problem(
        "validation", "1 field(s) failed validation.", errors=[FieldError(path, message)]
    )


def _not_blank(reason: str) -> None:
    if not reason.strip():
        raise _invalid("$.reason", "must not be blank")


class LoyaltyConfigController(Controller):
    path = CONFIG_PATH
    tags = ["loyalty"]

    @get(
        "/",
        operation_id="getLoyaltyProgram",
        summary="Get the loyalty programme",
        opt=READ,
        responses=problem_responses(401, 403, 429),
    )
    async def get_program(self, state: State, request: Request[Any, Any, Any]) -> LoyaltyConfig:
        """The programme in force. A shop that never saved one has `version` 0 with
        `program.enabled: false`: nothing is earned until a programme is saved."""
        return await in_tenant(state.db, principal_of(request).tenant, program.get_config)

    @put(
        "/",
        operation_id="replaceLoyaltyProgram",
        summary="Replace the loyalty programme",
        opt={"scopes": ("config:write",), "request_body": Program},
        request_max_body_size=MAX_PROGRAM_BYTES * 2,
        responses={
            200: ResponseSpec(
                data_container=LoyaltyConfig,
                description="The programme now in force, as a new version.",
                generate_examples=False,
            ),
            **problem_responses(400, 401, 403, 413, 422, 429),
        },
    )
    async def replace_program(
        self, state: State, request: Request[Any, Any, Any]
    ) -> Response[bytes]:
        """Store a new version of the programme, in force at once for new earnings (points
        already earned keep their activation and expiry dates). Every field is optional and
        has a stated default; each failing field is reported with its JSON path. Send an
        `Idempotency-Key` to retry safely."""
        principal = principal_of(request)
        body = await read_body(request, MAX_PROGRAM_BYTES)
        parsed = program.parse_program(body)

        async def work(conn: TenantConn) -> tuple[int, bytes]:
            return 200, _encode(await program.save_program(conn, parsed, principal.credential_id))

        response = await idempotent_json(
            request, state.db, principal.tenant, f"PUT {CONFIG_PATH}", body, work
        )
        program.forget_program(principal.tenant.schema)
        return response


@get(
    "/v1/analytics/loyalty",
    opt={"scopes": ("analytics:read",)},
    tags=["analytics"],
    operation_id="getLoyaltyAnalytics",
    summary="Points issued, redeemed, expired; liability; tiers",
    responses=problem_responses(401, 403, 422, 429),
)
async def get_loyalty_analytics(
    request: Request[Any, Any, Any], state: State, from_: From = None, to: To = None
) -> LoyaltyFigures:
    """Points issued, redeemed, expired, reversed and adjusted in the period (by the entries'
    business time), and as of now the outstanding liability (available and pending points
    the shop owes) and how many customers hold each tier."""
    period = filters(from_, to, None)

    async def work(conn: TenantConn) -> LoyaltyFigures:
        return await loyalty_figures(conn, period.start, period.end)

    return await in_tenant(state.db, principal_of(request).tenant, work)


loyalty_routes: list[Any] = [
    CustomerLoyaltyController,
    LoyaltyConfigController,
    get_loyalty_analytics,
]
