"""The ``webhook-delivery`` job: one attempt at one delivery, then its record and what follows.

An attempt is claimed (a short lease on the delivery row, so a duplicate job cannot send it
twice at once), sent outside any transaction (:mod:`api.webhooks.outbound`), and recorded in a
second transaction together with its consequence: success; or, for an automatic delivery, the
next attempt queued after an exponential, jittered delay, until 3 days have passed; and the
endpoint disabled, with a ``webhook_endpoint.disabled`` event, once its attempts have failed for
3 days running. Manual redeliveries and test events get one attempt and never disable anything.

Delivery is at least once: a worker that dies between sending and recording sends again, with
the same event id, which is what receivers dedupe on.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import msgspec

from api.db import Database, Tenant, TenantConn, in_tenant
from api.jobs import JobContext, QueuedJob
from api.tenants.lifecycle import TenantNotFound, get_tenant
from api.webhooks import outbound
from api.webhooks.dispatch import ENTRYPOINT, DeliveryJob, enqueue_deliveries
from api.webhooks.endpoints import decrypt_secrets
from api.webhooks.events import DISABLED_EVENT, publish
from api.webhooks.signing import SIGNATURE_HEADER, signature_header

log = logging.getLogger("sjaak.webhooks")

#: How long a claimed attempt may take before another job may send it (well over the deadline).
LEASE = timedelta(seconds=60)
#: Delivery jobs running at once, across all workers.
CONCURRENCY = 50
#: How long a worker trusts its answer to "is this shop active?".
SHOP_CACHE_SECONDS = 5.0


@dataclass(frozen=True)
class RetryPolicy:
    """When an automatic delivery is tried again, when it is given up, when its endpoint is
    disabled. Attempt ``n`` (from 1) failing waits ``first_delay * 2**(n-1)``, at most
    ``max_delay``, times a random factor within ``1 ± jitter``."""

    first_delay: timedelta = timedelta(seconds=30)
    max_delay: timedelta = timedelta(hours=6)
    jitter: float = 0.25
    give_up_after: timedelta = timedelta(days=3)
    #: Disabled when every automatic attempt for this long has failed, and at least
    #: ``disable_min_failures`` in a row.
    disable_after: timedelta = timedelta(days=3)
    disable_min_failures: int = 5

    def delay(self, failed_attempts: int) -> timedelta:
        base = min(self.first_delay * (1 << min(max(failed_attempts - 1, 0), 40)), self.max_delay)
        factor = secrets.SystemRandom().uniform(1 - self.jitter, 1 + self.jitter)
        return base * factor


DEFAULT_POLICY = RetryPolicy()


class EventEnvelope(msgspec.Struct, frozen=True):
    """The body of every delivery."""

    id: str
    type: str
    created_at: datetime
    occurred_at: datetime
    data: Any


@dataclass(frozen=True)
class Claim:
    delivery_id: str
    attempt: int
    endpoint_id: str
    trigger: str
    created_at: datetime
    url: str
    secret: bytes
    previous_secret: bytes | None
    envelope: EventEnvelope


_encode = msgspec.json.Encoder().encode

_CLAIM_SQL = """
WITH claimed AS (
    UPDATE webhook_deliveries SET leased_until = now() + $3::interval
    WHERE id = $1 AND status = 'pending' AND attempts = $2 - 1
        AND (leased_until IS NULL OR leased_until < now())
    RETURNING id, endpoint_id, event_id, trigger, created_at
)
SELECT c.id, c.endpoint_id, c.trigger, c.created_at, e.url, e.enabled, e.secret,
    CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END AS previous_secret,
    ev.id AS event_id, ev.type, ev.data, ev.occurred_at, ev.created_at AS event_created_at
FROM claimed c
JOIN webhook_endpoints e ON e.id = c.endpoint_id
JOIN webhook_events ev ON ev.id = c.event_id
"""
_CANCEL_SQL = """
UPDATE webhook_deliveries SET status = 'cancelled', finished_at = now(), next_attempt_at = NULL,
    leased_until = NULL
