"""One real PostgreSQL per test run: the embedded server in a temporary directory, or the server
``TEST_DATABASE_URL`` points at. Each run works in databases of its own, dropped at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from litestar import Litestar

from api.app import create_app
from api.config import load_settings
from api.db import Database
from api.db.embedded import start_embedded
from api.db.migrate import MIGRATIONS_DIR, MigrationSet, migrate
from api.tenants.lifecycle import TenantRecord, create_tenant

REPO = Path(__file__).resolve().parent.parent


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    scratch = tempfile.mkdtemp(prefix="sjaak-test-")
    server = start_embedded(scratch, scratch=True, cleanup="delete")
    try:
        yield server.url()
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


DatabaseFactory = Callable[[], Awaitable[str]]


@pytest.fixture(scope="session")
async def new_database(server_url: str) -> AsyncIterator[DatabaseFactory]:
    """Creates empty databases on the test server; all are dropped when the run ends."""
    created: list[str] = []
    admin = await asyncpg.connect(server_url)

    async def create() -> str:
        name = f"sjaak_test_{uuid.uuid4().hex[:12]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return with_database(server_url, name)

    try:
        yield create
    finally:
        for name in created:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
async def db_url(new_database: DatabaseFactory) -> str:
    return await new_database()


@pytest.fixture(scope="session")
async def db(db_url: str) -> AsyncIterator[Database]:
    """The shared, migrated database most tests use."""
    database = await Database.connect(db_url, min_size=1, max_size=8)
    await migrate(database)
    yield database
    await database.close()


@pytest.fixture
async def fresh_db(new_database: DatabaseFactory) -> AsyncIterator[Database]:
    """An empty database of the test's own, for tests that change migrations."""
    database = await Database.connect(await new_database(), min_size=1, max_size=8)
    yield database
    await database.close()


ShopFactory = Callable[..., Awaitable[TenantRecord]]


@pytest.fixture
def make_shop(db: Database) -> ShopFactory:
    async def make(name: str = "Test shop") -> TenantRecord:
        return await create_tenant(db, name, actor="test")

    return make


@pytest.fixture
def migration_dir(tmp_path: Path) -> Path:
    """A copy of the real migrations that a test may add to or tamper with."""
    target = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, target)
    return target


def add_tenant_migration(migration_dir: Path, file_name: str, sql: str) -> MigrationSet:
    (migration_dir / "tenant" / file_name).write_text(sql)
    return MigrationSet.from_directory(migration_dir)


@pytest.fixture(scope="session")
def app(db: Database) -> Litestar:
    return create_app(load_settings({}, environment="test"), database=db)


@asynccontextmanager
async def http_client(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for ``app`` on the test's own event loop (the pool lives there too)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
async def client(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(app) as test_client:
        yield test_client
