"""Billing over HTTP: ``GET /v1/billing``, ``POST /v1/billing/checkout``,
``POST /v1/billing/portal`` and Stripe's ``POST /billing/stripe/webhook``."""

from __future__ import annotations

import hashlib
import logging
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
import stripe
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody

from api.auth.guards import principal_of
from api.billing.accounts import (
    SUBSCRIBED,
    Account,
    Entitlements,
    audit,
    entitlement_of,
    load_account,
    lock_account,
)
from api.billing.inbox import decode_event, store_event
from api.billing.plans import PaidPlanId, Plan, RateLimitView
from api.billing.stripe_client import (
    StripeFailure,
    StripeGateway,
    StripeIdempotencyConflict,
    StripeUnavailable,
    gateway_for,
)
from api.billing.usage import period_bounds, period_start, used
from api.db import Database, TenantConn, in_tenant
from api.errors import Problem, problem_responses
from api.idempotency import REUSED, idempotency_key
from api.touchpoints.routes import read_body

log = logging.getLogger("sjaak.billing")

READ = {"scopes": ("billing:read",)}
WRITE = {"scopes": ("billing:write",)}
MAX_EVENT_BYTES = 512 * 1024
Url = Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s]+$", max_length=2048)]


class PlanView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    touchpoints_per_month: int
    rate_limit: RateLimitView
    #: ``null``: no limit.
    campaigns: int | None
    webhook_endpoints: int | None
    #: What happens above the quota: ``refused`` (429, Free) or ``billed`` (overage).
    over_quota: Literal["refused", "billed"]
    #: Whether the plan can be bought here (its Stripe prices are configured).
    purchasable: bool
    trial_days: int


class SubscriptionView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    #: Stripe's status: ``trialing``, ``active``, ``past_due``, ``unpaid``, ``canceled`` …
    status: str | None
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at_period_end: bool
    trial_end: datetime | None


class UsageView(msgspec.Struct, frozen=True, kw_only=True):
    period_start: datetime
    period_end: datetime
    touchpoints: int
    quota: int
    #: Of the quota, in percent (may pass 100 on a paid plan).
    percent: float
    #: Touchpoints above the quota this month (billed on paid plans, refused on Free).
    overage: int
    #: Overage reported to Stripe so far this month.
    overage_reported: int


