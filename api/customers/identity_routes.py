"""Identify, merge, erase and export: the routes that change who a profile is."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody

from api.auth.guards import principal_of
from api.customers import linking, privacy
from api.customers.profiles import (
    customer_by_ref,
    customer_ref_or_404,
)
from api.customers.schemas import TraitsUpdate
from api.customers.traits import update_traits, validated_writes
from api.db import TenantConn, in_tenant
from api.errors import problem_responses
from api.idempotency import idempotent_json
from api.journey import stages
from api.touchpoints.schemas import Text

WRITE = {"scopes": ("customers:write",)}
_encode = msgspec.json.Encoder().encode


class IdentifyIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    anonymous_id: Text
    customer_id: Text
    #: Optional traits to apply in the same transaction (``set`` / ``set_once``).
    traits: TraitsUpdate | None = None


class MergeIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: The customer to absorb; its id keeps resolving to the customer in the path.
    customer_id: Text


class Erasure(msgspec.Struct, frozen=True, kw_only=True):
    object: str = "customer_erasure"
    customer_id: str
    profiles: int
    ids: int
    touchpoints_removed: int
    accounting_records_kept: int


@post(
    "/v1/customers/identify",
    opt=WRITE,
    tags=["customers"],
    operation_id="identifyCustomer",
    summary="Tie an anonymous visitor to a customer",
    status_code=200,
    responses=problem_responses(401, 403, 409, 422, 429),
)
async def identify_customer(
    request: Request[Any, Any, Any], state: State, data: JSONBody[IdentifyIn]
) -> Response[bytes]:
    """The anonymous history (and anything sent later under ``anonymous_id``) joins
    ``customer_id``, created if new. Repeating it changes nothing. An anonymous id that already
    belongs to another known customer is a 409: merge such customers explicitly."""
    body = await request.body()
    tenant, actor = principal_of(request).tenant, principal_of(request).credential_id
    anonymous_id = linking.checked_id(data.anonymous_id, "$.anonymous_id")
    customer_id = linking.checked_id(data.customer_id, "$.customer_id")
    writes = validated_writes(data.traits) if data.traits is not None else None

    async def work(conn: TenantConn) -> tuple[int, bytes]:
        ref = await linking.identify(conn, anonymous_id, customer_id)
        await stages.reevaluate(conn, tenant.schema, ref, cause="merge", actor=actor)
        if writes is not None:
            customer = await update_traits(conn, customer_id, writes)
        else:
            customer = await customer_by_ref(conn, ref, customer_id)
        return 200, _encode(customer)

    return await idempotent_json(
        request, state.db, principal_of(request).tenant, "POST /v1/customers/identify", body, work
    )


@post(
    "/v1/customers/{customer_id:str}/merge",
    opt=WRITE,
    tags=["customers"],
    operation_id="mergeCustomers",
    summary="Merge another customer into this one",
    status_code=200,
    responses=problem_responses(401, 403, 404, 422, 429),
)
async def merge_customers(
    request: Request[Any, Any, Any],
    state: State,
    customer_id: FromPath[str],
    data: JSONBody[MergeIn],
) -> Response[bytes]:
    """``data.customer_id`` is folded into the customer in the path: its ids, touchpoints,
    counts and missing traits move; nothing is lost or counted twice. Afterwards the absorbed
    id resolves to this customer on every read and write."""
    body = await request.body()
    tenant, actor = principal_of(request).tenant, principal_of(request).credential_id
    absorbed_id = data.customer_id

    async def work(conn: TenantConn) -> tuple[int, bytes]:
        ref = await linking.merge(conn, customer_id, absorbed_id)
        await stages.reevaluate(conn, tenant.schema, ref, cause="merge", actor=actor)
        return 200, _encode(await customer_by_ref(conn, ref, customer_id))

    route = f"POST /v1/customers/{customer_id}/merge"
    return await idempotent_json(request, state.db, principal_of(request).tenant, route, body, work)


@delete(
    "/v1/customers/{customer_id:str}",
    opt=WRITE,
    tags=["customers"],
    operation_id="eraseCustomer",
    summary="Erase a customer (right to be forgotten)",
    status_code=200,
    responses=problem_responses(401, 403, 404, 429),
)
async def erase_customer(
    request: Request[Any, Any, Any], state: State, customer_id: FromPath[str]
) -> Erasure:
    """Removes the profile, its ids and touchpoints from the shop. Purchases and refunds are
    kept for the books, anonymised. The ids are suppressed: later events naming them are
    rejected, so the person is not recreated."""

    async def work(conn: TenantConn) -> Erasure:
        ref = await customer_ref_or_404(conn, customer_id)
        counts = await privacy.erase(conn, ref)
        return msgspec.convert({"customer_id": customer_id, **counts}, Erasure)

    return await in_tenant(state.db, principal_of(request).tenant, work)


@get(
    "/v1/customers/{customer_id:str}/export",
    opt={"scopes": ("customers:read",)},
    tags=["customers"],
    operation_id="exportCustomer",
    summary="Everything held about a customer",
    responses=problem_responses(401, 403, 404, 429),
)
async def export_customer(
    request: Request[Any, Any, Any], state: State, customer_id: FromPath[str]
) -> dict[str, Any]:
    """The profile (and any merged into it), every id and every touchpoint, as JSON."""

    async def work(conn: TenantConn) -> dict[str, Any]:
        ref = await customer_ref_or_404(conn, customer_id)
        return {
            "object": "customer_export",
            "customer_id": customer_id,
            **await privacy.export(conn, ref),
        }

    return await in_tenant(state.db, principal_of(request).tenant, work)


identity_routes = [identify_customer, merge_customers, erase_customer, export_customer]
