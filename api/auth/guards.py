"""One authorization model for every route.

Each route handler declares what it needs in ``opt``:

- ``opt={"public": True}``: no credential (health, metadata, OAuth endpoints that authenticate
  the client themselves);
- ``opt={"scopes": ("customers:read",)}``: a credential holding every listed scope;
- ``opt={"authenticated": True}``: any valid credential, whatever its scopes (``/v1/me``);
- ``"publishable": True`` additionally admits publishable keys (browser ingest only).

:func:`authorize_request` runs before every handler (as the app's ``before_request`` hook, which
unlike a Litestar guard does not copy the handler on every call): it authenticates,
rate-limits,
checks scopes and the publishable key's origin, and leaves the :class:`Principal` in the request
state.
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from api.auth.credentials import Authenticator
from api.auth.principal import Principal
from api.auth.rate_limit import Decision, RateLimit, RateLimiter, rate_limit_headers
from api.errors import Problem
from api.logs import tenant_var

PRINCIPAL = "principal"
RESPONSE_HEADERS = "response_headers"
PREFLIGHT_HEADERS = "authorization, content-type, idempotency-key, x-request-id"
EXPOSED_HEADERS = "x-request-id, ratelimit-limit, ratelimit-remaining, ratelimit-reset, retry-after"


class Limits:
    """The token buckets: per credential, and per shop (``shop``, unless :meth:`for_shop` says
    otherwise: billing gives each shop its plan's)."""

    def __init__(self, credential: RateLimit, shop: RateLimit) -> None:
        self.credential = credential
        self.shop = shop

    async def for_shop(self, principal: Principal) -> RateLimit:
        return self.shop


def raw_header(scope: Any, name: bytes) -> str | None:
    """One request header straight from the ASGI scope: cheaper than building ``Headers``."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def required_scopes(handler: BaseRouteHandler) -> frozenset[str]:
    return frozenset(handler.opt.get("scopes", ()))


def is_public(handler: BaseRouteHandler) -> bool:
    return bool(handler.opt.get("public"))


def add_response_headers(
    connection: ASGIConnection[Any, Any, Any, Any], headers: dict[str, str]
) -> None:
    """Headers for whatever response this request ends in (success or problem)."""
    extra: list[tuple[bytes, bytes]] = connection.scope["state"].setdefault(RESPONSE_HEADERS, [])
    extra.extend((name.lower().encode(), value.encode()) for name, value in headers.items())


async def authorize_request(request: Request[Any, Any, Any]) -> None:
    await authorize(request, request.scope["route_handler"])


async def authorize(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    if connection.scope.get("method") == "OPTIONS":
        _answer_preflight(connection)
        return
    if is_public(handler) or _is_api_docs(connection):
        return
    state = connection.app.state
    authenticator: Authenticator = state.authenticator
    principal = await authenticator.authenticate(raw_header(connection.scope, b"authorization"))
    tenant_var.set(str(principal.tenant.id))
    await _spend_rate_limit(connection, state.rate_limiter, state.limits, principal)
    _check_origin(connection, handler, principal)
    required = required_scopes(handler)
    if not required and not handler.opt.get("authenticated"):
        # Fail closed: a route that forgot to declare what it needs serves nobody.
        raise RuntimeError(f"route {handler} declares neither scopes nor public/authenticated")
    if not principal.has_scopes(required):
        missing = " ".join(sorted(required - principal.scopes))
        raise Problem(
            "insufficient-scope",
            f"This operation needs the scope(s) {missing}, which the credential does not have.",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{missing}"'},
        )
    connection.scope["state"][PRINCIPAL] = principal


def _is_api_docs(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """The spec and its renderer (routes Litestar adds itself) are public."""
    config = connection.app.openapi_config
    return config is not None and connection.scope["path"].startswith(config.path or "/schema")


def _check_origin(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler, principal: Principal
) -> None:
    if principal.kind != "publishable":
        return
    if not handler.opt.get("publishable"):
        raise Problem(
            "forbidden",
            "Publishable keys may only record touchpoints; use a secret key or an access token.",
        )
    origin = raw_header(connection.scope, b"origin")
    if origin is None:
        return  # not a browser: origins restrict browsers, the key's scope restricts the rest
    if origin not in principal.allowed_origins:
        raise Problem(
            "origin-not-allowed",
            f"The origin {origin} is not on this publishable key's list of allowed origins.",
        )
    add_response_headers(
        connection,
        {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
            "Vary": "Origin",
        },
    )


def _answer_preflight(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    """Browsers send no credential on a preflight, so any origin may ask; the real request is
    then refused unless its origin is on the publishable key's list."""
    origin = connection.headers.get("origin")
    publishable_paths: frozenset[str] = connection.app.state.publishable_paths
    if origin is None or connection.scope.get("path_template") not in publishable_paths:
        return
    add_response_headers(
        connection,
        {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "POST",
            "Access-Control-Allow-Headers": PREFLIGHT_HEADERS,
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        },
    )


async def _spend_rate_limit(
    connection: ASGIConnection[Any, Any, Any, Any],
    limiter: RateLimiter,
    limits: Limits,
    principal: Principal,
) -> None:
    decision = await limiter.hit(principal.credential_id, limits.credential)
    # A request its own credential's bucket refuses must not spend the shop's budget too.
    if decision.allowed:
        per_shop = await limiter.hit(principal.shop_bucket, await limits.for_shop(principal))
        if not per_shop.allowed or _fuller(decision, per_shop):
            decision = per_shop
    if not decision.allowed:
        raise Problem(
            "rate-limited",
            f"Rate limit exceeded; retry in {decision.retry_after_seconds} s.",
            headers=rate_limit_headers(decision),
        )
    connection.scope["state"].setdefault(RESPONSE_HEADERS, []).extend(
        (
            (b"ratelimit-limit", b"%d" % decision.limit),
            (b"ratelimit-remaining", b"%d" % decision.remaining),
            (b"ratelimit-reset", b"%d" % decision.reset_seconds),
        )
    )


def _fuller(current: Decision, other: Decision) -> bool:
    """Whether ``current`` has more room left than ``other`` (report the tighter bucket)."""
    return current.remaining * other.limit > other.remaining * current.limit


def principal_of(request: Request[Any, Any, Any]) -> Principal:
    """The caller, as :func:`authorize` established it. Handlers call this rather than take a
    Litestar dependency: on the hot path the injection machinery costs more than the lookup."""
    principal: Principal = request.scope["state"][PRINCIPAL]
    return principal
