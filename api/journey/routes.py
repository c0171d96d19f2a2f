"""``/v1/customers/{customer_id}/journey``: a customer's journey (``customers:read``) and the
explicit, audited stage move (``customers:write``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody

from api.auth.guards import principal_of
from api.customers.profiles import customer_ref_or_404, not_found
from api.customers.schemas import Stage
from api.db import TenantConn, in_tenant
from api.errors import FieldError, Problem, problem_responses
from api.idempotency import idempotent_json
from api.journey.history import CustomerJourney, customer_journey, journey_of
from api.journey.rules import STAGES, forward_stage
from api.journey.stages import PROFILE_COLUMNS, Move, aggregates_of, current_rules, record_moves

READ = {"scopes": ("customers:read",)}
WRITE = {"scopes": ("customers:write",)}
_encode = msgspec.json.Encoder().encode


class StageMoveIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: One of the six stages or a drift state; backwards moves are allowed.
    stage: Stage
    #: Why, for the audit trail (1 to 500 characters, not only spaces).
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]


@get(
    "/v1/customers/{customer_id:str}/journey",
    opt=READ,
    tags=["customers"],
    operation_id="getCustomerJourney",
    summary="A customer's journey",
    responses=problem_responses(401, 403, 404, 429),
)
async def get_customer_journey(
    request: Request[Any, Any, Any], state: State, customer_id: FromPath[str]
) -> CustomerJourney:
    """The current stage and since when, every transition with its cause, time spent in each
    stage, how many touchpoints came before the first purchase, and the channels seen in each
    stage."""

    async def work(conn: TenantConn) -> CustomerJourney:
        return await customer_journey(conn, customer_id)

    return await in_tenant(state.db, principal_of(request).tenant, work)


@post(
    "/v1/customers/{customer_id:str}/journey/stage",
    opt=WRITE,
    tags=["customers"],
    operation_id="setCustomerStage",
    summary="Move a customer to a stage",
    status_code=200,
    responses={
        200: ResponseSpec(data_container=CustomerJourney, description="The journey after the move"),
        **problem_responses(401, 403, 404, 422, 429),
    },
)
async def set_customer_stage(
    request: Request[Any, Any, Any],
    state: State,
    customer_id: FromPath[str],
    data: JSONBody[StageMoveIn],
) -> Response[bytes]:
    """Set the stage by hand, backwards too; the move is recorded with the credential that made
    it and the reason. A move to one of the six stages also resets how far the customer got
    (``reached_stage``), so drift and later touchpoints continue from there. Moving to the
    current stage changes nothing. Send an ``Idempotency-Key`` to retry safely."""
    body = await request.body()
    principal = principal_of(request)
    reason = data.reason.strip()
    if not reason:
        raise Problem(
            "validation",
            "1 field(s) failed validation.",
            errors=[FieldError("$.reason", "must not be blank")],
        )

    async def work(conn: TenantConn) -> tuple[int, bytes]:
        ref = await customer_ref_or_404(conn, customer_id)
        current = await conn.fetchrow(
            f"SELECT {PROFILE_COLUMNS} FROM customers c WHERE c.id = $1 FOR UPDATE", ref
        )
        if current is None:
            raise not_found(customer_id)
        if current["stage"] != data.stage:
            _, rules = await current_rules(conn, principal.tenant.schema)
            since: datetime | None = current["stage_since"]
            now = datetime.now(UTC)
            move = Move(
                ref=ref,
                from_stage=current["stage"],
                to_stage=data.stage,
                reached=data.stage if data.stage in STAGES else current["reached_stage"],
                # Never dated before the stage it leaves began (that may be a touchpoint sent
                # with a time slightly ahead), so the history stays in order.
                at=max(now, since) if since is not None else now,
                event_id=None,
                # Until the rules give more than they do now, touchpoints keep this stage.
                basis=forward_stage(rules, aggregates_of(current), now),
            )
            await record_moves(
                conn, [move], cause="manual", actor=principal.credential_id, reason=reason
            )
        return 200, _encode(await journey_of(conn, ref, customer_id))

    route = f"POST /v1/customers/{customer_id}/journey/stage"
    return await idempotent_json(request, state.db, principal.tenant, route, body, work)


journey_routes = [get_customer_journey, set_customer_stage]
