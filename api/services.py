"""The long-lived objects a worker process builds once: credentials, tokens, rate limits."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from litestar.datastructures import State

from api.auth.credentials import Authenticator
from api.auth.rate_limit import RateLimit, build_rate_limiter
from api.auth.revocations import RevocationFeed
from api.auth.secrets import Keyring
from api.auth.tokens import token_service
from api.billing.accounts import Entitlements, PlanLimits
from api.billing.plans import plan_book
from api.config import Settings
from api.db import Database

log = logging.getLogger("sjaak.services")
LAST_USED_FLUSH_SECONDS = 30.0


def install_services(state: State, settings: Settings, db: Database, keyring: Keyring) -> None:
    """Put the database and everything built on it into the app state."""
    tokens = token_service(settings, db, keyring)
    state.db = db
    state.keyring = keyring
    state.tokens = tokens
    state.authenticator = Authenticator(
        db, keyring, tokens, RevocationFeed(db, settings.revocation_poll_seconds)
    )
    state.rate_limiter = build_rate_limiter(settings.redis_url)
    # Plans and status, kept as long as revocations may take to reach this process.
    state.entitlements = Entitlements(db, plan_book(settings), ttl=settings.revocation_poll_seconds)
    state.limits = PlanLimits(
        credential=RateLimit(
            per_second=settings.rate_limit_per_second, burst=settings.rate_limit_burst
        ),
        entitlements=state.entitlements,
    )


async def run_background(state: State) -> None:
    """Periodic chores of an API worker; cancelled at shutdown."""
    authenticator: Authenticator = state.authenticator
    while True:
        await asyncio.sleep(LAST_USED_FLUSH_SECONDS)
        await authenticator.flush_last_used()


async def stop_services(state: State, background: asyncio.Task[None] | None) -> None:
    if background is not None:
        background.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await background
    authenticator: Authenticator = state.authenticator
    await authenticator.flush_last_used()
    await state.rate_limiter.close()