class Billing(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["billing"] = "billing"
    plan: PlanView
    #: ``free``, ``trialing``, ``active``, ``past_due`` (in the grace period), ``restricted``
    #: (ingest answers 402) or ``canceled`` (Free limits apply).
    status: str
    status_reason: str | None
    grace_until: datetime | None
    subscription: SubscriptionView | None
    usage: UsageView
    plans: list[PlanView]


class CheckoutIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    plan: PaidPlanId
    #: Where Checkout sends the customer after paying (default: the configured return URL).
    success_url: Url | None = None
    cancel_url: Url | None = None


class PortalIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    return_url: Url | None = None


class BillingRedirect(msgspec.Struct, frozen=True, kw_only=True):
    """Send the customer to ``url`` (Stripe's hosted page)."""

    object: Literal["checkout_session", "billing_portal_session"]
    id: str
    url: str
    plan: str | None = None


class Received(msgspec.Struct, frozen=True):
    received: bool
    #: This event was stored before (Stripe delivered it again).
    duplicate: bool


def _plan_view(plan: Plan) -> PlanView:
    return PlanView(
        id=plan.id,
        name=plan.name,
        touchpoints_per_month=plan.touchpoints_per_month,
        rate_limit=plan.rate_limit,
        campaigns=plan.campaigns,
        webhook_endpoints=plan.webhook_endpoints,
        over_quota="refused" if plan.hard_quota else "billed",
        purchasable=plan.price_id is not None,
        trial_days=plan.trial_days,
    )


@get(
    "/v1/billing",
    opt=READ,
    tags=["billing"],
    operation_id="getBilling",
    summary="Plan, status, period and usage",
    responses=problem_responses(401, 403, 429),
)
async def get_billing(request: Request[Any, Any, Any], state: State) -> Billing:
    """The shop's plan and its limits, the subscription's status (with why, when it is past due
    or restricted) and period, and this month's accepted touchpoints against the quota."""
    tenant = principal_of(request).tenant
    now = datetime.now(UTC)
    entitlements: Entitlements = state.entitlements
    db: Database = state.db
    async with db.control() as conn:
        account = await load_account(conn, tenant.id)
        period = period_start(now)
        reported = await conn.fetchval(
            "SELECT coalesce(sum(value), 0)::bigint FROM sjaak.meter_events"
            " WHERE tenant_id = $1 AND period_start = $2 AND status = 'sent'",
            tenant.id,
            period,
        )

    async def read(conn: TenantConn) -> int:
        return await used(conn, period)

    count = await in_tenant(db, tenant, read)
    entitlement = entitlement_of(account, entitlements.plans, now)
    plan = entitlement.plan
    start, end = period_bounds(period)
    quota = plan.touchpoints_per_month
    return Billing(
        plan=_plan_view(plan),
        status=entitlement.status,
        status_reason=entitlement.reason,
        grace_until=account.grace_until if entitlement.status == "past_due" else None,
        subscription=_subscription_view(account),
        usage=UsageView(
            period_start=start,
            period_end=end,
            touchpoints=count,
            quota=quota,
            percent=round(100 * count / quota, 2) if quota else 100.0,
            overage=max(0, count - quota),
            overage_reported=int(reported),
        ),
        plans=[_plan_view(p) for p in entitlements.plans.plans.values()],
    )


def _subscription_view(account: Account) -> SubscriptionView | None:
    if account.subscription_id is None:
        return None
    return SubscriptionView(
        id=account.subscription_id,
        status=account.subscription_status,
        current_period_start=account.current_period_start,
        current_period_end=account.current_period_end,
        cancel_at_period_end=account.cancel_at_period_end,
        trial_end=account.trial_end,
    )


def _gateway(state: State) -> StripeGateway:
    gateway = gateway_for(state.settings)
    if gateway is None:
        raise Problem(
            "unavailable",
            "Billing is not set up on this server (no Stripe key is configured).",
        )
    return gateway


def _stripe_problem(exc: StripeFailure) -> Problem:
    if isinstance(exc, StripeIdempotencyConflict):
        return Problem(
            REUSED,
            "This Idempotency-Key was already used for a different billing request; use a new key.",
        )
    if isinstance(exc, StripeUnavailable):
        return Problem("unavailable", "Stripe cannot be reached right now; retry in a moment.")
    log.error("Stripe rejected a billing request", extra={"error": str(exc), "code": exc.code})
    return Problem(
        "unavailable",
        "Stripe refused the request, which points at this server's billing configuration; the"
        " operator has been told. Retry later.",
    )


async def ensure_customer(db: Database, gateway: StripeGateway, tenant_id: UUID) -> str:
    """The shop's Stripe customer, created on first need (under the account's lock, with an
    idempotency key from the shop's id, so concurrent or retried calls make one)."""
    async with db.control() as conn:
        account = await lock_account(conn, tenant_id)
        if account.stripe_customer_id is not None:
            return account.stripe_customer_id
        name = await conn.fetchval("SELECT name FROM sjaak.tenants WHERE id = $1", tenant_id)
        customer = await gateway.create_customer(tenant_id, str(name))
        await conn.execute(
            "UPDATE sjaak.billing_accounts SET stripe_customer_id = $2, updated_at = now()"
            " WHERE tenant_id = $1",
            tenant_id,
            customer,
        )
        await audit(conn, tenant_id, "billing", "billing.customer_created", {"customer": customer})
    return customer


def _stripe_key(request: Request[Any, Any, Any], kind: str, tenant_id: UUID) -> str:
    """From our ids: the shop and the caller's Idempotency-Key (a retry gets Stripe's first
    answer), or a fresh id when there is none."""
    key = idempotency_key(request)
    suffix = hashlib.sha256(key.encode()).hexdigest()[:40] if key else uuid.uuid4().hex
    return f"sjaak-{kind}-{tenant_id}-{suffix}"


def _return_url(state: State) -> str:
    settings = state.settings
    return str(settings.billing_return_url or f"{settings.token_issuer}/")


def _with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


_redirect = {
    201: ResponseSpec(data_container=BillingRedirect, description="Where to send the customer.")
}


@post(
    "/v1/billing/checkout",
    opt=WRITE,
    tags=["billing"],
    operation_id="createCheckoutSession",
    summary="Subscribe or change plan through Stripe Checkout",
    status_code=201,
    responses={**_redirect, **problem_responses(400, 401, 403, 409, 422, 429, 503)},
)
async def create_checkout(
    request: Request[Any, Any, Any], state: State, data: JSONBody[CheckoutIn]
) -> Response[BillingRedirect]:
    """A Stripe Checkout Session for `plan` (`growth` or `scale`): send the customer to `url`.
    Subscribing to another plan while one is live replaces it once the new one is paid (the
    old one is cancelled, with its overage invoiced). The shop's Stripe customer is created on
    first use. Send an `Idempotency-Key` to get the same session on a retry."""
    tenant_id = principal_of(request).tenant.id
    gateway = _gateway(state)
    entitlements: Entitlements = state.entitlements
    plan = entitlements.plans[data.plan]
    if plan.price_id is None or plan.overage_price_id is None:
        raise Problem(
            "unavailable", f"The {plan.name} plan is not on sale here (no Stripe price is set)."
        )
    stripe_key = _stripe_key(request, "checkout", tenant_id)
    async with state.db.control() as conn:
        account = await load_account(conn, tenant_id)
    if account.status in SUBSCRIBED and account.plan == plan.id:
        raise Problem(
            "conflict",
            f"The shop is already on {plan.name} ({account.status}). Manage or cancel it in the"
            " billing portal (POST /v1/billing/portal).",
        )
    try:
        customer = await ensure_customer(state.db, gateway, tenant_id)
        base = _return_url(state)
        session = await gateway.create_checkout_session(
            customer=customer,
            tenant_id=tenant_id,
            plan_id=plan.id,
            prices=(plan.price_id, plan.overage_price_id),
            success_url=data.success_url or _with_query(base, "checkout=success"),
            cancel_url=data.cancel_url or _with_query(base, "checkout=canceled"),
            trial_days=plan.trial_days if account.subscription_id is None else 0,
            idempotency_key=stripe_key,
        )
    except StripeFailure as exc:
        raise _stripe_problem(exc) from exc
    async with state.db.control() as conn:
        await audit(
            conn,
            tenant_id,
            principal_of(request).credential_id,
            "billing.checkout_started",
            {"plan": plan.id, "session": session.id},
        )
    return Response(
        BillingRedirect(object="checkout_session", id=session.id, url=session.url, plan=plan.id),
        status_code=201,
    )


@post(
    "/v1/billing/portal",
    opt=WRITE,
    tags=["billing"],
    operation_id="createBillingPortalSession",
    summary="Open Stripe's billing portal",
    status_code=201,
    responses={**_redirect, **problem_responses(400, 401, 403, 422, 429, 503)},
)
async def create_portal(
    request: Request[Any, Any, Any], state: State, data: JSONBody[PortalIn | None] = None
) -> Response[BillingRedirect]:
    """A Stripe billing portal session: invoices, payment methods, cancellation. Send the
    customer to `url`; they come back to `return_url`."""
    tenant_id = principal_of(request).tenant.id
    gateway = _gateway(state)
    try:
        customer = await ensure_customer(state.db, gateway, tenant_id)
        session = await gateway.create_portal_session(
            customer=customer,
            return_url=(data.return_url if data else None) or _return_url(state),
            idempotency_key=_stripe_key(request, "portal", tenant_id),
        )
    except StripeFailure as exc:
        raise _stripe_problem(exc) from exc
    return Response(
        BillingRedirect(object="billing_portal_session", id=session.id, url=session.url),
        status_code=201,
    )


@post(
    "/billing/stripe/webhook",
    opt={"public": True},
    tags=["billing"],
    operation_id="receiveStripeEvent",
    summary="Stripe's webhook",
    status_code=200,
    request_max_body_size=MAX_EVENT_BYTES * 2,
    responses=problem_responses(400, 404, 413),
)
async def stripe_webhook(request: Request[Any, Any, Any], state: State) -> Received:
    """For Stripe only: events signed with the endpoint's secret (`Stripe-Signature`). Verified
    on the raw body, stored once and answered at once; the worker applies them."""
    secret = state.settings.stripe_webhook_secret
    if not secret:
        raise Problem("not-found", f"Nothing lives at {request.url.path}.")
    body = await read_body(request, MAX_EVENT_BYTES)
    header = request.headers.get("stripe-signature")
    if not header:
        raise Problem("http-error", "The Stripe-Signature header is missing.")
    try:
        # The tolerance must be given: without one the library skips the timestamp check.
        stripe.WebhookSignature.verify_header(
            body, header, secret, tolerance=stripe.Webhook.DEFAULT_TOLERANCE
        )
    except stripe.SignatureVerificationError as exc:
        raise Problem(
            "http-error", f"The Stripe-Signature header does not verify: {exc.user_message}."
        ) from exc
    except UnicodeDecodeError as exc:
        raise Problem("malformed-body", "The body is not UTF-8.") from exc
    try:
        event, payload = decode_event(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Problem("malformed-body", f"The body is not a Stripe event: {exc}") from exc
    stored = await store_event(state.db, event, payload)
    return Received(received=True, duplicate=not stored)


billing_routes = [get_billing, create_checkout, create_portal, stripe_webhook]
