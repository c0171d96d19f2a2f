"""What every benchmark needs: a PostgreSQL to run on, machine facts, small statistics."""

from __future__ import annotations

import math
import os
import platform
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from api.db import Database
from api.db.embedded import start_embedded

EMBEDDED_KIND = "embedded scratch server, fsync off"


@dataclass(frozen=True)
class Machine:
    cpus: int
    cpu_model: str
    memory_gib: float
    python: str
    postgres: str
    server: str


@dataclass(frozen=True)
class Server:
    """Where to connect for administration, and the URL of a database on that server."""

    kind: str
    admin_url: str
    url_for: Callable[[str], str]


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@contextmanager
def postgres_server() -> Iterator[Server]:
    """The server ``BENCH_DATABASE_URL`` names, or a scratch embedded one (deleted afterwards)."""
    configured = os.environ.get("BENCH_DATABASE_URL")
    if configured:
        yield Server("BENCH_DATABASE_URL", configured, lambda name: with_database(configured, name))
        return
    scratch = tempfile.mkdtemp(prefix="sjaak-bench-")
    try:
        progress(f"starting a scratch embedded PostgreSQL in {scratch}")
        embedded = start_embedded(scratch, scratch=True, cleanup="delete")
        try:
            yield Server(EMBEDDED_KIND, embedded.url("postgres"), embedded.url)
        finally:
            embedded.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@asynccontextmanager
async def bench_database(server: Server) -> AsyncIterator[str]:
    """A fresh, empty database on ``server``, dropped on the way out; yields its URL."""
    name = f"sjaak_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server.admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield server.url_for(name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def postgres_version(db: Database) -> str:
    async with db.control() as conn:
        return str(await conn.fetchval("SELECT version()"))


def machine_facts(postgres: str, server: str) -> Machine:
    return Machine(
        cpus=cpu_count(),
        cpu_model=cpu_model(),
        memory_gib=memory_gib(),
        python=platform.python_version(),
        postgres=postgres,
        server=server,
    )


def cpu_count() -> int:
    """What ``nproc`` says: the CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    """Total RAM from ``/proc/meminfo`` (0 where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 0.0


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]
