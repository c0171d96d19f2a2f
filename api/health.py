"""Liveness and readiness, for load balancers and orchestrators."""

from __future__ import annotations

import msgspec
from litestar import get
from litestar.datastructures import State

from api.db import Database
from api.db.migrate import MigrationError, MigrationSet, migration_status
from api.errors import Problem, problem_responses


class Health(msgspec.Struct):
    status: str


class Readiness(msgspec.Struct):
    status: str
    control_schema_version: int
    tenant_schema_version: int
    shops: int


@get(
    "/health",
    summary="Liveness",
    tags=["operations"],
    opt={"public": True},
    operation_id="getHealth",
)
async def health() -> Health:
    """The process is alive and serving; says nothing about the database."""
    return Health(status="ok")


@get(
    "/ready",
    operation_id="getReadiness",
    summary="Readiness",
    tags=["operations"],
    opt={"public": True},
    responses=problem_responses(503),
)
async def ready(state: State) -> Readiness:
    """Ready when the database answers and the control schema and every shop are migrated."""
    db: Database = state.db
    migrations: MigrationSet = state.migrations
    if not await db.ping():
        raise Problem("unavailable", "The database does not answer.")
    try:
        status = await migration_status(db, migrations)
    except (MigrationError, OSError) as exc:
        raise Problem("unavailable", f"Cannot read the migration state: {exc}") from exc
    if status.control_version < status.control_latest:
        raise Problem(
            "unavailable",
            f"The control schema is at migration {status.control_version}, this code needs "
            f"{status.control_latest}; run `python -m api migrate`.",
        )
    if status.shops_behind:
        raise Problem(
            "unavailable",
            f"{status.shops_behind} shop(s) are behind tenant migration {status.tenant_latest}; "
            "run `python -m api migrate`.",
        )
    return Readiness(
        status="ready",
        control_schema_version=status.control_version,
        tenant_schema_version=status.tenant_latest,
        shops=sum(status.shops_by_version.values()),
    )
