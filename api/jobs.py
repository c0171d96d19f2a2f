"""The worker's task registry: what runs periodically, what can be queued, and how to queue it.

- A **periodic job** is a line in :func:`periodic_jobs`: a name, a cron expression (UTC; five
  fields, or six with seconds last) and ``run(job) -> rows changed``. Exactly one worker runs it
  per tick, however many workers there are; a schedule never run before runs as soon as a worker
  starts. A failure is logged and the job runs again at its next tick, so it must be idempotent.
- A **queued job** is a line in :func:`queued_jobs`: an entrypoint name and
  ``run(job, payload)``. :func:`enqueue` adds one, on the caller's connection and inside the
  caller's transaction; a failure is logged and retried with backoff, then kept as ``failed``.

Domain modules are imported inside the two registry functions, so any of them may import
:func:`enqueue` from here without an import cycle.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from pgqueuer.adapters.persistence.qb import QueryQueueBuilder

from api.auth.secrets import Keyring
from api.config import Settings
from api.db import Database, rows_affected
from api.db.pool import PooledConnection
from api.db.queue import QUEUE_NAMES


@dataclass(frozen=True)
class JobContext:
    """What every job is given: the worker's settings, database and keyring."""

    settings: Settings
    db: Database
    keyring: Keyring


@dataclass(frozen=True)
class PeriodicJob:
    """``run`` on the ``cron`` schedule; it returns how many rows it changed (for the log)."""

    name: str
    cron: str
    run: Callable[[JobContext], Awaitable[int]]


@dataclass(frozen=True)
class QueuedJob:
    """``run(job, payload)`` for each job enqueued under ``entrypoint``.

    A job that raises is retried with exponential backoff (1 s, 2 s, 4 s … at most 5 min) until
    ``max_attempts`` retries have failed; then it stays in ``sjaak.pgqueuer`` with status
    ``failed`` for inspection. ``concurrency_limit`` (0: none) caps how many run at once across
    all workers.
    """

    entrypoint: str
    run: Callable[[JobContext, bytes | None], Awaitable[None]]
    max_attempts: int = 5
    concurrency_limit: int = 0


def periodic_jobs() -> list[PeriodicJob]:
    """Every periodic job. To add one, add a line; the minutes are staggered to spread load."""
    from api.billing import jobs as billing
    from api.idempotency import prune_expired_keys
    from api.journey.drift import apply_drift_all_shops
    from api.journey.rfm import recompute_rfm_all_shops
    from api.loyalty.jobs import loyalty_chores_all_shops
    from api.tenants.fanout import in_every_shop
    from api.webhooks.dispatch import dispatch_all_shops, prune_all_shops

    return [
        PeriodicJob("rotate-signing-keys", "0 * * * *", rotate_signing_keys),
        PeriodicJob(
            "prune-expired-credentials", "5 * * * *", lambda job: prune_expired_credentials(job.db)
        ),
        PeriodicJob("journey-drift", "15 * * * *", lambda job: apply_drift_all_shops(job.db)),
        PeriodicJob("rfm-recompute", "30 * * * *", lambda job: recompute_rfm_all_shops(job.db)),
        PeriodicJob(
            "prune-idempotency-keys",
            "45 * * * *",
            lambda job: in_every_shop(
                job.db, "prune-idempotency-keys", lambda conn, _: prune_expired_keys(conn)
            ),
        ),
        PeriodicJob("loyalty", "* * * * *", lambda job: loyalty_chores_all_shops(job.db)),
        PeriodicJob("webhooks-dispatch", "* * * * * */5", lambda job: dispatch_all_shops(job.db)),
        PeriodicJob("prune-webhook-events", "50 * * * *", lambda job: prune_all_shops(job.db)),
        *billing.periodic(),
    ]


def queued_jobs() -> list[QueuedJob]:
    """Every entrypoint :func:`enqueue` may name."""
    from api.billing import jobs as billing
    from api.offers.triggers import DECIDE_ENTRYPOINT, decide_job
    from api.webhooks.delivery import delivery_job

    return [QueuedJob(DECIDE_ENTRYPOINT, decide_job), delivery_job(), *billing.queued()]


_ENQUEUE = QueryQueueBuilder(QUEUE_NAMES).build_enqueue_query("raise")
_ENQUEUE_UNLESS_PENDING = QueryQueueBuilder(QUEUE_NAMES).build_enqueue_query("skip")


async def enqueue(
    conn: PooledConnection,
    entrypoint: str,
    payload: bytes | None = None,
    *,
    delay: timedelta = timedelta(0),
    dedupe_key: str | None = None,
    priority: int = 0,
) -> int | None:
    """Queue a job for ``entrypoint`` (a name in :func:`queued_jobs`) and return its id.

    Runs on ``conn`` (a ``ControlConn`` or ``TenantConn``), so inside the caller's transaction the
    job exists only if that transaction commits, and workers are woken at the commit. ``delay``
    holds it back; higher ``priority`` runs first. With ``dedupe_key``, nothing is added while a
    job with the same key is still queued or running, and the answer is ``None``.

    This is pgqueuer's own enqueue statement for the pinned version. Its ``Queries.enqueue`` is not
    called because it passes ``jsonb`` as JSON text, which the msgspec codec on Sjaak's pool would
    store as a JSON string; the job's headers are left NULL instead.
    """
    rows = await conn.fetch(
        _ENQUEUE if dedupe_key is None else _ENQUEUE_UNLESS_PENDING,
        [priority],
        [entrypoint],
        [payload],
        [delay],
        [dedupe_key],
        [None],
    )
    return int(rows[0]["id"]) if rows else None


# The platform's own chores; the domains' live next to their code.


async def prune_expired_credentials(db: Database) -> int:
    """Delete what can no longer matter: revocation notices a day old whose tokens have expired,
    refresh tokens and authorization codes expired a day ago. Returns rows deleted."""
    async with db.control() as conn:
        deleted = 0
        for statement in (
            "DELETE FROM sjaak.revocations WHERE created_at < now() - interval '1 day'"
            " AND (expires_at IS NULL OR expires_at < now())",
            "DELETE FROM sjaak.oauth_refresh_tokens WHERE expires_at < now() - interval '1 day'",
            "DELETE FROM sjaak.oauth_authorization_codes"
            " WHERE expires_at < now() - interval '1 day'",
        ):
            status = await conn.execute(statement)
            deleted += rows_affected(status)
    return deleted


async def rotate_signing_keys(job: JobContext) -> int:
    """Loading the key set makes a new signing key when the newest one is due, so keys rotate on
    time even when no API process happens to reload in that hour."""
    from api.auth.tokens import token_service

    await token_service(job.settings, job.db, job.keyring).load()
    return 0
