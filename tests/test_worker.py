"""The worker on pgqueuer: schedules, queued jobs, retries, several workers at once, and the
platform's own chores. Real PostgreSQL and real pgqueuer managers throughout; the jobs under test
are small recording functions registered the way :mod:`api.jobs` registers its own."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import asyncpg
import pytest
from pgqueuer.adapters.drivers.asyncpg import AsyncpgPoolDriver
from pgqueuer.adapters.persistence.qb import QueryBuilderEnvironment
from pgqueuer.adapters.persistence.queries import Queries

from api.auth import oauth_clients
from api.auth.secrets import Keyring
from api.db import Database, TenantConn, in_tenant
from api.db.migrate import migrate
from api.db.queue import QUEUE_NAMES, connect_queue_pool
from api.jobs import (
    JobContext,
    PeriodicJob,
    QueuedJob,
    enqueue,
    periodic_jobs,
    prune_expired_credentials,
    rotate_signing_keys,
)
from api.worker import run_worker
from tests.conftest import ProvisionFactory, settings_for_tests

EVERY_SECOND = "* * * * * *"


def unique(name: str) -> str:
    """Test jobs get names of their own: the shared database keeps every test's queue rows."""
    return f"test-{name}-{uuid.uuid4().hex[:8]}"


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Wait until ``check`` (a database query, say) is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(0.05)


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    async def check() -> bool:
        return condition()

    await eventually(check, timeout)


@asynccontextmanager
async def running_worker(
    db: Database,
    url: str,
    keyring: Keyring,
    *,
    periodic: Sequence[PeriodicJob] = (),
    queued: Sequence[QueuedJob] = (),
) -> AsyncIterator[None]:
    """A worker with exactly these jobs, stopped (and waited for) on the way out."""
    pool = await connect_queue_pool(url)
    stop = asyncio.Event()
    worker = asyncio.create_task(
        run_worker(
            JobContext(settings_for_tests(), db, keyring),
            pool,
            stop,
            periodic=periodic,
            queued=queued,
            dequeue_timeout=timedelta(seconds=1),
        )
    )
    try:
        yield
        assert not worker.done(), worker
    finally:
        stop.set()
        try:
            await asyncio.wait_for(worker, timeout=30)
        finally:
            await pool.close()


async def schedule_rows(db: Database, entrypoint: str) -> list[asyncpg.Record]:
    async with db.control() as conn:
        return await conn.fetch(
            "SELECT expression, status, next_run, last_run FROM sjaak.pgqueuer_schedules"
            " WHERE entrypoint = $1",
            entrypoint,
        )


async def job_statuses(db: Database, job_id: int) -> list[str]:
    async with db.control() as conn:
        rows = await conn.fetch(
            "SELECT status::text FROM sjaak.pgqueuer_log WHERE job_id = $1 ORDER BY id", job_id
        )
    return [r["status"] for r in rows]


async def test_the_queue_tables_are_exactly_what_pgqueuer_expects(
    db_url: str, db: Database
) -> None:
    pool = await connect_queue_pool(db_url)
    try:
        queries = Queries(AsyncpgPoolDriver(pool), qbe=QueryBuilderEnvironment(QUEUE_NAMES))
        plan = await queries.plan_upgrade()
    finally:
        await pool.close()
    assert plan.statements == () and plan.notes == (), "add a control migration with this plan"


async def test_every_chore_is_scheduled_and_runs_at_the_first_start(
    new_database: Callable[[], Awaitable[str]], keyring: Keyring
) -> None:
    url = await new_database()
    db = await Database.connect(url, min_size=1, max_size=6)
    try:
        await migrate(db)
        chores = periodic_jobs()
        assert {c.name for c in chores} >= {
            "prune-expired-credentials",
            "rotate-signing-keys",
            "journey-drift",
            "rfm-recompute",
        }
        pool = await connect_queue_pool(url)
        stop = asyncio.Event()
        worker = asyncio.create_task(
            run_worker(JobContext(settings_for_tests(), db, keyring), pool, stop)
        )

        async def all_ran() -> bool:
            async with db.control() as conn:
                ran = await conn.fetchval(
                    "SELECT count(*) FROM sjaak.pgqueuer_schedules"
                    " WHERE last_run IS NOT NULL AND status = 'queued'"
                )
            return bool(ran == len(chores))

        try:
            await eventually(all_ran)
        finally:
            stop.set()
            await asyncio.wait_for(worker, timeout=30)
            await pool.close()

        async with db.control() as conn:
            schedules = {
                r["entrypoint"]: r
                for r in await conn.fetch(
                    # After its last run, not after now: a 5-second chore may be due again
                    # by the time a slow worker has stopped.
                    "SELECT entrypoint, expression, next_run > last_run AS later"
                    " FROM sjaak.pgqueuer_schedules"
                )
            }
            signing = await conn.fetchval(
                "SELECT count(*) FROM sjaak.signing_keys WHERE retired_at IS NULL"
            )
        assert {name: (r["expression"], r["later"]) for name, r in schedules.items()} == {
            c.name: (c.cron, True) for c in chores
        }, "each chore is registered with its cron and waits for its next tick"
        assert signing == 1, "the signing-key chore made the first key"
    finally:
        await db.close()


