"""The background worker: ``python -m api worker``.

For now it runs the platform's periodic chores; the job queue (webhook deliveries, meter events,
points expiry …) joins it with the issues that need one. Every chore is idempotent and safe to run
on several workers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from api.auth.secrets import Keyring
from api.auth.tokens import token_service
from api.config import Settings
from api.db import Database
from api.journey.drift import apply_drift_all_shops
from api.journey.rfm import recompute_rfm_all_shops

log = logging.getLogger("sjaak.worker")


@dataclass
class Chore:
    name: str
    every_seconds: float
    run: Callable[[], Awaitable[int]]
    next_run: float = field(default=0.0)


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
            deleted += int(status.rsplit(" ", 1)[-1])
    return deleted


def chores(settings: Settings, db: Database, keyring: Keyring) -> list[Chore]:
    tokens = token_service(settings, db, keyring)

    async def rotate_signing_keys() -> int:
        # Loading makes a new signing key when the newest one is due, so keys rotate on time
        # even when no API worker happens to reload in that hour.
        await tokens.load()
        return 0

    return [
        Chore("prune-expired-credentials", 3600, lambda: prune_expired_credentials(db)),
        Chore("rotate-signing-keys", 3600, rotate_signing_keys),
        Chore("journey-drift", 3600, lambda: apply_drift_all_shops(db)),
        Chore("rfm-recompute", 3600, lambda: recompute_rfm_all_shops(db)),
    ]


async def run_worker(
    chore_list: list[Chore], stop: asyncio.Event, clock: Callable[[], float] = time.monotonic
) -> None:
    """Run each chore when due until ``stop`` is set; a failing chore is logged, then retried."""
    log.info("worker started", extra={"chores": [c.name for c in chore_list]})
    while not stop.is_set():
        for chore in chore_list:
            if clock() < chore.next_run:
                continue
            try:
                changed = await chore.run()
                log.info("chore done", extra={"chore": chore.name, "rows": changed})
            except Exception:
                log.exception("chore failed; will retry", extra={"chore": chore.name})
            chore.next_run = clock() + chore.every_seconds
        wake = min(c.next_run for c in chore_list) - clock()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, wake))
    log.info("worker stopped")
