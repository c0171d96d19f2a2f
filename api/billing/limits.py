"""Plan limits on what a shop may hold: campaigns and webhook endpoints.

A domain that creates one of these calls :func:`ensure_room` in the creating transaction, with
how many the shop holds now (counted under the same lock or constraint that serialises its
creations), and gets ``403 plan-limit-reached`` when the plan allows no more.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from litestar.datastructures import State

from api.billing.accounts import Entitlements
from api.billing.usage import PLAN_LIMIT
from api.db import Tenant, TenantConn
from api.errors import Problem

Resource = Literal["campaigns", "webhook_endpoints"]
_LABELS = {
    "campaigns": ("campaign", "campaigns"),
    "webhook_endpoints": ("webhook endpoint", "webhook endpoints"),
}


async def ensure_room(state: State, tenant: Tenant, resource: Resource, in_use: int) -> None:
    """Raise ``plan-limit-reached`` when the shop's plan allows no more than ``in_use``."""
    entitlements: Entitlements = state.entitlements
    plan = (await entitlements.of(tenant.id, datetime.now(UTC))).plan
    limit: int | None = getattr(plan, resource)
    if limit is not None and in_use >= limit:
        label = _LABELS[resource][limit != 1]
        raise Problem(
            PLAN_LIMIT,
            f"The {plan.name} plan allows {limit} {label}; this shop has {in_use}. Remove one,"
            " or change plan (POST /v1/billing/checkout).",
        )


#: What counts against each limit, in the shop's schema: ended campaigns do not.
_IN_USE_SQL: dict[Resource, str] = {
    "campaigns": "SELECT count(*) FROM campaigns WHERE status <> 'ended'",
    "webhook_endpoints": "SELECT count(*) FROM webhook_endpoints",
}


async def ensure_room_in(
    conn: TenantConn, state: State, tenant: Tenant, resource: Resource
) -> None:
    """:func:`ensure_room` with the count taken in ``conn``'s transaction, after a lock that
    queues the shop's concurrent creations of ``resource`` (so two cannot both take the last
    place)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"sjaak.limit.{resource}")
    in_use: int = await conn.fetchval(_IN_USE_SQL[resource])
    await ensure_room(state, tenant, resource, in_use)
