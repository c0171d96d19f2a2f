"""Run a chore in every active shop, each in its own transaction."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from api.db import Database, Tenant, TenantConn, in_tenant
from api.tenants.lifecycle import list_tenants

log = logging.getLogger("sjaak.jobs")


async def in_every_shop(
    db: Database, chore: str, work: Callable[[TenantConn, Tenant], Awaitable[int]]
) -> int:
    """``work`` in every active shop; returns the sum of what it returned. A shop that fails is
    logged and skipped, so one shop cannot stall the rest."""
    total = 0
    for record in await list_tenants(db):
        if record.status != "active":
            continue
        tenant = record.as_tenant()

        async def run(conn: TenantConn, tenant: Tenant = tenant) -> int:
            return await work(conn, tenant)

        try:
            total += await in_tenant(db, tenant, run)
        except Exception:
            log.exception(
                "a chore failed for a shop; the others go on",
                extra={"chore": chore, "tenant_id": str(record.id), "schema": record.schema_name},
            )
    return total
