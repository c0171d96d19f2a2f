"""``/v1/oauth-clients``: a shop's own OAuth clients, for its back-ends (scope ``keys:write``)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody

from api.auth import oauth_clients
from api.auth.guards import principal_of
from api.auth.oauth_clients import CreatedOAuthClient, OAuthClient
from api.auth.scopes import UnknownScope, parse_scopes
from api.errors import FieldError, Problem, problem_responses
from api.pagination import DEFAULT_LIMIT, Limit, Page, StartingAfter

CLIENT_ID = r"^cl_[a-z0-9]{24}$"
NO_STORE = {"Cache-Control": "no-store"}


class NewOAuthClient(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    #: The scopes tokens of this client may carry (a token may ask for fewer).
    scopes: Annotated[list[str], msgspec.Meta(min_length=1, max_length=20)]
    grant_types: list[Literal["client_credentials"]] = msgspec.field(
        default_factory=lambda: ["client_credentials"]
    )


class OAuthClientController(Controller):
    path = "/v1/oauth-clients"
    tags = ["oauth-clients"]
    opt = {"scopes": ("keys:write",)}

    @post(
        "/",
        operation_id="createOAuthClient",
        summary="Create an OAuth client",
        status_code=201,
        responses=problem_responses(422),
    )
    async def create(
        self,
        state: State,
        request: Request[Any, Any, Any],
        data: JSONBody[NewOAuthClient],
    ) -> Response[CreatedOAuthClient]:
        """A client for ``client_credentials``. The secret is in this response only."""
        principal = principal_of(request)
        try:
            scopes = parse_scopes(data.scopes)
        except UnknownScope as exc:
            raise Problem(
                "validation", str(exc), errors=[FieldError("$.scopes", str(exc))]
            ) from exc
        if not scopes <= principal.scopes:
            raise Problem(
                "insufficient-scope",
                "A client cannot be given scopes the credential creating it does not hold.",
            )
        async with state.db.control() as conn:
            created = await oauth_clients.create_client(
                conn,
                state.keyring,
                tenant_id=principal.tenant.id,
                name=data.name,
                scopes=scopes,
                grant_types=frozenset(data.grant_types),
            )
        return Response(created, status_code=201, headers=NO_STORE)

    @get(
        "/",
        operation_id="listOAuthClients",
        summary="List OAuth clients",
        responses=problem_responses(422),
    )
    async def list_clients(
        self,
        state: State,
        request: Request[Any, Any, Any],
        limit: Limit = DEFAULT_LIMIT,
        starting_after: StartingAfter = None,
    ) -> Page[OAuthClient]:
        principal = principal_of(request)
        return await oauth_clients.list_clients(
            state.db, principal.tenant.id, limit=limit, starting_after=starting_after
        )

    @get(
        "/{client_id:str}",
        operation_id="getOAuthClient",
        summary="Get an OAuth client",
        responses=problem_responses(404),
    )
    async def get_client(
        self, state: State, request: Request[Any, Any, Any], client_id: FromPath[str]
    ) -> OAuthClient:
        principal = principal_of(request)
        return await oauth_clients.get_client(state.db, principal.tenant.id, _checked(client_id))

    @delete(
        "/{client_id:str}",
        operation_id="deleteOAuthClient",
        summary="Delete an OAuth client",
        status_code=200,
        responses=problem_responses(404),
    )
    async def delete_client(
        self, state: State, request: Request[Any, Any, Any], client_id: FromPath[str]
    ) -> OAuthClient:
        """Revokes the client, its refresh tokens and its access tokens."""
        principal = principal_of(request)
        deleted = await oauth_clients.delete_client(
            state.db, principal.tenant.id, _checked(client_id)
        )
        state.authenticator.forget_client(deleted.client_id)
        return deleted


def _checked(client_id: str) -> str:
    if not re.fullmatch(CLIENT_ID, client_id):
        raise Problem("not-found", f"No OAuth client {client_id}.")
    return client_id
