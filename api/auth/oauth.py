"""The OAuth 2 authorization server: token, revocation, introspection, metadata, JWKS.

Error bodies follow RFC 6749 (``error``, ``error_description``, which OAuth clients parse) and
carry the RFC 9457 members as well, so they read like every other error of the API. Grant and
error names come from authlib's RFC 6749 implementation; the flows themselves run as plain async
code on our own storage, so nothing blocks the event loop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import msgspec
from authlib.oauth2.rfc6749 import errors as oauth_errors
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from litestar import Request, Response, get, post
from litestar.datastructures import State

from api.auth import oauth_clients
from api.auth.credentials import Authenticator
from api.auth.oauth_clients import ClientRecord, SpentRefreshToken
from api.auth.revocations import record_revocation
from api.auth.scopes import SCOPES, UnknownScope, parse_scopes, scope_string
from api.auth.secrets import Keyring, constant_time_equal
from api.auth.tokens import InvalidToken, TokenService
from api.db import Database
from api.errors import PROBLEM_TYPES, ProblemType

FORM = "application/x-www-form-urlencoded"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
GRANT_TYPES = ("client_credentials", "authorization_code", "refresh_token")

for _slug, _title in (
    ("oauth-invalid-request", "Invalid OAuth request"),
    ("oauth-invalid-client", "Client authentication failed"),
    ("oauth-invalid-grant", "Invalid grant"),
    ("oauth-unauthorized-client", "Client not allowed this grant"),
    ("oauth-unsupported-grant-type", "Unsupported grant type"),
    ("oauth-invalid-scope", "Invalid scope"),
):
    PROBLEM_TYPES[_slug] = ProblemType(
        _slug, 400, _title, f"The OAuth error `{_slug[6:].replace('-', '_')}` (RFC 6749 5.2)."
    )


class OAuthError(Exception):
    """An RFC 6749 error; ``kind`` is an authlib error class, for its standard ``error`` name."""

    def __init__(self, kind: type[oauth_errors.OAuth2Error], description: str) -> None:
        super().__init__(description)
        self.error: str = kind.error or "invalid_request"
        self.description = description
        self.status = 401 if kind is oauth_errors.InvalidClientError else 400


def handle_oauth_error(request: Request[Any, Any, Any], exc: OAuthError) -> Response[bytes]:
    slug = "oauth-" + exc.error.replace("_", "-")
    problem_type = PROBLEM_TYPES.get(slug, PROBLEM_TYPES["oauth-invalid-request"])
    body = {
        "error": exc.error,
        "error_description": exc.description,
        "type": f"/problems/{problem_type.slug}",
        "title": problem_type.title,
        "status": exc.status,
        "detail": exc.description,
        "request_id": request.scope.get("state", {}).get("request_id"),
    }
    headers = dict(NO_STORE)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="sjaak"'
    return Response(
        msgspec.json.encode(body),
        status_code=exc.status,
        media_type="application/json",
        headers=headers,
    )


class TokenResponse(msgspec.Struct, omit_defaults=True):
    access_token: str
    token_type: str
    expires_in: int
    scope: str
    refresh_token: str | None = None


class Introspection(msgspec.Struct, omit_defaults=True):
    active: bool
    scope: str | None = None
    client_id: str | None = None
    sub: str | None = None
    exp: int | None = None
    iat: int | None = None
    iss: str | None = None
    aud: str | None = None
    token_type: str | None = None
    tenant: str | None = None


async def _form(request: Request[Any, Any, Any]) -> dict[str, str]:
    if request.headers.get("content-type", "").split(";")[0].strip() != FORM:
        raise OAuthError(oauth_errors.InvalidRequestError, f"Send the body as {FORM}.")
    form = await request.form()
    repeated = sorted({key for key, _ in form.multi_items() if len(form.getall(key)) > 1})
    if repeated:
        # RFC 6749 3.1/3.2: parameters must not be included more than once.
        raise OAuthError(
            oauth_errors.InvalidRequestError, f"Repeated parameter(s): {', '.join(repeated)}."
        )
    return {key: str(value) for key, value in form.items()}


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise OAuthError(oauth_errors.InvalidClientError, "Malformed Basic credentials.") from exc
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise OAuthError(oauth_errors.InvalidClientError, "Malformed Basic credentials.")
    # RFC 6749 2.3.1: both parts are form-urlencoded before being joined.
    return unquote(client_id), unquote(secret)


async def _authenticate_client(
    request: Request[Any, Any, Any], form: dict[str, str]
) -> ClientRecord:
    """``client_secret_basic`` or ``client_secret_post``, never both."""
    basic = _basic_credentials(request.headers.get("authorization"))
    posted = form.get("client_secret")
    if basic and posted:
        raise OAuthError(oauth_errors.InvalidRequestError, "Use one client authentication method.")
    client_id, secret = basic or (form.get("client_id", ""), posted or "")
    if not client_id or not secret:
        raise OAuthError(oauth_errors.InvalidClientError, "Client authentication is required.")
    state: State = request.app.state
    client = await oauth_clients.authenticate_client(state.db, state.keyring, client_id, secret)
    if client is None:
        raise OAuthError(oauth_errors.InvalidClientError, "Client authentication failed.")
    return client


def _requested_scopes(form: dict[str, str], allowed: frozenset[str]) -> frozenset[str]:
    if "scope" not in form:
        return allowed
    try:
        requested = parse_scopes(form["scope"])
    except UnknownScope as exc:
        raise OAuthError(oauth_errors.InvalidScopeError, str(exc)) from exc
    if not requested <= allowed:
        extra = scope_string(requested - allowed)
        raise OAuthError(oauth_errors.InvalidScopeError, f"Scope(s) not granted: {extra}.")
    return requested


@post(
    "/oauth/token",
    opt={"public": True},
    tags=["oauth"],
    operation_id="createToken",
    summary="Get an access token",
    status_code=200,
)
async def token(request: Request[Any, Any, Any], state: State) -> Response[TokenResponse]:
    """Grants: ``client_credentials``, ``authorization_code`` (PKCE S256 required) and
    ``refresh_token`` (rotating: each refresh token works once)."""
    form = await _form(request)
    client = await _authenticate_client(request, form)
    grant_type = form.get("grant_type", "")
    if grant_type not in GRANT_TYPES:
        raise OAuthError(
            oauth_errors.UnsupportedGrantTypeError,
            f"grant_type must be one of {', '.join(GRANT_TYPES)}.",
        )
    if grant_type not in client.grant_types:
        raise OAuthError(
            oauth_errors.UnauthorizedClientError, f"This client may not use {grant_type}."
        )
    if grant_type == "client_credentials":
        issued = await _client_credentials(state, client, form)
    elif grant_type == "authorization_code":
        issued = await _authorization_code(state, client, form)
    else:
        issued = await _refresh(state, client, form)
    return Response(issued, headers=NO_STORE)


async def _access_token(
    state: State, client: ClientRecord, tenant_id: Any, scopes: frozenset[str], subject: str
) -> tuple[str, int]:
    tokens: TokenService = state.tokens
    access, _ = await tokens.issue(
        subject=subject, client_id=client.client_id, tenant_id=tenant_id, scopes=scopes
    )
    return access, tokens.ttl_seconds


async def _client_credentials(
    state: State, client: ClientRecord, form: dict[str, str]
) -> TokenResponse:
    if client.tenant_id is None:
        raise OAuthError(
            oauth_errors.UnauthorizedClientError,
            "A partner app acts for a shop only after its owner approves it (authorization code).",
        )
    scopes = _requested_scopes(form, client.allowed_scopes)
    access, ttl = await _access_token(state, client, client.tenant_id, scopes, client.client_id)
    return TokenResponse(access, "Bearer", ttl, scope_string(scopes))


async def _authorization_code(
    state: State, client: ClientRecord, form: dict[str, str]
) -> TokenResponse:
    code, verifier = form.get("code", ""), form.get("code_verifier", "")
    if not code:
        raise OAuthError(oauth_errors.InvalidRequestError, "code is required.")
    if not verifier:
        # RFC 9700 2.1.1: PKCE is required, so a missing verifier is a downgrade attempt.
        raise OAuthError(oauth_errors.InvalidGrantError, "code_verifier is required (PKCE).")
    db: Database = state.db
    keyring: Keyring = state.keyring
    family_id = uuid.uuid4()
    # Whatever happens next, the code is spent: the transaction commits before any error is
    # raised, so a failed or replayed exchange cannot be retried with the same code.
    async with db.control() as conn:
        grant = await oauth_clients.use_authorization_code(
            conn, keyring, code, client.client_id, family_id
        )
        failure = _code_failure(grant, client, form, verifier)
        if grant is None:
            # A replay: revoke what the first exchange issued (RFC 6749 4.1.2).
            await oauth_clients.revoke_tokens_of_spent_code(conn, keyring, code, client.client_id)
        elif failure is None:
            scopes = frozenset(grant["scopes"])
            refresh = await oauth_clients.issue_refresh_token(
                conn,
                keyring,
                client_id=client.client_id,
                tenant_id=grant["tenant_id"],
                scopes=scopes,
                family_id=family_id,
                ttl=timedelta(days=state.settings.refresh_token_ttl_days),
            )
    if grant is None or failure is not None:
        raise OAuthError(oauth_errors.InvalidGrantError, failure or "The code is invalid or spent.")
    access, ttl = await _access_token(state, client, grant["tenant_id"], scopes, client.client_id)
    return TokenResponse(access, "Bearer", ttl, scope_string(scopes), refresh)


def _code_failure(
    grant: Any, client: ClientRecord, form: dict[str, str], verifier: str
) -> str | None:
    """Why this exchange of a valid code must fail, or None."""
    if grant is None:
        return None
    if not frozenset(grant["scopes"]) <= client.allowed_scopes:
        return "The code grants scopes this client lacks."
    if form.get("redirect_uri") != grant["redirect_uri"]:
        return "redirect_uri does not match."
    expected = grant["code_challenge"].encode()
    if not constant_time_equal(create_s256_code_challenge(verifier).encode(), expected):
        return "code_verifier does not match."
    return None


async def _refresh(state: State, client: ClientRecord, form: dict[str, str]) -> TokenResponse:
    presented = form.get("refresh_token", "")
    if not presented:
        raise OAuthError(oauth_errors.InvalidRequestError, "refresh_token is required.")
    db: Database = state.db
    keyring: Keyring = state.keyring
    async with db.control() as conn:
        try:
            row = await oauth_clients.use_refresh_token(conn, keyring, presented, client.client_id)
        except SpentRefreshToken:
            row = None
            spent = True
        else:
            spent = False
        if row is not None:
            scopes = _requested_scopes(form, frozenset(row["scopes"]))
            refresh = await oauth_clients.issue_refresh_token(
                conn,
                keyring,
                client_id=client.client_id,
                tenant_id=row["tenant_id"],
                scopes=frozenset(row["scopes"]),
                family_id=row["family_id"],
                ttl=timedelta(days=state.settings.refresh_token_ttl_days),
            )
    if row is None:
        detail = (
            "The refresh token was already used; its whole family is now revoked."
            if spent
            else "The refresh token is invalid, expired or revoked."
        )
        raise OAuthError(oauth_errors.InvalidGrantError, detail)
    access, ttl = await _access_token(state, client, row["tenant_id"], scopes, client.client_id)
    return TokenResponse(access, "Bearer", ttl, scope_string(scopes), refresh)


@post(
    "/oauth/revoke",
    opt={"public": True},
    tags=["oauth"],
    operation_id="revokeToken",
    summary="Revoke a token (RFC 7009)",
    status_code=200,
)
async def revoke(request: Request[Any, Any, Any], state: State) -> Response[dict[str, str]]:
    """Always 200 for a well-formed request, whether or not the token was known or the caller's."""
    form = await _form(request)
    client = await _authenticate_client(request, form)
    presented = form.get("token", "")
    if not presented:
        raise OAuthError(oauth_errors.InvalidRequestError, "token is required.")
    db: Database = state.db
    if presented.count(".") == 2:
        await _revoke_access_token(state, client, presented)
        return Response({}, headers=NO_STORE)
    async with db.control() as conn:
        row = await oauth_clients.find_refresh_token(conn, state.keyring, presented)
        if row is not None and row["client_id"] == client.client_id:
            await oauth_clients.revoke_refresh_family(conn, row["family_id"])
    return Response({}, headers=NO_STORE)


