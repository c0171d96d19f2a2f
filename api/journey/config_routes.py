"""``/v1/config/journey``: the shop's journey rules. Reading them (and their versions) needs
``analytics:read``; replacing, restoring and previewing them needs ``config:write``."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post, put
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, Parameter

from api.auth.guards import principal_of
from api.db import TenantConn, in_tenant
from api.errors import problem_responses
from api.idempotency import idempotent_json
from api.journey import config
from api.journey.config import (
    MAX_RULES_BYTES,
    MAX_VERSION,
    JourneyConfig,
    JourneyPreview,
    JourneyRuleVersion,
)
from api.journey.rules import RuleSet
from api.journey.stages import forget_rules
from api.pagination import DEFAULT_LIMIT, Limit, Page
from api.touchpoints.routes import read_body

READ = {"scopes": ("analytics:read",)}
WRITE = {"scopes": ("config:write",)}
PATH = "/v1/config/journey"

VersionCursor = Annotated[
    int | None,
    Parameter(
        description="A `version` from the previous page: return the (older) versions after it.",
        ge=0,
        le=MAX_VERSION,
    ),
]

_encode = msgspec.json.Encoder().encode
_NEW_CONFIG = {
    200: ResponseSpec(
        data_container=JourneyConfig,
        description="The rules now in force, as a new version.",
        generate_examples=False,
    )
}


class JourneyConfigController(Controller):
    path = PATH
    tags = ["journey"]

    @get(
        "/",
        operation_id="getJourneyRules",
        summary="Get the journey rules",
        opt=READ,
    )
    async def get_rules(self, state: State, request: Request[Any, Any, Any]) -> JourneyConfig:
        """The rules in force. A shop that never saved rules has the built-in defaults, as
        `version` 0 with `is_default: true`."""
        return await in_tenant(state.db, principal_of(request).tenant, config.get_config)

    @put(
        "/",
        operation_id="replaceJourneyRules",
        summary="Replace the journey rules",
        opt={**WRITE, "request_body": RuleSet},
        request_max_body_size=MAX_RULES_BYTES * 2,
        responses={**problem_responses(400, 413, 422), **_NEW_CONFIG},
    )
    async def replace_rules(self, state: State, request: Request[Any, Any, Any]) -> Response[bytes]:
        """Store a new rule set as the next version, in force at once. Each failing rule is
        reported with its JSON path (`$.stages.loyalty.any[1].orders.at_least`); nothing is
        stored unless the whole rule set is valid. Earlier versions stay listed and restorable.
        Send an `Idempotency-Key` to retry safely.

        Saving rules moves nobody at once: each customer keeps their stage until their next
        touchpoint, when the new rules place them, forward only (a touchpoint never moves a
        customer back to an earlier stage; a purchase ends `at_risk` or `lapsed`). Preview a rule
        set first to see where it would put the customers you have now."""
        principal = principal_of(request)
        body = await read_body(request, MAX_RULES_BYTES)
        rules = config.validated_rules(body)

        async def work(conn: TenantConn) -> tuple[int, bytes]:
            saved = await config.save_rules(conn, rules, principal.credential_id)
            return 200, _encode(saved)

        response = await idempotent_json(
            request, state.db, principal.tenant, f"PUT {PATH}", body, work
        )
        forget_rules(principal.tenant.schema)
        return response

    @get(
        "/versions",
        operation_id="listJourneyRuleVersions",
        summary="List journey rule versions",
        opt=READ,
        responses=problem_responses(422),
    )
    async def list_versions(
        self,
        state: State,
        request: Request[Any, Any, Any],
        limit: Limit = DEFAULT_LIMIT,
        starting_after: VersionCursor = None,
    ) -> Page[JourneyRuleVersion]:
        """Every saved version, newest (the one in force) first. The built-in defaults are
        version 0: not listed, but restorable like any other."""

        async def work(conn: TenantConn) -> Page[JourneyRuleVersion]:
            return await config.list_versions(conn, limit=limit, starting_after=starting_after)

        return await in_tenant(state.db, principal_of(request).tenant, work)

    @post(
        "/versions/{version:int}/restore",
        operation_id="restoreJourneyRuleVersion",
        summary="Restore a journey rule version",
        status_code=200,
        opt=WRITE,
        responses={**problem_responses(404, 422), **_NEW_CONFIG},
    )
    async def restore_version(
        self,
        state: State,
        request: Request[Any, Any, Any],
        version: Annotated[int, FromPath, Parameter(description="The version to restore.")],
    ) -> Response[bytes]:
        """Put an earlier version's rules back in force, as a new version whose
        `restored_from` names it; version 0 restores the built-in defaults. An unknown version
        is a 404. Send an `Idempotency-Key` to retry safely. As with a replace, customers keep
        their stages until their next touchpoint."""
        principal = principal_of(request)

        async def work(conn: TenantConn) -> tuple[int, bytes]:
            saved = await config.restore_version(conn, version, principal.credential_id)
            return 200, _encode(saved)

        route = f"POST {PATH}/versions/{version}/restore"
        response = await idempotent_json(
            request, state.db, principal.tenant, route, await request.body(), work
        )
        forget_rules(principal.tenant.schema)
        return response

    @post(
        "/preview",
        operation_id="previewJourneyRules",
        summary="Preview a journey rule set",
        status_code=200,
        opt={**WRITE, "request_body": RuleSet},
        request_max_body_size=MAX_RULES_BYTES * 2,
        responses=problem_responses(400, 413, 422),
    )
    async def preview(self, state: State, request: Request[Any, Any, Any]) -> JourneyPreview:
        """How many of the shop's customers a proposed rule set would put in each stage, next
        to where they are now (`current`); nothing is saved. Counts every profile, known and
        anonymous, except those merged into another. Each profile is evaluated afresh from its
        aggregates (drift first, then the highest stage whose rule holds), as if the rules had
        always been in force; the rule set is validated exactly as by the replace operation."""
        rules = config.validated_rules(await read_body(request, MAX_RULES_BYTES))

        async def work(conn: TenantConn) -> JourneyPreview:
            return await config.preview(conn, rules)

        return await in_tenant(state.db, principal_of(request).tenant, work)


journey_config_routes: list[type[Controller]] = [JourneyConfigController]
