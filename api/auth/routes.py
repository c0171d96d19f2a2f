"""``/v1/api-keys``: a shop manages its own keys (scope ``keys:write``)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody

from api.auth import api_keys
from api.auth.api_keys import ApiKey, CreatedApiKey
from api.auth.credentials import Authenticator
from api.auth.guards import principal_of
from api.auth.key_format import KeyKind
from api.auth.principal import Principal
from api.auth.scopes import UnknownScope, parse_scopes
from api.errors import FieldError, Problem, problem_responses
from api.pagination import DEFAULT_LIMIT, Limit, Page, StartingAfter

ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
MAX_ROTATION_GRACE = 30 * 86400
NO_STORE = {"Cache-Control": "no-store"}


class NewApiKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    kind: KeyKind
    name: Annotated[str, msgspec.Meta(max_length=100)] = ""
    #: Restricted keys only: the scopes the key carries.
    scopes: Annotated[list[str], msgspec.Meta(max_length=20)] | None = None
    #: Publishable keys only: web origins (``https://shop.example``) that may use the key.
    allowed_origins: Annotated[list[str], msgspec.Meta(max_length=50)] | None = None
    expires_at: datetime | None = None


class RotateApiKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: How long the old key keeps working, in seconds (0 to 30 days; default 24 h).
    expires_in: Annotated[int, msgspec.Meta(ge=0, le=MAX_ROTATION_GRACE)] = 86400


def validated_new_key(body: NewApiKey) -> tuple[frozenset[str] | None, tuple[str, ...]]:
    errors: list[FieldError] = []
    scopes: frozenset[str] | None = None
    if body.scopes is not None and body.kind != "restricted":
        errors.append(FieldError("$.scopes", f"a {body.kind} key's scopes are fixed; omit this"))
    elif body.scopes is not None:
        try:
            scopes = parse_scopes(body.scopes)
        except UnknownScope as exc:
            errors.append(FieldError("$.scopes", str(exc)))
    if body.allowed_origins is not None and body.kind != "publishable":
        errors.append(FieldError("$.allowed_origins", "only publishable keys have origins"))
    origins = tuple(body.allowed_origins or ())
    for index, origin in enumerate(origins):
        if not ORIGIN.fullmatch(origin):
            errors.append(
                FieldError(
                    f"$.allowed_origins[{index}]",
                    "an origin is scheme://host[:port], without a path or trailing slash",
                )
            )
    if body.expires_at is not None and body.expires_at.tzinfo is None:
        errors.append(FieldError("$.expires_at", "must include a time zone offset"))
    elif body.expires_at is not None and body.expires_at <= datetime.now(UTC):
        errors.append(FieldError("$.expires_at", "must be in the future"))
    if errors:
        raise Problem("validation", f"{len(errors)} field(s) failed validation.", errors=errors)
    return scopes, origins


class ApiKeyController(Controller):
    path = "/v1/api-keys"
    tags = ["api-keys"]
    opt = {"scopes": ("keys:write",)}

    @post(
        "/",
        operation_id="createApiKey",
        summary="Create an API key",
        status_code=201,
        responses=problem_responses(422),
    )
    async def create(
        self, state: State, request: Request[Any, Any, Any], data: JSONBody[NewApiKey]
    ) -> Response[CreatedApiKey]:
        """Create a key. The full key is in this response only; store it now."""
        principal = principal_of(request)
        scopes, origins = validated_new_key(data)
        granted = api_keys.scopes_for(data.kind, sorted(scopes) if scopes else None)
        ensure_may_grant(principal, granted)
        async with state.db.control() as conn:
            created = await api_keys.create_api_key(
                conn,
                state.keyring,
                principal.tenant.id,
                kind=data.kind,
                name=data.name,
                scopes=granted,
                allowed_origins=origins,
                expires_at=data.expires_at,
            )
        return Response(created, status_code=201, headers=NO_STORE)

    @get("/", operation_id="listApiKeys", summary="List API keys", responses=problem_responses(422))
    async def list_keys(
        self,
        state: State,
        request: Request[Any, Any, Any],
        limit: Limit = DEFAULT_LIMIT,
        starting_after: StartingAfter = None,
    ) -> Page[ApiKey]:
        """The shop's keys, newest first, masked."""
        principal = principal_of(request)
        return await api_keys.list_api_keys(
            state.db,
            principal.tenant.id,
            limit=limit,
            starting_after=_uuid_or_422(starting_after, "query.starting_after"),
        )

    @get(
        "/{key_id:uuid}",
        operation_id="getApiKey",
        summary="Get an API key",
        responses=problem_responses(404),
    )
    async def get_key(
        self, state: State, request: Request[Any, Any, Any], key_id: FromPath[UUID]
    ) -> ApiKey:
        principal = principal_of(request)
        return await api_keys.get_api_key(state.db, principal.tenant.id, key_id)

    @post(
        "/{key_id:uuid}/rotate",
        operation_id="rotateApiKey",
        summary="Rotate an API key",
        status_code=201,
        responses=problem_responses(404, 409, 422),
    )
    async def rotate(
        self,
        state: State,
        request: Request[Any, Any, Any],
        key_id: FromPath[UUID],
        data: JSONBody[RotateApiKey | None] = None,
    ) -> Response[CreatedApiKey]:
        """A new key with the same kind, scopes and origins; the old one keeps working for
        ``expires_in`` seconds (default 24 h), then stops."""
        principal = principal_of(request)
        grace = timedelta(seconds=(data or RotateApiKey()).expires_in)
        current = await api_keys.get_api_key(state.db, principal.tenant.id, key_id)
        ensure_may_grant(principal, frozenset(current.scopes))
        created = await api_keys.rotate_api_key(
            state.db, state.keyring, principal.tenant.id, key_id, old_key_valid_for=grace
        )
        _forget(state, key_id)
        return Response(created, status_code=201, headers=NO_STORE)

    @delete(
        "/{key_id:uuid}",
        operation_id="revokeApiKey",
        summary="Revoke an API key",
        status_code=200,
        responses=problem_responses(404),
    )
    async def revoke(
        self, state: State, request: Request[Any, Any, Any], key_id: FromPath[UUID]
    ) -> ApiKey:
        """Revoked at once in this process; everywhere within the revocation poll interval."""
        principal = principal_of(request)
        revoked = await api_keys.revoke_api_key(state.db, principal.tenant.id, key_id)
        _forget(state, key_id)
        return revoked