async def _revoke_access_token(state: State, client: ClientRecord, token: str) -> None:
    tokens: TokenService = state.tokens
    try:
        claims = await tokens.verify(token)
    except InvalidToken:
        return  # expired or not ours: nothing left to revoke
    if claims.client_id != client.client_id:
        return
    db: Database = state.db
    async with db.control() as conn:
        await record_revocation(
            conn, "access_token", claims.jti, datetime.fromtimestamp(claims.expires_at, UTC)
        )
    authenticator: Authenticator = state.authenticator
    authenticator.forget_access_token(claims.jti, float(claims.expires_at))


@post(
    "/oauth/introspect",
    opt={"public": True},
    tags=["oauth"],
    operation_id="introspectToken",
    summary="Introspect a token (RFC 7662)",
    status_code=200,
)
async def introspect(request: Request[Any, Any, Any], state: State) -> Response[Introspection]:
    """A token of another client reads ``active: false``, exactly like an unknown one."""
    form = await _form(request)
    client = await _authenticate_client(request, form)
    presented = form.get("token", "")
    inactive = Response(Introspection(active=False), headers=NO_STORE)
    if not presented:
        return inactive
    tokens: TokenService = state.tokens
    if presented.count(".") == 2:
        try:
            claims = await tokens.verify(presented)
        except InvalidToken:
            return inactive
        authenticator: Authenticator = state.authenticator
        await authenticator.refresh_revocations()
        if claims.client_id != client.client_id or authenticator.is_revoked(
            claims.jti, claims.client_id
        ):
            return inactive
        return Response(
            Introspection(
                active=True,
                scope=scope_string(claims.scopes),
                client_id=claims.client_id,
                sub=claims.subject,
                exp=claims.expires_at,
                iat=claims.issued_at,
                iss=tokens.issuer,
                aud=tokens.audience,
                token_type="Bearer",
                tenant=str(claims.tenant_id),
            ),
            headers=NO_STORE,
        )
    db: Database = state.db
    async with db.control() as conn:
        row = await oauth_clients.find_refresh_token(conn, state.keyring, presented)
    if row is None or row["client_id"] != client.client_id or not row["active"]:
        return inactive
    return Response(
        Introspection(
            active=True,
            scope=scope_string(frozenset(row["scopes"])),
            client_id=row["client_id"],
            exp=row["exp"],
            iat=row["iat"],
            iss=tokens.issuer,
            token_type="refresh_token",
            tenant=str(row["tenant_id"]),
        ),
        headers=NO_STORE,
    )


