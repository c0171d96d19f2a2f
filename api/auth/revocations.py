"""A feed of revocations that every worker polls.

Verified credentials are cached in each process so the hot path costs no extra round trip. When a
key or token is revoked, or a shop suspended, a row goes into ``sjaak.revocations``; each worker
reads the new rows at most every ``revocation_poll_seconds`` and drops what they name, so a
revocation takes effect everywhere within that bound, and at once in the revoking process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from api.db import ControlConn, Database

RevocationKind = Literal["api_key", "access_token", "tenant", "oauth_client"]


async def record_revocation(
    conn: ControlConn, kind: RevocationKind, subject: str, expires_at: datetime | None = None
) -> None:
    await conn.execute(
        "INSERT INTO sjaak.revocations (kind, subject, expires_at) VALUES ($1, $2, $3)",
        kind,
        subject,
        expires_at,
    )


@dataclass(frozen=True)
class Revocation:
    kind: RevocationKind
    subject: str


class RevocationFeed:
    """Reads new revocations no more often than ``interval`` seconds."""

    def __init__(
        self, db: Database, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._db = db
        self._interval = interval
        self._clock = clock
        self._last_id: int | None = None
        self._next_poll = 0.0

    def due(self) -> bool:
        return self._clock() >= self._next_poll

    async def poll(self) -> list[Revocation]:
        """New revocations since the last poll (none on the first: caches start empty)."""
        self._next_poll = self._clock() + self._interval
        async with self._db.control() as conn:
            if self._last_id is None:
                self._last_id = await conn.fetchval(
                    "SELECT coalesce(max(id), 0) FROM sjaak.revocations"
                )
                return []
            rows = await conn.fetch(
                "SELECT id, kind, subject FROM sjaak.revocations WHERE id > $1 ORDER BY id",
                self._last_id,
            )
        if rows:
            self._last_id = rows[-1]["id"]
        return [Revocation(kind=r["kind"], subject=r["subject"]) for r in rows]

    async def revoked_access_tokens(self) -> dict[str, float]:
        """Every access-token ``jti`` revoked and not yet expired, with its expiry (epoch)."""
        async with self._db.control() as conn:
            rows = await conn.fetch(
                "SELECT subject, extract(epoch FROM expires_at)::float8 AS expires"
                " FROM sjaak.revocations WHERE kind = 'access_token' AND expires_at > now()"
            )
        return {r["subject"]: r["expires"] for r in rows}

    async def recently_revoked_clients(self, within_seconds: int) -> list[str]:
        """Clients revoked recently enough that tokens they got may still be alive."""
        async with self._db.control() as conn:
            rows = await conn.fetch(
                "SELECT subject FROM sjaak.revocations WHERE kind = 'oauth_client'"
                " AND created_at > now() - make_interval(secs => $1)",
                float(within_seconds),
            )
        return [r["subject"] for r in rows]
