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
from api.auth.secrets import Keyring
from api.config import Settings, load_settings
from api.db import Database
from api.db.embedded import start_embedded
from api.db.migrate import MIGRATIONS_DIR, MigrationSet, migrate
from api.tenants.lifecycle import ProvisionedShop, TenantRecord, create_tenant, provision_shop

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


def add_tenant_migration(migration_dir: Path, name: str, sql: str) -> MigrationSet:
    """Add ``<next number>_<name>.sql`` to the copied tenant migrations."""
    (migration_dir / "tenant" / next_tenant_file(migration_dir, name)).write_text(sql)
    return MigrationSet.from_directory(migration_dir)


def next_tenant_file(migration_dir: Path, name: str) -> str:
    latest = MigrationSet.from_directory(migration_dir).latest_tenant
    return f"{latest + 1:04d}_{name}.sql"


def settings_for_tests(**overrides: object) -> Settings:
    """Settings for an app under test: a fixed secret, revocations seen on the next request."""
    values: dict[str, object] = {
        "environment": "test",
        "secret_key": TEST_SECRET,
        "revocation_poll_seconds": 0.0,
        "issuer": "http://sjaak.test",
        # Free's campaign and webhook-endpoint limits are lifted for tests that make several;
        # tests of the limits set their own plans.
        "billing_plans": '{"free": {"campaigns": -1, "webhook_endpoints": -1}}',
    }
    values.update(overrides)
    return load_settings({}, **values)


TEST_SECRET = "test-secret-0123456789-0123456789-abcdef"


def make_app(db: Database, **overrides: object) -> Litestar:
    return create_app(settings_for_tests(**overrides), database=db)


@pytest.fixture(scope="session")
def app(db: Database) -> Litestar:
    return make_app(db)


@pytest.fixture(scope="session")
def keyring() -> Keyring:
    return Keyring(TEST_SECRET)


ProvisionFactory = Callable[..., Awaitable[ProvisionedShop]]


@pytest.fixture
def provision(db: Database, keyring: Keyring) -> ProvisionFactory:
    """A new shop with a secret and a publishable key (``allowed_origins`` for the latter)."""

    async def make(
        name: str = "Keyed shop", allowed_origins: tuple[str, ...] = ()
    ) -> ProvisionedShop:
        return await provision_shop(
            db, keyring, name, actor="test", allowed_origins=allowed_origins
        )

    return make


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


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
