"""The connection pool and the control-schema transaction.

Nothing outside ``api.db`` acquires a connection: tenant data goes through
:mod:`api.db.tenant`, global data through :meth:`Database.control`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, NewType, TypeAlias

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

#: What the pool hands out (the proxy is generic only in the type stubs).
if TYPE_CHECKING:
    PooledConnection: TypeAlias = PoolConnectionProxy[asyncpg.Record]
else:
    PooledConnection = PoolConnectionProxy
#: A connection inside a control-schema transaction (default search path; SQL names ``sjaak.``).
ControlConn = NewType("ControlConn", PooledConnection)

_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode


async def _init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    # jsonb travels as msgspec-encoded text: faster than the stdlib json codec.
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name,
            schema="pg_catalog",
            encoder=lambda value: _json_encode(value).decode(),
            decoder=_json_decode,
            format="text",
        )


class SjaakConnection(asyncpg.Connection):
    """Skips asyncpg's session reset on release (one round trip per request).

    Nothing in Sjaak sets session state: search path, timeouts and locks are transaction-local,
    and the one session advisory lock (migrations) is released explicitly. An open transaction is
    still rolled back on release, as asyncpg always does.
    """

    def get_reset_query(self) -> str:
        return ""


class Database:
    """An asyncpg pool plus the rules for using it."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], statement_timeout_ms: int) -> None:
        self.pool = pool
        self.statement_timeout_ms = statement_timeout_ms

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        statement_timeout_ms: int = 5000,
    ) -> Database:
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            connection_class=SjaakConnection,
            server_settings={"application_name": "sjaak"},
        )
        return cls(pool, statement_timeout_ms)

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[PooledConnection]:
        """A raw connection, for ``api.db`` internals only (migrations, locks)."""
        async with self.pool.acquire() as conn:
            yield conn

    @asynccontextmanager
    async def control(self) -> AsyncIterator[ControlConn]:
        """A transaction on the control schema with the statement timeout applied."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL statement_timeout = {int(self.statement_timeout_ms)}")
            yield ControlConn(conn)

    async def ping(self) -> bool:
        try:
            async with self.pool.acquire(timeout=2) as conn:
                return bool(await conn.fetchval("SELECT true", timeout=2))
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False


def rows_affected(status: str) -> int:
    """How many rows a command touched, from its status tag (``DELETE 3``, ``INSERT 0 5``)."""
    return int(status.rsplit(" ", 1)[-1])