@get(
    "/.well-known/oauth-authorization-server",
    opt={"public": True},
    tags=["oauth"],
    operation_id="getAuthorizationServerMetadata",
    summary="Authorization server metadata (RFC 8414)",
)
async def metadata(state: State) -> dict[str, Any]:
    issuer = state.tokens.issuer
    return {
        "issuer": issuer,
        "token_endpoint": f"{issuer}/oauth/token",
        "revocation_endpoint": f"{issuer}/oauth/revoke",
        "introspection_endpoint": f"{issuer}/oauth/introspect",
        "authorization_endpoint": f"{issuer}/portal/oauth/authorize",
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "grant_types_supported": list(GRANT_TYPES),
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "introspection_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
        ],
        "scopes_supported": sorted(SCOPES),
        "token_endpoint_auth_signing_alg_values_supported": ["RS256"],
    }


@get(
    "/.well-known/jwks.json",
    opt={"public": True},
    tags=["oauth"],
    operation_id="getJwks",
    summary="Token signing keys (JWKS)",
)
async def jwks(state: State) -> Response[dict[str, Any]]:
    tokens: TokenService = state.tokens
    return Response(await tokens.jwks(), headers={"Cache-Control": "public, max-age=300"})


def s256(verifier: str) -> str:
    """The PKCE S256 challenge of ``verifier`` (for clients and tests)."""
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


oauth_routes = [token, revoke, introspect, metadata, jwks]
