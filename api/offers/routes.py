"""Offers over HTTP: campaigns (``offers:write`` to change, ``offers:read`` to read), deciding
for a customer, a customer's offers, redeeming a code, and a campaign's results."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, get, patch, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, Parameter

from api.auth.guards import principal_of
from api.billing.limits import ensure_room_in
from api.customers.profiles import customer_ref_or_404
from api.db import TenantConn, in_tenant
from api.errors import problem_responses
from api.idempotency import idempotent_json
from api.offers import campaigns, coupons, decide, triggers
from api.offers.analytics import CampaignResults, campaign_results
from api.offers.campaigns import (
    MAX_CAMPAIGN_BYTES,
    Campaign,
    CampaignPatch,
    CampaignSpec,
    Status,
)
from api.offers.decide import OfferView
from api.offers.triggers import TriggerIn, TriggerResult
from api.pagination import DEFAULT_LIMIT, Limit, Page, StartingAfter
from api.touchpoints.routes import read_body

READ = {"scopes": ("offers:read",)}
WRITE = {"scopes": ("offers:write",)}
_encode = msgspec.json.Encoder().encode


def _created(kind: type[Any], what: str, status: int = 201) -> dict[int, ResponseSpec]:
    return {status: ResponseSpec(data_container=kind, description=what, generate_examples=False)}


class CampaignController(Controller):
    path = "/v1/campaigns"
    tags = ["offers"]

    @post(
        "/",
        operation_id="createCampaign",
        summary="Create a campaign",
        opt={**WRITE, "request_body": CampaignSpec},
        request_max_body_size=MAX_CAMPAIGN_BYTES * 2,
        responses={
            **_created(Campaign, "The campaign."),
            **problem_responses(400, 401, 403, 413, 422, 429),
        },
    )
    async def create_campaign(
        self, request: Request[Any, Any, Any], state: State
    ) -> Response[bytes]:
        """A campaign: targeting, an optional trigger, the reward, limits and budget, holdout
        share, variants and the code format. Every failing field is reported with its JSON path.
        Starts as `draft` unless `status` says `active`. The shop's plan caps how many campaigns
        that have not ended it holds (Free 1, Growth 25, Scale no limit by default;
        `403 plan-limit-reached` beyond). Send an `Idempotency-Key` to retry safely."""
        principal = principal_of(request)
        body = await read_body(request, MAX_CAMPAIGN_BYTES)
        spec = campaigns.parse_spec(body)

        async def work(conn: TenantConn) -> tuple[int, bytes]:
            if spec.status != "ended":
                await ensure_room_in(conn, state, principal.tenant, "campaigns")
            return 201, _encode(await campaigns.create(conn, spec, principal.credential_id))

        response = await idempotent_json(
            request, state.db, principal.tenant, "POST /v1/campaigns", body, work
        )
        campaigns.forget_campaigns(principal.tenant.schema)
        return response

    @get(
        "/",
        operation_id="listCampaigns",
        summary="List campaigns",
        opt=READ,
        responses=problem_responses(401, 403, 422, 429),
    )
    async def list_campaigns(
        self,
        request: Request[Any, Any, Any],
        state: State,
        status: Annotated[Status | None, Parameter(description="Only this status.")] = None,
        limit: Limit = DEFAULT_LIMIT,
        starting_after: StartingAfter = None,
    ) -> Page[Campaign]:
        """Newest first."""

        async def work(conn: TenantConn) -> Page[Campaign]:
            return await campaigns.list_campaigns(
                conn, status=status, limit=limit, starting_after=starting_after
            )

        return await in_tenant(state.db, principal_of(request).tenant, work)

    @get(
        "/{campaign_id:str}",
        operation_id="getCampaign",
        summary="Get a campaign",
        opt=READ,
        responses=problem_responses(401, 403, 404, 429),
    )
    async def get_campaign(
        self, request: Request[Any, Any, Any], state: State, campaign_id: FromPath[str]
    ) -> Campaign:
        """The campaign with its counts: offers issued and redeemed, discount given."""

        async def work(conn: TenantConn) -> Campaign:
            return await campaigns.get(conn, campaign_id)

        return await in_tenant(state.db, principal_of(request).tenant, work)

    @patch(
        "/{campaign_id:str}",
        operation_id="updateCampaign",
        summary="Change a campaign",
        opt={**WRITE, "request_body": CampaignPatch},
        request_max_body_size=MAX_CAMPAIGN_BYTES * 2,
        responses={
            **_created(Campaign, "The campaign as it is now.", 200),
            **problem_responses(400, 401, 403, 404, 413, 422, 429),
        },
    )
    async def update_campaign(
        self, request: Request[Any, Any, Any], state: State, campaign_id: FromPath[str]
    ) -> Response[bytes]:
        """Change any fields; the rest keep their values, and the result is validated as a
        whole. Status moves: draft → active → paused ⇄ active, and any → ended (final).
        Offers already issued keep their reward and expiry. Send an `Idempotency-Key` to retry
        safely."""
        principal = principal_of(request)
        body = await read_body(request, MAX_CAMPAIGN_BYTES)
        changes = campaigns.parse_patch(body)

        async def work(conn: TenantConn) -> tuple[int, bytes]:
            return 200, _encode(await campaigns.update(conn, campaign_id, changes))

        route = f"PATCH /v1/campaigns/{campaign_id}"
        response = await idempotent_json(request, state.db, principal.tenant, route, body, work)
        campaigns.forget_campaigns(principal.tenant.schema)
        return response


class CustomerOffersController(Controller):
    path = "/v1/customers/{customer_id:str}/offers"
    tags = ["offers"]

    @post(
        "/trigger",
        operation_id="triggerOffers",
        summary="Decide and issue offers for a customer",
        opt=WRITE,
        responses={
            **_created(TriggerResult, "What was decided, and the offers issued.", 200),
            **problem_responses(401, 403, 404, 422, 429),
        },
        status_code=200,
    )
    async def trigger_offers(
        self,
        request: Request[Any, Any, Any],
        state: State,
        customer_id: FromPath[str],
        data: JSONBody[TriggerIn],
    ) -> Response[bytes]:
        """Judges every active on-request campaign (those without a trigger) for the customer,
        highest priority first, and issues the winner (with others only when all of them
        stack); customers in a campaign's holdout are recorded and get nothing. Each campaign's
        `decisions` entry says why it fired or not. With `"dry_run": true` nothing is issued
        or consumed. Send an `Idempotency-Key` to retry safely: the same offers come back."""
        principal = principal_of(request)

        async def work(conn: TenantConn) -> tuple[int, bytes]:
            ref = await customer_ref_or_404(conn, customer_id)
            now = datetime.now(UTC)
            result = await triggers.trigger(conn, ref, principal.tenant.schema, data, now)
            return 200, _encode(result)

        route = f"POST /v1/customers/{customer_id}/offers/trigger"
        return await idempotent_json(
            request, state.db, principal.tenant, route, await request.body(), work
        )

    @get(
        "/",
        operation_id="listCustomerOffers",
        summary="A customer's offers",
        opt=READ,
        responses=problem_responses(401, 403, 404, 422, 429),
    )
    async def list_offers(
        self,
        request: Request[Any, Any, Any],
        state: State,
        customer_id: FromPath[str],
        status: Annotated[
            Literal["active", "redeemed", "expired"] | None,
            Parameter(description="Only offers in this state."),
        ] = None,
    ) -> list[OfferView]:
        """Active, redeemed and expired offers, newest first (the latest 500)."""

        async def work(conn: TenantConn) -> list[OfferView]:
            ref = await customer_ref_or_404(conn, customer_id)
            return await decide.customer_offers(conn, ref, datetime.now(UTC), status)

        return await in_tenant(state.db, principal_of(request).tenant, work)


class RedeemIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    #: The customer redeeming: the code must be theirs.
    customer_id: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    order_id: Annotated[str, msgspec.Meta(min_length=1, max_length=255)] | None = None
    #: The order's total and shipping in minor units, to work out the discount.
    amount: Annotated[int, msgspec.Meta(ge=0, le=10**13)] | None = None
    currency: Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")] | None = None
    shipping: Annotated[int, msgspec.Meta(ge=0, le=10**13)] = 0


@post(
    "/v1/offers/{code:str}/redeem",
    opt=WRITE,
    tags=["offers"],
    operation_id="redeemOffer",
    summary="Redeem an offer's code",
    status_code=200,
    responses={
        **_created(OfferView, "The redeemed offer.", 200),
        **problem_responses(401, 403, 404, 409, 422, 429),
    },
)
async def redeem_offer(
    request: Request[Any, Any, Any],
    state: State,
    code: FromPath[str],
    data: JSONBody[RedeemIn],
) -> Response[bytes]:
    """Checks that the code is the customer's, still valid and not used, and that the campaign's
    redemption budget allows it (concurrent redemptions never pass the budget); bonus points go
    to the loyalty ledger. A code of another customer is a 404; a used or expired one a 409.
    Redeeming again with the same `order_id` answers the same; an `Idempotency-Key` makes any
    retry safe. A purchase touchpoint carrying the code in `order.coupon_codes` redeems it too,
    and a refund of that whole order gives it back."""
    principal = principal_of(request)

    async def work(conn: TenantConn) -> tuple[int, bytes]:
        ref = await customer_ref_or_404(conn, data.customer_id)
        order = coupons.OrderFacts(data.order_id, data.amount, data.currency, data.shipping)
        offer = await coupons.redeem(
            conn, code, ref, order, datetime.now(UTC), principal.tenant.schema
        )
        return 200, _encode(offer)

    route = f"POST /v1/offers/{code}/redeem"
    return await idempotent_json(
        request, state.db, principal.tenant, route, await request.body(), work
    )


@get(
    "/v1/analytics/campaigns/{campaign_id:str}",
    opt={"scopes": ("analytics:read",)},
    tags=["analytics"],
    operation_id="getCampaignResults",
    summary="A campaign's results: treatment against holdout",
    responses=problem_responses(401, 403, 404, 422, 429),
)
async def get_campaign_results(
    request: Request[Any, Any, Any],
    state: State,
    campaign_id: FromPath[str],
    window_days: Annotated[
        int,
        Parameter(description="Days after assignment in which a purchase counts.", ge=1, le=365),
    ] = 30,
) -> CampaignResults:
    """For the treatment and the holdout, and per variant: customers, offers issued and
    redeemed, redemption rate, conversion (a purchase within `window_days` of assignment),
    revenue per customer, and the uplift in conversion over the holdout with a 95% confidence
    interval."""

    async def work(conn: TenantConn) -> CampaignResults:
        return await campaign_results(conn, campaign_id, window_days)

    return await in_tenant(state.db, principal_of(request).tenant, work)


offer_routes: list[Any] = [
    CampaignController,
    CustomerOffersController,
    redeem_offer,
    get_campaign_results,
]
