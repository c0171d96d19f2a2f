"""Security in the published spec: the schemes, and per operation the credential and scopes.

Derived from the same ``opt`` declarations the guard enforces, so the spec cannot drift from
what the API actually demands.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from litestar import Litestar
from litestar.openapi.spec import (
    OAuthFlow,
    OAuthFlows,
    OpenAPIMediaType,
    OpenAPIResponse,
    Reference,
    SecurityScheme,
)

from api.auth.guards import is_public, required_scopes
from api.auth.scopes import SCOPES
from api.errors import PROBLEM_MEDIA_TYPE

API_KEY = "apiKey"
OAUTH2 = "oauth2"
CLIENT_BASIC = "oauthClient"


def security_schemes() -> dict[str, SecurityScheme]:
    return {
        API_KEY: SecurityScheme(
            type="http",
            scheme="bearer",
            bearer_format="API key",
            description=(
                "`Authorization: Bearer sjk_sk_live_…` (secret: every scope), `sjk_rk_live_…` "
                "(restricted: chosen scopes) or `sjk_pk_live_…` (publishable: touchpoint "
                "ingest only, from allowed origins)."
            ),
        ),
        OAUTH2: SecurityScheme(
            type="oauth2",
            description="RFC 9068 access tokens (JWT, at most 15 minutes), sent as bearer tokens.",
            flows=OAuthFlows(
                client_credentials=OAuthFlow(token_url="/oauth/token", scopes=dict(SCOPES)),
                authorization_code=OAuthFlow(
                    authorization_url="/portal/oauth/authorize",
                    token_url="/oauth/token",
                    refresh_url="/oauth/token",
                    scopes=dict(SCOPES),
                ),
            ),
        ),
        CLIENT_BASIC: SecurityScheme(
            type="http",
            scheme="basic",
            description="OAuth client authentication (`client_secret_basic`); "
            "`client_secret_post` is accepted too.",
        ),
    }


def document_security(app: Litestar) -> None:
    """Add the security schemes and every operation's requirement to the app's OpenAPI spec."""
    spec = app.openapi_schema
    if spec.components is None or spec.paths is None:
        return
    spec.components.security_schemes = dict(security_schemes())
    for route in app.routes:
        path_item = spec.paths.get(route.path_format or "/")
        if path_item is None:
            continue
        for handler in getattr(route, "route_handlers", ()):
            for method in getattr(handler, "http_methods", ()):
                operation = getattr(path_item, method.lower(), None)
                if operation is None or method == "OPTIONS":
                    continue
                if route.path_format.startswith("/oauth/"):
                    operation.security = [{CLIENT_BASIC: []}]
                    continue
                if is_public(handler):
                    operation.security = []
                    continue
                scopes = sorted(required_scopes(handler))
                operation.security = [{API_KEY: []}, {OAUTH2: scopes}]
                _add_auth_problems(operation)
                needs = (
                    f"Required scopes: `{'`, `'.join(scopes)}`."
                    if scopes
                    else "Any valid credential."
                )
                if handler.opt.get("publishable"):
                    needs += " Publishable keys are accepted (from their allowed origins)."
                operation.description = f"{operation.description or ''}\n\n{needs}".strip()


#: What the authorization hook itself can answer on any protected operation.
AUTH_STATUSES = (401, 403, 429)


def _add_auth_problems(operation: Any) -> None:
    responses = operation.responses if operation.responses is not None else {}
    for status in AUTH_STATUSES:
        responses.setdefault(
            str(status),
            OpenAPIResponse(
                description=HTTPStatus(status).phrase,
                content={
                    PROBLEM_MEDIA_TYPE: OpenAPIMediaType(
                        schema=Reference(ref="#/components/schemas/ProblemBody")
                    )
                },
            ),
        )
    operation.responses = responses
