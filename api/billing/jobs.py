"""Billing's worker jobs (registered in :mod:`api.jobs`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from api.billing.inbox import PROCESS_ENTRYPOINT, process_event, requeue_stalled
from api.billing.lifecycle import restrict_overdue
from api.billing.metering import report_all, send_due
from api.billing.plans import plan_book
from api.billing.reconcile import reconcile_all
from api.billing.stripe_client import StripeGateway, gateway_for
from api.jobs import JobContext, PeriodicJob, QueuedJob


def periodic() -> list[PeriodicJob]:
    return [
        PeriodicJob("billing-meter", "* * * * *", meter),
        PeriodicJob("billing-sweep", "*/5 * * * *", sweep),
        PeriodicJob("billing-reconcile", "55 * * * *", reconcile),
    ]


def queued() -> list[QueuedJob]:
    return [QueuedJob(PROCESS_ENTRYPOINT, stripe_event)]


def _gateway(job: JobContext) -> StripeGateway:
    gateway = gateway_for(job.settings)
    if gateway is None:
        raise RuntimeError("SJAAK_STRIPE_API_KEY is not set; Stripe cannot be reached")
    return gateway


async def meter(job: JobContext) -> int:
    """Queue new overage as meter events, then send what is due."""
    now = datetime.now(UTC)
    queued_now = await report_all(job.db, job.settings, plan_book(job.settings), now)
    gateway = gateway_for(job.settings)
    sent = await send_due(job.db, gateway) if gateway is not None else 0
    return queued_now + sent


async def sweep(job: JobContext) -> int:
    """Restrict shops whose grace period ended; queue again Stripe events left unprocessed."""
    restricted = await restrict_overdue(job.db, plan_book(job.settings))
    return restricted + await requeue_stalled(job.db)


async def reconcile(job: JobContext) -> int:
    return await reconcile_all(
        job.db, gateway_for(job.settings), job.settings, plan_book(job.settings), datetime.now(UTC)
    )


async def stripe_event(job: JobContext, payload: bytes | None) -> None:
    if not payload:
        return
    await process_event(
        job.db,
        _gateway(job),
        plan_book(job.settings),
        timedelta(days=job.settings.billing_grace_days),
        payload.decode(),
    )
