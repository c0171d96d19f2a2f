"""The one way to Stripe: a thin async wrapper around the official library.

- The API version is pinned (:data:`API_VERSION`), so Stripe answers in the shapes this code reads
  whatever the account's default version is.
- Every call that creates something carries an idempotency key made from our own ids, so a retry
  after a timeout or a crash finds what the first attempt made instead of making it twice.
- The library's own retries are off: callers retry at their level (the worker with backoff, HTTP
  clients after a 503), so there is one retry policy, not two stacked ones.
- Stripe's errors become two of ours: :class:`StripeUnavailable` (try again later: network, 429,
  409 lock contention, 5xx) and :class:`StripeRejected` (the request itself is wrong).
- Answers become small msgspec Structs holding what Sjaak reads, never library objects.

``SJAAK_STRIPE_API_BASE`` points the library at another address (the tests' local fake).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar, cast
from uuid import UUID

import msgspec
import stripe

if TYPE_CHECKING:
    from api.config import Settings

log = logging.getLogger("sjaak.billing.stripe")

#: The Stripe API version every request asks for (the one stripe-python 16.1 is generated for).
API_VERSION = "2026-10-28.endive"
TIMEOUT_SECONDS = 15.0
T = TypeVar("T")


class StripeFailure(Exception):
    """A Stripe call failed; ``code`` is Stripe's error code when it gave one."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class StripeUnavailable(StripeFailure):
    """Stripe could not be reached or asked us to come back later: retry with backoff."""


class StripeRejected(StripeFailure):
    """Stripe refused the request as sent: retrying the same request will not help."""


class StripeIdempotencyConflict(StripeRejected):
    """The idempotency key was used before with other parameters."""


class Redirect(msgspec.Struct, frozen=True):
    """A Checkout or billing-portal session: where to send the customer."""

    id: str
    url: str


class SubscriptionItem(msgspec.Struct, frozen=True):
    id: str
    price_id: str
    current_period_start: int | None = None
    current_period_end: int | None = None


class Subscription(msgspec.Struct, frozen=True, kw_only=True):
    """A subscription as Stripe has it now (times are Unix seconds)."""

    id: str
    customer: str
    status: str
    created: int
    items: tuple[SubscriptionItem, ...]
    cancel_at_period_end: bool = False
    trial_end: int | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)

    @property
    def price_ids(self) -> tuple[str, ...]:
        return tuple(item.price_id for item in self.items)

    @property
    def current_period(self) -> tuple[int | None, int | None]:
        """Since API version 2025-03-31 the period lives on the items; they share it."""
        for item in self.items:
            if item.current_period_end is not None:
                return item.current_period_start, item.current_period_end
        return None, None


