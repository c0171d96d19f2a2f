"""``/v1/webhook-endpoints``: a shop's webhook endpoints, what was sent to them, and sending by
hand. Everything needs ``webhooks:write``; every write accepts an ``Idempotency-Key``."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import msgspec
from litestar import Controller, MediaType, Request, Response, delete, get, patch, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody

from api.auth.guards import principal_of
from api.auth.secrets import Keyring
from api.billing.limits import ensure_room_in
from api.config import Settings
from api.db import TenantConn, in_tenant
from api.errors import FieldError, Problem, problem_responses
from api.idempotency import idempotency_key, idempotent_json, replay_headers, run_idempotent
from api.pagination import DEFAULT_LIMIT, Limit, Page, StartingAfter
from api.webhooks import endpoints, history
from api.webhooks.endpoints import (
    NewWebhookEndpoint,
    SecretRotation,
    WebhookEndpoint,
    WebhookEndpointChanges,
    WebhookEndpointWithSecret,
)
from api.webhooks.history import EventFilter, StatusFilter, WebhookDelivery
from api.webhooks.ssrf import UnsafeUrl, checked_target

PATH = "/v1/webhook-endpoints"
NO_STORE = {"Cache-Control": "no-store"}
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
# A stored Idempotency-Key response holds the secret encrypted, never in plain text.
_SEALED = "sealed:"


def _spec(container: Any, description: str) -> ResponseSpec:
    return ResponseSpec(data_container=container, description=description, generate_examples=False)


async def _check_url(request: Request[Any, Any, Any], url: str) -> None:
    """The SSRF guard on a URL being saved: a 422 naming ``$.url`` with the reason."""
    settings: Settings = request.app.state.settings
    try:
        await checked_target(
            url,
            allow_http=settings.environment != "production",
            allow_loopback=settings.webhooks_allow_loopback,
        )
    except UnsafeUrl as exc:
        raise Problem(
            "validation", "1 field(s) failed validation.", errors=[FieldError("$.url", str(exc))]
        ) from exc


def _sealed(keyring: Keyring, endpoint: WebhookEndpointWithSecret) -> bytes:
    body = msgspec.to_builtins(endpoint)
    secret = keyring.encrypt(endpoint.secret.encode())
    body["secret"] = _SEALED + base64.urlsafe_b64encode(secret).decode()
    return _encode(body)


def _revealed(keyring: Keyring, stored: bytes) -> bytes:
    body = _decode(stored)
    sealed = body.get("secret", "")
    if isinstance(sealed, str) and sealed.startswith(_SEALED):
        blob = base64.urlsafe_b64decode(sealed[len(_SEALED) :])
        body["secret"] = keyring.decrypt(blob).decode()
    return _encode(body)


async def _with_secret(
    request: Request[Any, Any, Any],
    state: State,
    route: str,
    status: int,
    body: bytes,
    make: Callable[[TenantConn], Awaitable[WebhookEndpointWithSecret]],
) -> Response[bytes]:
    """Run ``make(conn)`` (which returns an endpoint with its new secret) once per
    ``Idempotency-Key``; a replay shows the same secret, which is stored only encrypted."""
    principal = principal_of(request)
    keyring: Keyring = state.keyring

    async def work(conn: TenantConn) -> tuple[int, bytes]:
        return status, _sealed(keyring, await make(conn))

    stored = await run_idempotent(
        state.db,
        principal.tenant,
        key=idempotency_key(request),
        route=route,
        request_body=body,
        work=work,
    )
    return Response(
        _revealed(keyring, stored.body),
        status_code=stored.status,
        media_type=MediaType.JSON,
        headers={**replay_headers(stored), **NO_STORE},
    )


class WebhookEndpointController(Controller):
    path = PATH
    tags = ["webhooks"]
    opt = {"scopes": ("webhooks:write",)}

    @post(
        "/",
        operation_id="createWebhookEndpoint",
        summary="Create a webhook endpoint",
        status_code=201,
        responses={
            201: _spec(
                WebhookEndpointWithSecret, "The endpoint, with its signing secret (shown once)."
            ),
            **problem_responses(401, 403, 422, 429),
        },
    )
    async def create(
        self, state: State, request: Request[Any, Any, Any], data: JSONBody[NewWebhookEndpoint]
    ) -> Response[bytes]:
        """Events of the subscribed types are POSTed to `url`, signed with the endpoint's
        secret (`whsec_…`), which is in this response only: store it now. The URL must pass
        the SSRF guard (a public host; https in production); a refusal is a 422 naming `$.url`
        with the reason. The shop's plan caps how many endpoints it holds (Free 1, Growth 5,
        Scale 25 by default; `403 plan-limit-reached` beyond). Only events that happen after
        the endpoint is created are sent to it. Send an `Idempotency-Key` to retry
        safely."""
        endpoints.validated_event_types(data.event_types)
        await _check_url(request, data.url)
        keyring: Keyring = state.keyring

        tenant = principal_of(request).tenant

        async def make(conn: TenantConn) -> WebhookEndpointWithSecret:
            await ensure_room_in(conn, state, tenant, "webhook_endpoints")
            return await endpoints.create_endpoint(conn, keyring, data)

        return await _with_secret(request, state, f"POST {PATH}", 201, await request.body(), make)

    @get(
        "/",
        operation_id="listWebhookEndpoints",
        summary="List webhook endpoints",
        responses=problem_responses(401, 403, 422, 429),
    )
    async def list_endpoints(
        self,
        state: State,
        request: Request[Any, Any, Any],
        limit: Limit = DEFAULT_LIMIT,
        starting_after: StartingAfter = None,
    ) -> Page[WebhookEndpoint]:
        """The shop's endpoints, newest first (never their secrets)."""

        async def work(conn: TenantConn) -> Page[WebhookEndpoint]:
            return await endpoints.list_endpoints(conn, limit=limit, starting_after=starting_after)

        return await in_tenant(state.db, principal_of(request).tenant, work)

    @get(
        "/{endpoint_id:str}",
        operation_id="getWebhookEndpoint",
        summary="Get a webhook endpoint",
        responses=problem_responses(401, 403, 404, 429),
    )
    async def get_endpoint(
        self, state: State, request: Request[Any, Any, Any], endpoint_id: FromPath[str]
    ) -> WebhookEndpoint:
        """The endpoint; `disabled_reason` says when Sjaak disabled it for failing."""

        async def work(conn: TenantConn) -> WebhookEndpoint:
            return await endpoints.get_endpoint(conn, endpoint_id)

        return await in_tenant(state.db, principal_of(request).tenant, work)

    @patch(
        "/{endpoint_id:str}",
        operation_id="updateWebhookEndpoint",
        summary="Update a webhook endpoint",
        responses={
            200: _spec(WebhookEndpoint, "The endpoint as changed."),
            **problem_responses(401, 403, 404, 422, 429),
        },
    )
    async def update(
        self,
        state: State,
        request: Request[Any, Any, Any],
        endpoint_id: FromPath[str],
        data: JSONBody[WebhookEndpointChanges],
    ) -> Response[bytes]:
        """Change the URL (checked like a new one), the event types, the description or
        `enabled`. Enabling an endpoint Sjaak disabled clears its failure record; deliveries
        cancelled meanwhile can be sent again with redeliver. Send an `Idempotency-Key` to
        retry safely."""
        principal = principal_of(request)
        if not isinstance(data.event_types, msgspec.UnsetType):
            endpoints.validated_event_types(data.event_types)
        if not isinstance(data.url, msgspec.UnsetType):
            await _check_url(request, data.url)

        async def work(conn: TenantConn) -> tuple[int, bytes]:
            return 200, _encode(await endpoints.update_endpoint(conn, endpoint_id, data))

        route = f"PATCH {PATH}/{endpoint_id}"
        return await idempotent_json(
            request, state.db, principal.tenant, route, await request.body(), work
        )

    @delete(
        "/{endpoint_id:str}",
        operation_id="deleteWebhookEndpoint",
        summary="Delete a webhook endpoint",
        status_code=200,
        responses={
            200: _spec(WebhookEndpoint, "The endpoint as it was."),
            **problem_responses(401, 403, 404, 422, 429),
        },
    )
    async def delete_endpoint(
        self, state: State, request: Request[Any, Any, Any], endpoint_id: FromPath[str]
    ) -> Response[bytes]:
        """The endpoint, its pending deliveries and its delivery log go at once. Send an
        `Idempotency-Key` to retry safely."""
        principal = principal_of(request)

        async def work(conn: TenantConn) -> tuple[int, bytes]:
            return 200, _encode(await endpoints.delete_endpoint(conn, endpoint_id))

        route = f"DELETE {PATH}/{endpoint_id}"
        return await idempotent_json(
            request, state.db, principal.tenant, route, await request.body(), work
        )

    @post(
        "/{endpoint_id:str}/rotate-secret",
        operation_id="rotateWebhookSecret",
        summary="Rotate a webhook endpoint's signing secret",
        status_code=200,
        responses={
            200: _spec(WebhookEndpointWithSecret, "The endpoint with its new secret (shown once)."),
            **problem_responses(401, 403, 404, 422, 429),
        },
    )
    async def rotate_secret(
        self,
        state: State,
        request: Request[Any, Any, Any],
        endpoint_id: FromPath[str],
        data: JSONBody[SecretRotation | None] = None,
    ) -> Response[bytes]:
        """A new signing secret, in this response only. The old one keeps signing for
        `expires_in` seconds (default 24 h, at most 7 days): meanwhile `Sjaak-Signature`
        carries a `v1` for each, so a receiver can switch at its own pace. Send an
        `Idempotency-Key` to retry safely."""
        grace = timedelta(seconds=(data or SecretRotation()).expires_in)
        keyring: Keyring = state.keyring

        async def make(conn: TenantConn) -> WebhookEndpointWithSecret:
            return await endpoints.rotate_secret(conn, keyring, endpoint_id, grace)

        route = f"POST {PATH}/{endpoint_id}/rotate-secret"
        return await _with_secret(request, state, route, 200, await request.body(), make)

    @get(
        "/{endpoint_id:str}/deliveries",
        operation_id="listWebhookDeliveries",
        summary="List an endpoint's deliveries",
        responses=problem_responses(401, 403, 404, 422, 429),
    )
    async def list_deliveries(
        self,
        state: State,
        request: Request[Any, Any, Any],
        endpoint_id: FromPath[str],
        limit: Limit = DEFAULT_LIMIT,
        starting_after: StartingAfter = None,
        status: StatusFilter = None,
        event_id: EventFilter = None,
    ) -> Page[WebhookDelivery]:
        """Every delivery to the endpoint, newest first, each with every attempt: the request
        as sent (headers, including `Sjaak-Signature`, and body), the answer (status and the
        first 2 KiB of its body), how long it took, and the error when there was one.
        Deliveries and their attempts are kept for 30 days."""

        async def work(conn: TenantConn) -> Page[WebhookDelivery]:
            return await history.list_deliveries(
                conn,
                endpoint_id,
                limit=limit,
                starting_after=starting_after,
                status=status,
                event_id=event_id,
            )

        return await in_tenant(state.db, principal_of(request).tenant, work)

    @get(
        "/{endpoint_id:str}/deliveries/{delivery_id:str}",
        operation_id="getWebhookDelivery",
        summary="Get a delivery",
        responses=problem_responses(401, 403, 404, 429),
    )
    async def get_delivery(
        self,
        state: State,
        request: Request[Any, Any, Any],
        endpoint_id: FromPath[str],
        delivery_id: FromPath[str],
    ) -> WebhookDelivery:
        """One delivery with every attempt (poll it after a test or a redelivery)."""

        async def work(conn: TenantConn) -> WebhookDelivery:
            return await history.get_delivery(conn, endpoint_id, delivery_id)

        return await in_tenant(state.db, principal_of(request).tenant, work)

    @post(
        "/{endpoint_id:str}/deliveries/{delivery_id:str}/redeliver",
        operation_id="redeliverWebhook",
        summary="Send a delivery's event again",
        status_code=202,
        responses={
            202: _spec(WebhookDelivery, "The new delivery, queued to be sent now."),
            **problem_responses(401, 403, 404, 422, 429),
        },
    )
    async def redeliver(
        self,
        state: State,
        request: Request[Any, Any, Any],
        endpoint_id: FromPath[str],
        delivery_id: FromPath[str],
    ) -> Response[bytes]:
        """The same event (same `id`, fresh signature) as a new delivery with one attempt,
        sent by the worker at once, whatever became of the original and even while the
        endpoint is disabled. Send an `Idempotency-Key` to retry safely."""
        principal = principal_of(request)

        async def work(conn: TenantConn) -> tuple[int, bytes]:
            delivery = await history.redeliver(conn, principal.tenant, endpoint_id, delivery_id)
            return 202, _encode(delivery)

        route = f"POST {PATH}/{endpoint_id}/deliveries/{delivery_id}/redeliver"
        return await idempotent_json(
            request, state.db, principal.tenant, route, await request.body(), work
        )

    @post(
        "/{endpoint_id:str}/test",
        operation_id="testWebhookEndpoint",
        summary="Send a test event",
        status_code=202,
        responses={
            202: _spec(WebhookDelivery, "The test delivery, queued to be sent now."),
            **problem_responses(401, 403, 404, 422, 429),
        },
    )
    async def send_test(
        self, state: State, request: Request[Any, Any, Any], endpoint_id: FromPath[str]
    ) -> Response[bytes]:
        """A `webhook.test` event, to this endpoint only, sent by the worker at once with one
        attempt (also while the endpoint is disabled). Poll the delivery for the answer. Send
        an `Idempotency-Key` to retry safely."""
        principal = principal_of(request)

        async def work(conn: TenantConn) -> tuple[int, bytes]:
            delivery = await history.send_test_event(conn, principal.tenant, endpoint_id)
            return 202, _encode(delivery)

        route = f"POST {PATH}/{endpoint_id}/test"
        return await idempotent_json(
            request, state.db, principal.tenant, route, await request.body(), work
        )


webhook_routes: list[Any] = [WebhookEndpointController]