def ensure_may_grant(principal: Principal, scopes: frozenset[str]) -> None:
    """A credential cannot hand out more than it holds (a restricted key with ``keys:write``
    must not mint a secret key)."""
    missing = scopes - principal.scopes
    if missing:
        raise Problem(
            "insufficient-scope",
            "A key cannot be given scopes the credential creating it does not hold: "
            + " ".join(sorted(missing))
            + ".",
        )


def _forget(state: State, key_id: UUID) -> None:
    authenticator: Authenticator = state.authenticator
    authenticator.forget_key(str(key_id))


def _uuid_or_422(value: str | None, path: str) -> UUID | None:
    if value is None:
        return None
    try:
        return UUID(value)
    except ValueError as exc:
        raise Problem(
            "validation", "Invalid cursor.", errors=[FieldError(path, "not an object id")]
        ) from exc


class Credential(msgspec.Struct, frozen=True, kw_only=True):
    """The calling credential, as the API sees it."""

    object: Literal["credential"] = "credential"
    tenant_id: UUID
    kind: str
    scopes: list[str]
    client_id: str | None


@get(
    "/v1/me",
    opt={"authenticated": True},
    tags=["api-keys"],
    operation_id="getCurrentCredential",
    summary="Who am I",
    responses=problem_responses(401, 403, 429),
)
async def whoami(request: Request[Any, Any, Any]) -> Credential:
    """The shop and scopes of the credential making the request; any valid secret key, restricted
    key or access token may call it (a quick way to check a key)."""
    principal = principal_of(request)
    return Credential(
        tenant_id=principal.tenant.id,
        kind=principal.kind,
        scopes=sorted(principal.scopes),
        client_id=principal.client_id,
    )