async def test_a_job_enqueued_in_a_committed_transaction_is_run(
    db: Database, db_url: str, keyring: Keyring, provision: ProvisionFactory
) -> None:
    shop_a, shop_b = (await provision("Queue A")).tenant, (await provision("Queue B")).tenant
    entrypoint = unique("deliver")
    ran: list[bytes | None] = []

    async def deliver(job: JobContext, payload: bytes | None) -> None:
        ran.append(payload)

    async def enqueue_for(conn: TenantConn, payload: bytes) -> int | None:
        # In the shop's transaction: its search path is the shop's schema, the queue is sjaak's.
        return await enqueue(conn, entrypoint, payload)

    class RolledBack(Exception):
        pass

    async def enqueue_then_fail(conn: TenantConn) -> None:
        await enqueue_for(conn, b"shop b")
        raise RolledBack

    job_a = await in_tenant(db, shop_a.as_tenant(), lambda conn: enqueue_for(conn, b"shop a"))
    with pytest.raises(RolledBack):
        await in_tenant(db, shop_b.as_tenant(), enqueue_then_fail)
    async with db.control() as conn:
        queued = await conn.fetch(
            "SELECT id, payload FROM sjaak.pgqueuer WHERE entrypoint = $1", entrypoint
        )
    assert [(r["id"], r["payload"]) for r in queued] == [(job_a, b"shop a")]

    async with running_worker(db, db_url, keyring, queued=[QueuedJob(entrypoint, deliver)]):
        assert job_a is not None
        await eventually(lambda: has_status(db, job_a, "successful"))
        late = await run_in_control(db, lambda conn: enqueue(conn, entrypoint, b"late"))
        assert late is not None
        await eventually(lambda: has_status(db, late, "successful"))
    assert ran == [b"shop a", b"late"], "each committed job ran once; the rolled-back one never"


async def has_status(db: Database, job_id: int, status: str) -> bool:
    return status in await job_statuses(db, job_id)


async def run_in_control(db: Database, work: Callable[..., Awaitable[int | None]]) -> int | None:
    async with db.control() as conn:
        return await work(conn)


async def test_a_dedupe_key_keeps_one_pending_job(db: Database) -> None:
    entrypoint, key = unique("once"), uuid.uuid4().hex
    async with db.control() as conn:
        first = await enqueue(conn, entrypoint, b"1", dedupe_key=key)
        again = await enqueue(conn, entrypoint, b"2", dedupe_key=key)
        other = await enqueue(conn, entrypoint, b"3", dedupe_key=uuid.uuid4().hex)
    assert first is not None and other is not None
    assert again is None


