"""The background worker: ``python -m api worker``, on pgqueuer.

It runs the jobs of :mod:`api.jobs`: the periodic ones on their cron schedules and the queued
ones as they are enqueued. Any number of workers may run at once: a schedule's tick is claimed by
one worker (``FOR UPDATE SKIP LOCKED`` on ``sjaak.pgqueuer_schedules``), and so is each queued job.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from datetime import timedelta

import asyncpg
from pgqueuer import PgQueuer
from pgqueuer.adapters.drivers.asyncpg import AsyncpgPoolDriver
from pgqueuer.adapters.persistence.qb import (
    QueryBuilderEnvironment,
    QueryQueueBuilder,
    QuerySchedulerBuilder,
)
from pgqueuer.adapters.persistence.queries import Queries
from pgqueuer.executors import DatabaseRetryEntrypointExecutor
from pgqueuer.models import Channel, Job, Schedule

from api.db.queue import QUEUE_NAMES
from api.jobs import JobContext, PeriodicJob, QueuedJob, periodic_jobs, queued_jobs

log = logging.getLogger("sjaak.worker")

# A schedule row is created due now, so a job never run before runs at the first worker start
# instead of waiting for its first tick; pgqueuer's own insert (next tick) then finds it there.
_SCHEDULE_DUE_NOW = f"""
INSERT INTO {QUEUE_NAMES.qualified.schedules_table} (expression, entrypoint, next_run)
SELECT expression, entrypoint, now()
FROM unnest($1::text[], $2::text[]) AS s(expression, entrypoint)
ON CONFLICT (entrypoint, expression) DO NOTHING
"""


def queue_for(
    context: JobContext,
    pool: asyncpg.Pool[asyncpg.Record],
    periodic: Sequence[PeriodicJob],
    queued: Sequence[QueuedJob],
) -> PgQueuer:
    """A pgqueuer application over ``pool`` with every job registered."""
    queries = Queries(
        AsyncpgPoolDriver(pool),
        qbe=QueryBuilderEnvironment(QUEUE_NAMES),
        qbq=QueryQueueBuilder(QUEUE_NAMES),
        qbs=QuerySchedulerBuilder(QUEUE_NAMES),
    )
    queue = PgQueuer(queries.driver, channel=Channel(QUEUE_NAMES.channel), queries=queries)
    for chore in periodic:
        queue.schedule(chore.name, chore.cron, accepts_context=False)(
            functools.partial(run_periodic, chore, context)
        )
    for job in queued:
        queue.entrypoint(
            job.entrypoint,
            concurrency_limit=job.concurrency_limit,
            accepts_context=False,
            on_failure="hold",
            executor_factory=functools.partial(
                DatabaseRetryEntrypointExecutor, max_attempts=job.max_attempts
            ),
        )(functools.partial(run_queued, job, context))
    return queue


async def run_periodic(chore: PeriodicJob, context: JobContext, schedule: Schedule) -> None:
    """One tick of a periodic job. A failure is logged, not raised: the tick is spent either way
    and the job runs again at the next one."""
    started = time.perf_counter()
    try:
        rows = await chore.run(context)
    except Exception:
        log.exception("job failed; it runs again at its next tick", extra={"job": chore.name})
        return
    seconds = round(time.perf_counter() - started, 3)
    log.info("job done", extra={"job": chore.name, "rows": rows, "seconds": seconds})


async def run_queued(job: QueuedJob, context: JobContext, queued: Job) -> None:
    """One attempt at a queued job; pgqueuer's retry executor turns a failure into a retry."""
    try:
        await job.run(context, queued.payload)
    except Exception:
        log.warning(
            "job failed; it is retried with backoff",
            exc_info=True,
            extra={"job": job.entrypoint, "job_id": queued.id, "attempt": queued.attempts + 1},
        )
        raise
    log.info(
        "job done",
        extra={"job": job.entrypoint, "job_id": queued.id, "attempt": queued.attempts + 1},
    )


async def run_worker(
    context: JobContext,
    pool: asyncpg.Pool[asyncpg.Record],
    stop: asyncio.Event,
    *,
    periodic: Sequence[PeriodicJob] | None = None,
    queued: Sequence[QueuedJob] | None = None,
    dequeue_timeout: timedelta = timedelta(seconds=5),
) -> None:
    """Run the jobs (by default every job in :mod:`api.jobs`) until ``stop`` is set, then let the
    running ones finish. ``pool`` is a queue pool (:func:`api.db.queue.connect_queue_pool`).

    New jobs wake the worker at once (LISTEN/NOTIFY), but a retry is an UPDATE, which pgqueuer's
    trigger does not announce, and the worker may have chosen its wait before the retry was
    written: ``dequeue_timeout`` bounds how late after its backoff a retried job can start.
    """
    periodic = periodic_jobs() if periodic is None else periodic
    queued = queued_jobs() if queued is None else queued
    queue = queue_for(context, pool, periodic, queued)
    schedules = list(queue.sm.registry)
    await queue.connection.execute(
        _SCHEDULE_DUE_NOW,
        [s.expression for s in schedules],
        [s.entrypoint for s in schedules],
    )

    async def stop_on_request() -> None:
        await stop.wait()
        queue.shutdown.set()

    log.info(
        "worker started",
        extra={
            "periodic": {c.name: c.cron for c in periodic},
            "queued": [j.entrypoint for j in queued],
        },
    )
    stopper = asyncio.create_task(stop_on_request())
    try:
        await queue.run(dequeue_timeout=dequeue_timeout)
    finally:
        stopper.cancel()
    log.info("worker stopped")