WHERE id = $1
"""
_ATTEMPT_SQL = """
INSERT INTO webhook_attempts (delivery_id, number, attempted_at, url, address, request_headers,
    request_body, response_status, response_body, duration_ms, error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (delivery_id, number) DO NOTHING
"""
_FINISH_SQL = """
UPDATE webhook_deliveries SET status = $2, attempts = $3, finished_at = now(),
    next_attempt_at = NULL, leased_until = NULL
WHERE id = $1
"""
_RETRY_SQL = """
UPDATE webhook_deliveries SET attempts = $2, next_attempt_at = $3, leased_until = NULL
WHERE id = $1
"""
_SUCCEEDED_SQL = """
UPDATE webhook_endpoints SET failing_since = NULL, consecutive_failures = 0
WHERE id = $1 AND (failing_since IS NOT NULL OR consecutive_failures > 0)
"""
_FAILED_SQL = """
UPDATE webhook_endpoints SET consecutive_failures = consecutive_failures + 1,
    failing_since = coalesce(failing_since, $2)
WHERE id = $1 AND enabled
RETURNING url, failing_since, consecutive_failures
"""
_DISABLE_SQL = """
UPDATE webhook_endpoints SET enabled = false, disabled_reason = 'sustained_failure',
    disabled_at = $2, updated_at = $2
WHERE id = $1 AND enabled
"""
_CANCEL_PENDING_SQL = """
UPDATE webhook_deliveries SET status = 'cancelled', finished_at = now(), next_attempt_at = NULL
WHERE endpoint_id = $1 AND status = 'pending' AND trigger = 'event' AND id <> $2
"""


def delivery_job(policy: RetryPolicy = DEFAULT_POLICY) -> QueuedJob:
    """The queued job that sends deliveries, for :func:`api.jobs.queued_jobs`. A database error
    raises, and pgqueuer retries the job; a failed HTTP attempt is recorded and retried here."""
    return QueuedJob(
        ENTRYPOINT,
        functools.partial(deliver, policy=policy),
        max_attempts=5,
        concurrency_limit=CONCURRENCY,
    )


async def deliver(
    context: JobContext, payload: bytes | None, *, policy: RetryPolicy = DEFAULT_POLICY
) -> None:
    """One attempt of the delivery named in ``payload`` (a :class:`DeliveryJob`)."""
    job = msgspec.json.decode(payload or b"", type=DeliveryJob)
    tenant = await _serving_shop(context.db, job)
    if tenant is None:
        return

    async def claim(conn: TenantConn) -> Claim | None:
        return await _claim(conn, job)

    claimed = await in_tenant(context.db, tenant, claim)
    if claimed is None:
        return
    attempted_at = datetime.now(UTC)
    body = _encode(claimed.envelope)
    signing = decrypt_secrets(context.keyring, claimed.secret, claimed.previous_secret)
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature_header(int(time.time()), body, signing),
        "Sjaak-Event-Id": claimed.envelope.id,
        "Sjaak-Delivery-Id": claimed.delivery_id,
        "Sjaak-Delivery-Attempt": str(claimed.attempt),
    }
    outcome = await outbound.post(
        claimed.url,
        headers,
        body,
        allow_http=context.settings.environment != "production",
        allow_loopback=context.settings.webhooks_allow_loopback,
    )

    async def record(conn: TenantConn) -> None:
        await _record(conn, tenant, claimed, attempted_at, headers, body, outcome, policy)

    await in_tenant(context.db, tenant, record)
    log.info(
        "webhook attempt",
        extra={
            "delivery_id": claimed.delivery_id,
            "event_id": claimed.envelope.id,
            "attempt": claimed.attempt,
            "status": outcome.status,
            "error": outcome.error,
            "ms": outcome.duration_ms,
            "schema": tenant.schema,
        },
    )


#: Shops looked up recently: tenant id -> (until when the answer holds, the shop or None).
_shops: dict[UUID, tuple[float, Tenant | None]] = {}


async def _serving_shop(db: Database, job: DeliveryJob) -> Tenant | None:
    """The job's shop while it is active. A suspended shop's deliveries stay pending (the
    dispatcher queues them again once it is resumed); a deleted shop's are gone with it. The
    answer is kept for :data:`SHOP_CACHE_SECONDS`, so a burst of deliveries looks it up once."""
    now = time.monotonic()
    cached = _shops.get(job.tenant)
    if cached is None or cached[0] < now:
        try:
            record = await get_tenant(db, job.tenant)
            shop = record.as_tenant() if record.status == "active" else None
        except TenantNotFound:
            shop = None
        if len(_shops) > 10_000:
            _shops.clear()
        cached = _shops[job.tenant] = (now + SHOP_CACHE_SECONDS, shop)
    shop = cached[1]
    return shop if shop is not None and shop.schema == job.schema else None


async def _claim(conn: TenantConn, job: DeliveryJob) -> Claim | None:
    row = await conn.fetchrow(_CLAIM_SQL, job.delivery, job.attempt, LEASE)
    if row is None:
        return None  # sent already, being sent, finished, or gone with its endpoint
    if row["trigger"] == "event" and not row["enabled"]:
        await conn.execute(_CANCEL_SQL, job.delivery)
        return None
    return Claim(
        delivery_id=row["id"],
        attempt=job.attempt,
        endpoint_id=row["endpoint_id"],
        trigger=row["trigger"],
        created_at=row["created_at"],
        url=row["url"],
        secret=row["secret"],
        previous_secret=row["previous_secret"],
        envelope=EventEnvelope(
            id=row["event_id"],
            type=row["type"],
            created_at=row["event_created_at"],
            occurred_at=row["occurred_at"],
            data=row["data"],
        ),
    )


async def _record(
    conn: TenantConn,
    tenant: Tenant,
    claim: Claim,
    attempted_at: datetime,
    headers: dict[str, str],
    body: bytes,
    outcome: outbound.Outcome,
    policy: RetryPolicy,
) -> None:
    await conn.execute(
        _ATTEMPT_SQL,
        claim.delivery_id,
        claim.attempt,
        attempted_at,
        claim.url,
        outcome.address,
        headers,
        body.decode(),
        outcome.status,
        outcome.body,
        outcome.duration_ms,
        outcome.error,
    )
    if outcome.ok:
        await conn.execute(_FINISH_SQL, claim.delivery_id, "succeeded", claim.attempt)
        await conn.execute(_SUCCEEDED_SQL, claim.endpoint_id)
        return
    if claim.trigger != "event":
        await conn.execute(_FINISH_SQL, claim.delivery_id, "failed", claim.attempt)
        return
    now = datetime.now(UTC)
    streak = await conn.fetchrow(_FAILED_SQL, claim.endpoint_id, attempted_at)
    if streak is not None and _sustained(streak, policy, now):
        await conn.execute(_FINISH_SQL, claim.delivery_id, "failed", claim.attempt)
        await _disable(conn, claim, streak, now)
        return
    delay = policy.delay(claim.attempt)
    if now + delay > claim.created_at + policy.give_up_after:
        await conn.execute(_FINISH_SQL, claim.delivery_id, "failed", claim.attempt)
        return
    await conn.execute(_RETRY_SQL, claim.delivery_id, claim.attempt, now + delay)
    await enqueue_deliveries(conn, tenant, [(claim.delivery_id, claim.attempt + 1, delay)])


def _sustained(streak: asyncpg.Record, policy: RetryPolicy, now: datetime) -> bool:
    return bool(
        streak["consecutive_failures"] >= policy.disable_min_failures
        and streak["failing_since"] <= now - policy.disable_after
    )


async def _disable(conn: TenantConn, claim: Claim, streak: asyncpg.Record, now: datetime) -> None:
    """Disable the endpoint, stop its pending automatic deliveries, and say so with an event
    (which goes to the shop's other endpoints that subscribe to it)."""
    await conn.execute(_DISABLE_SQL, claim.endpoint_id, now)
    await conn.execute(_CANCEL_PENDING_SQL, claim.endpoint_id, claim.delivery_id)
    await publish(
        conn,
        DISABLED_EVENT,
        {
            "endpoint_id": claim.endpoint_id,
            "url": streak["url"],
            "disabled_reason": "sustained_failure",
            "failing_since": streak["failing_since"],
            "consecutive_failures": streak["consecutive_failures"],
        },
        occurred_at=now,
    )
    log.warning(
        "webhook endpoint disabled after sustained failure",
        extra={
            "endpoint_id": claim.endpoint_id,
            "failing_since": streak["failing_since"].isoformat(),
            "consecutive_failures": streak["consecutive_failures"],
        },
    )