async def test_a_failing_job_is_logged_and_retried(
    db: Database, db_url: str, keyring: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    entrypoint = unique("flaky")
    attempts: list[bytes | None] = []

    async def flaky(job: JobContext, payload: bytes | None) -> None:
        attempts.append(payload)
        if len(attempts) == 1:
            raise RuntimeError("the first attempt fails")

    job_id = await run_in_control(db, lambda conn: enqueue(conn, entrypoint, b"x"))
    assert job_id is not None
    with caplog.at_level(logging.INFO, logger="sjaak.worker"):
        async with running_worker(db, db_url, keyring, queued=[QueuedJob(entrypoint, flaky)]):
            await eventually(lambda: has_status(db, job_id, "successful"))
    assert attempts == [b"x", b"x"]
    [failure] = [
        r for r in caplog.records if r.name == "sjaak.worker" and r.levelno == logging.WARNING
    ]
    assert failure.__dict__["job"] == entrypoint and failure.__dict__["attempt"] == 1
    assert failure.exc_info and "the first attempt fails" in str(failure.exc_info[1])
    statuses = await job_statuses(db, job_id)
    assert statuses[-1] == "successful" and statuses.count("picked") == 2


async def test_a_job_that_keeps_failing_is_kept_as_failed(
    db: Database, db_url: str, keyring: Keyring
) -> None:
    entrypoint = unique("broken")
    attempts: list[bytes | None] = []

    async def broken(job: JobContext, payload: bytes | None) -> None:
        attempts.append(payload)
        raise RuntimeError("always")

    job_id = await run_in_control(db, lambda conn: enqueue(conn, entrypoint))
    assert job_id is not None
    async with running_worker(
        db, db_url, keyring, queued=[QueuedJob(entrypoint, broken, max_attempts=1)]
    ):
        await eventually(lambda: has_status(db, job_id, "failed"))
    assert len(attempts) == 2, "one retry, then it is given up"
    async with db.control() as conn:
        kept = await conn.fetchval("SELECT status::text FROM sjaak.pgqueuer WHERE id = $1", job_id)
    assert kept == "failed", "held for inspection, not deleted"


async def test_a_failing_periodic_job_is_logged_and_runs_again_at_its_next_tick(
    db: Database, db_url: str, keyring: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    name = unique("chore")
    runs: list[int] = []

    async def chore(job: JobContext) -> int:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("the first tick fails")
        return 7

    with caplog.at_level(logging.INFO, logger="sjaak.worker"):
        async with running_worker(
            db, db_url, keyring, periodic=[PeriodicJob(name, EVERY_SECOND, chore)]
        ):
            await until(lambda: len(runs) >= 2)
    ours = [r for r in caplog.records if r.name == "sjaak.worker" and getattr(r, "job", "") == name]
    assert ours[0].levelno == logging.ERROR and ours[0].exc_info
    assert any(getattr(r, "rows", None) == 7 for r in ours[1:])


async def test_two_workers_never_run_one_tick_twice(
    db: Database, db_url: str, keyring: Keyring
) -> None:
    name = unique("tick")
    ticks: list[datetime] = []

    async def tick(job: JobContext) -> int:
        # While a tick runs, its schedule row carries the time of the next one: a tick that ran
        # twice would show the same value twice.
        async with job.db.control() as conn:
            ticks.append(
                await conn.fetchval(
                    "SELECT next_run FROM sjaak.pgqueuer_schedules WHERE entrypoint = $1", name
                )
            )
        await asyncio.sleep(0.2)  # long enough for the other worker to try the same tick
        return 1

    chores = [PeriodicJob(name, EVERY_SECOND, tick)]
    async with (
        running_worker(db, db_url, keyring, periodic=chores),
        running_worker(db, db_url, keyring, periodic=chores),
    ):
        await until(lambda: len(ticks) >= 4)
    assert len(set(ticks)) == len(ticks), ticks
    [row] = await schedule_rows(db, name)
    assert row["expression"] == EVERY_SECOND


async def test_the_signing_key_chore_makes_a_key(fresh_db: Database, keyring: Keyring) -> None:
    await migrate(fresh_db)
    await rotate_signing_keys(JobContext(settings_for_tests(), fresh_db, keyring))
    async with fresh_db.control() as conn:
        signing = await conn.fetchval(
            "SELECT count(*) FROM sjaak.signing_keys WHERE retired_at IS NULL"
        )
    assert signing == 1


async def test_pruning_deletes_only_what_can_no_longer_matter(
    db: Database, keyring: Keyring, provision: ProvisionFactory
) -> None:
    shop = await provision()
    old_notice, fresh_notice, live_token_notice = (uuid.uuid4().hex for _ in range(3))
    async with db.control() as conn:
        await conn.execute(
            "INSERT INTO sjaak.revocations (kind, subject, expires_at, created_at) VALUES"
            " ('api_key', $1, NULL, now() - interval '2 days'),"
            " ('api_key', $2, NULL, now()),"
            " ('access_token', $3, now() + interval '10 minutes', now() - interval '2 days')",
            old_notice,
            fresh_notice,
            live_token_notice,
        )
        client = await oauth_clients.create_client(
            conn,
            keyring,
            tenant_id=shop.tenant.id,
            name="pruning",
            scopes=frozenset({"customers:read"}),
            grant_types=frozenset({"client_credentials"}),
        )
        await conn.execute(
            "INSERT INTO sjaak.oauth_refresh_tokens (token_hash, family_id, client_id, tenant_id,"
            " scopes, expires_at) VALUES ($1, $2, $3, $4, '{}', now() - interval '2 days'),"
            " ($5, $2, $3, $4, '{}', now() + interval '2 days')",
            b"expired-token-hash-" + uuid.uuid4().bytes,
            uuid.uuid4(),
            client.client_id,
            shop.tenant.id,
            b"live-token-hash-" + uuid.uuid4().bytes,
        )

    assert await prune_expired_credentials(db) >= 2

    async with db.control() as conn:
        subjects = {r["subject"] for r in await conn.fetch("SELECT subject FROM sjaak.revocations")}
        refresh = await conn.fetch(
            "SELECT expires_at > now() AS live FROM sjaak.oauth_refresh_tokens"
            " WHERE client_id = $1",
            client.client_id,
        )
    assert old_notice not in subjects
    assert {fresh_notice, live_token_notice} <= subjects
    assert [r["live"] for r in refresh] == [True]
