"""The application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.openapi.spec import Server

from api.config import Settings
from api.db import Database
from api.db.migrate import MigrationSet
from api.errors import EXCEPTION_HANDLERS, problem_page
from api.health import health, ready
from api.logs import configure_logging
from api.middleware import RequestContextMiddleware

API_VERSION = "1.0.0"


def create_app(settings: Settings, *, database: Database | None = None) -> Litestar:
    """Build the ASGI app. ``database`` lets a caller share a pool it owns (tests, CLI)."""
    configure_logging(settings.log_level)
    migrations = MigrationSet.from_directory()

    @asynccontextmanager
    async def own_pool(app: Litestar) -> AsyncIterator[None]:
        if not settings.database_url:
            raise RuntimeError(
                "SJAAK_DATABASE_URL is not set; start the service with `python -m api serve`,"
                " which starts the embedded PostgreSQL when no URL is given"
            )
        app.state.db = await Database.connect(
            settings.database_url,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            statement_timeout_ms=settings.statement_timeout_ms,
        )
        try:
            yield
        finally:
            await app.state.db.close()

    app = Litestar(
        route_handlers=[health, ready, problem_page],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        lifespan=[] if database else [own_pool],
        openapi_config=OpenAPIConfig(
            title="Sjaak API",
            version=API_VERSION,
            description="Customer journeys, loyalty and offers for web shops.",
            path="/schema",
            servers=[Server(url="/", description="This server")],
            render_plugins=[ScalarRenderPlugin(path="/")],
        ),
        debug=False,
        logging_config=None,  # ours: JSON lines, configured above
    )
    app.state.settings = settings
    if database is not None:
        app.state.db = database
    app.state.migrations = migrations
    app.asgi_handler = RequestContextMiddleware(app.asgi_handler)
    return app