class StripeGateway:
    """The Stripe calls Sjaak makes. One per process and configuration: :func:`gateway_for`."""

    def __init__(self, api_key: str, *, api_base: str | None = None) -> None:
        bases: dict[str, str | None] = {}
        if api_base:
            bases = {"api": api_base.rstrip("/"), "meter_events": api_base.rstrip("/")}
        self._client = stripe.StripeClient(
            api_key,
            stripe_version=API_VERSION,
            base_addresses=cast(Any, bases),
            http_client=stripe.HTTPXClient(timeout=TIMEOUT_SECONDS),
            max_network_retries=0,
        )

    async def create_customer(self, tenant_id: UUID, name: str) -> str:
        """The shop's Stripe customer; the key is the shop's id, so a retry finds the same one."""
        customer = await _call(
            self._client.v1.customers.create_async(
                {"name": name, "metadata": {"tenant_id": str(tenant_id)}},
                {"idempotency_key": f"sjaak-customer-{tenant_id}"},
            )
        )
        return str(customer.id)

    async def create_checkout_session(
        self,
        *,
        customer: str,
        tenant_id: UUID,
        plan_id: str,
        prices: tuple[str, str],
        success_url: str,
        cancel_url: str,
        trial_days: int,
        idempotency_key: str,
    ) -> Redirect:
        """A Checkout Session subscribing ``customer`` to the plan's fee and overage prices."""
        fee, overage = prices
        metadata = {"tenant_id": str(tenant_id), "plan": plan_id}
        subscription_data: dict[str, Any] = {"metadata": metadata}
        if trial_days > 0:
            subscription_data["trial_period_days"] = trial_days
        params: dict[str, Any] = {
            "mode": "subscription",
            "customer": customer,
            "client_reference_id": str(tenant_id),
            "line_items": [{"price": fee, "quantity": 1}, {"price": overage}],
            "success_url": success_url,
            "cancel_url": cancel_url,
            "metadata": metadata,
            "subscription_data": subscription_data,
        }
        session = await _call(
            self._client.v1.checkout.sessions.create_async(
                cast(Any, params), {"idempotency_key": idempotency_key}
            )
        )
        return Redirect(id=str(session.id), url=str(session.url))

    async def create_portal_session(
        self, *, customer: str, return_url: str, idempotency_key: str
    ) -> Redirect:
        session = await _call(
            self._client.v1.billing_portal.sessions.create_async(
                {"customer": customer, "return_url": return_url},
                {"idempotency_key": idempotency_key},
            )
        )
        return Redirect(id=str(session.id), url=str(session.url))

    async def subscription(self, subscription_id: str) -> Subscription | None:
        """The subscription as it is now, or ``None`` when Stripe has no such subscription."""
        try:
            found = await _call(self._client.v1.subscriptions.retrieve_async(subscription_id))
        except StripeRejected as exc:
            if exc.status == 404:
                return None
            raise
        return _subscription(found.to_dict())

    async def subscriptions_of(self, customer: str) -> list[Subscription]:
        """The customer's subscriptions in any status, newest first (at most 100)."""
        page = await _call(
            self._client.v1.subscriptions.list_async(
                {"customer": customer, "status": "all", "limit": 100}
            )
        )
        return [_subscription(item.to_dict()) for item in page.data]

    async def cancel_subscription(self, subscription_id: str) -> None:
        """Cancel at once, invoicing what is owed (the overage so far, prorations). Cancelling a
        subscription that is already canceled is a no-op."""
        try:
            await _call(
                self._client.v1.subscriptions.cancel_async(
                    subscription_id, {"invoice_now": True, "prorate": True}
                )
            )
        except StripeRejected as exc:
            if exc.status == 404 or exc.code == "resource_missing":
                return
            current = await self.subscription(subscription_id)
            if current is None or current.status in ("canceled", "incomplete_expired"):
                return
            raise

    async def send_meter_event(
        self, *, event_name: str, customer: str, value: int, identifier: str, timestamp: int
    ) -> None:
        """One meter event. ``identifier`` is Stripe's dedupe key for the event and also the
        request's idempotency key, so a resend after a lost answer counts once."""
        await _call(
            self._client.v1.billing.meter_events.create_async(
                {
                    "event_name": event_name,
                    "payload": {"stripe_customer_id": customer, "value": str(value)},
                    "identifier": identifier,
                    "timestamp": timestamp,
                },
                {"idempotency_key": identifier},
            )
        )

    async def meter_total(self, meter_id: str, customer: str, start: int, end: int) -> int:
        """What Stripe's meter summed for ``customer`` in ``[start, end)`` (Unix seconds)."""
        page = await _call(
            self._client.v1.billing.meters.event_summaries.list_async(
                meter_id, {"customer": customer, "start_time": start, "end_time": end, "limit": 100}
            )
        )
        return int(sum(float(summary.aggregated_value) for summary in page.data))


async def _call(request: Awaitable[T]) -> T:
    """Await a library call, turning its errors into ours."""
    try:
        return await request
    except stripe.IdempotencyError as exc:
        raise StripeIdempotencyConflict(
            exc.user_message or str(exc), status=exc.http_status, code=exc.code
        ) from exc
    except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
        raise StripeUnavailable(str(exc), status=exc.http_status, code=exc.code) from exc
    except stripe.StripeError as exc:
        status = exc.http_status
        if status is None or status >= 500 or status == 409:
            raise StripeUnavailable(str(exc), status=status, code=exc.code) from exc
        if status in (401, 403):
            log.error("Stripe refused our credentials", extra={"status": status})
        raise StripeRejected(exc.user_message or str(exc), status=status, code=exc.code) from exc


def _subscription(raw: dict[str, Any]) -> Subscription:
    customer = raw.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    items = [
        SubscriptionItem(
            id=str(item["id"]),
            price_id=str(
                item["price"]["id"] if isinstance(item.get("price"), dict) else item["price"]
            ),
            current_period_start=item.get("current_period_start"),
            current_period_end=item.get("current_period_end"),
        )
        for item in (raw.get("items") or {}).get("data", [])
    ]
    return Subscription(
        id=str(raw["id"]),
        customer=str(customer),
        status=str(raw["status"]),
        created=int(raw.get("created") or 0),
        items=tuple(items),
        cancel_at_period_end=bool(raw.get("cancel_at_period_end")),
        trial_end=raw.get("trial_end"),
        metadata={str(k): str(v) for k, v in (raw.get("metadata") or {}).items()},
    )


_gateways: dict[tuple[str, str | None], StripeGateway] = {}


def gateway_for(settings: Settings) -> StripeGateway | None:
    """This process's gateway for the configured account; ``None`` when no key is configured."""
    if not settings.stripe_api_key:
        return None
    key = (settings.stripe_api_key, settings.stripe_api_base)
    gateway = _gateways.get(key)
    if gateway is None:
        gateway = _gateways[key] = StripeGateway(
            settings.stripe_api_key, api_base=settings.stripe_api_base
        )
    return gateway
