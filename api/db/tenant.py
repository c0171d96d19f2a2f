"""THE way into a shop's data.

A tenant transaction sets the search path to the shop's schema *transaction-locally*, so a pooled
connection can never carry one shop's path into another's request, and it behaves the same behind
PgBouncer in transaction mode and on Citus. Repository functions take a :data:`TenantConn`, which
only this module produces, so ``mypy --strict`` rejects a tenant query on an unscoped connection.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import NewType, TypeVar
from uuid import UUID

import asyncpg
import msgspec

from api.db.pool import Database, PooledConnection
from api.db.schemas import checked_shop_schema

log = logging.getLogger("sjaak.db.tenant")

TenantConn = NewType("TenantConn", PooledConnection)
T = TypeVar("T")


class Tenant(msgspec.Struct, frozen=True):
    """The shop a request acts for, as resolved from its credential."""

    id: UUID
    schema: str


def begin_in_schema_sql(schema: str, statement_timeout_ms: int, generic_plans: bool = False) -> str:
    """One round trip: open the transaction and scope it to ``schema``.

    ``generic_plans`` suits transactions of bulk statements over arrays (ingest): PostgreSQL
    would otherwise re-plan them on every execution for no better plan, which costs as much as
    running them.
    """
    sql = (
        f"BEGIN; SET LOCAL search_path = {checked_shop_schema(schema)}; "
        f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}"
    )
    if generic_plans:
        sql += "; SET LOCAL plan_cache_mode = force_generic_plan"
    return sql


@asynccontextmanager
async def scoped_transaction(
    conn: PooledConnection, schema: str, statement_timeout_ms: int, generic_plans: bool = False
) -> AsyncIterator[TenantConn]:
    """Run a transaction on ``conn`` with the search path set to ``schema`` for it alone."""
    await conn.execute(begin_in_schema_sql(schema, statement_timeout_ms, generic_plans))
    try:
        yield TenantConn(conn)
    except BaseException:
        if not conn.is_closed():
            await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


@asynccontextmanager
async def tenant_tx(
    db: Database, tenant: Tenant, *, generic_plans: bool = False
) -> AsyncIterator[TenantConn]:
    """A transaction inside ``tenant``'s schema on a pooled connection."""
    async with (
        db.connection() as conn,
        scoped_transaction(
            conn, tenant.schema, db.statement_timeout_ms, generic_plans
        ) as tenant_conn,
    ):
        yield tenant_conn


#: Unique constraints of write-once keys that a concurrent writer may take between our check and
#: our insert (domains add theirs at import).
RACED_KEYS: set[str] = set()


async def in_tenant(
    db: Database,
    tenant: Tenant,
    work: Callable[[TenantConn], Awaitable[T]],
    *,
    generic_plans: bool = False,
) -> T:
    """Run ``work`` in a tenant transaction, retrying once on a stale cached statement, a
    deadlock (PostgreSQL aborted this transaction to let a concurrent one through), or a
    write-once key (one of :data:`RACED_KEYS`) that a concurrent transaction wrote first; the
    retry then sees that write and skips it.

    Every shop is migrated in lock-step, but while a migration is rolling out two shops' tables
    can briefly differ in shape; asyncpg then raises ``InvalidCachedStatementError`` for a
    statement prepared against the other shape (asyncpg #72). The whole transaction is replayed,
    so ``work`` must not have side effects outside the database.
    """
    try:
        async with tenant_tx(db, tenant, generic_plans=generic_plans) as conn:
            return await work(conn)
    except (
        asyncpg.InvalidCachedStatementError,
        asyncpg.DeadlockDetectedError,
        asyncpg.UniqueViolationError,
    ) as exc:
        if isinstance(exc, asyncpg.UniqueViolationError) and (
            exc.constraint_name not in RACED_KEYS
        ):
            raise
        log.info("retrying tenant transaction", extra={"reason": type(exc).__name__})
        async with tenant_tx(db, tenant, generic_plans=generic_plans) as conn:
            return await work(conn)
