"""The application factory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.openapi.spec import Server

from api.analytics.routes import analytics_routes
from api.auth.client_routes import OAuthClientController
from api.auth.guards import authorize_request
from api.auth.oauth import OAuthError, handle_oauth_error, oauth_routes
from api.auth.openapi import document_security
from api.auth.routes import ApiKeyController, whoami
from api.auth.secrets import Keyring
from api.billing.routes import billing_routes
from api.config import Settings
from api.customers.identity_routes import identity_routes
from api.customers.routes import CustomerController
from api.db import Database
from api.db.migrate import MigrationSet
from api.errors import EXCEPTION_HANDLERS, problem_page
from api.health import health, ready
from api.journey.config_routes import journey_config_routes
from api.journey.rfm_routes import rfm_routes
from api.journey.routes import journey_routes
from api.logs import configure_logging
from api.loyalty.routes import loyalty_routes
from api.middleware import RequestContextMiddleware
from api.offers.routes import offer_routes
from api.openapi_bodies import document_request_bodies
from api.services import install_services, run_background, stop_services
from api.touchpoints.routes import touchpoint_routes
from api.webhooks.routes import webhook_routes

API_VERSION = "1.0.0"


def create_app(settings: Settings, *, database: Database | None = None) -> Litestar:
    """Build the ASGI app. ``database`` lets a caller share a pool it owns (tests, CLI)."""
    configure_logging(settings.log_level)
    migrations = MigrationSet.from_directory()

    keyring = Keyring.from_settings(settings)

    @asynccontextmanager
    async def services(app: Litestar) -> AsyncIterator[None]:
        own_pool = database is None
        if own_pool:
            if not settings.database_url:
                raise RuntimeError(
                    "SJAAK_DATABASE_URL is not set; start the service with `python -m api serve`,"
                    " which starts the embedded PostgreSQL when no URL is given"
                )
            db = await Database.connect(
                settings.database_url,
                min_size=settings.pool_min_size,
                max_size=settings.pool_max_size,
                statement_timeout_ms=settings.statement_timeout_ms,
            )
            install_services(app.state, settings, db, keyring)
        background = asyncio.create_task(run_background(app.state))
        try:
            yield
        finally:
            await stop_services(app.state, background)
            if own_pool:
                await app.state.db.close()

    app = Litestar(
        route_handlers=[
            health,
            ready,
            problem_page,
            ApiKeyController,
            OAuthClientController,
            whoami,
            *touchpoint_routes,
            CustomerController,
            *identity_routes,
            *journey_routes,
            *journey_config_routes,
            *rfm_routes,
            *analytics_routes,
            *loyalty_routes,
            *offer_routes,
            *webhook_routes,
            *billing_routes,
            *oauth_routes,
        ],
        before_request=authorize_request,
        exception_handlers={**EXCEPTION_HANDLERS, OAuthError: handle_oauth_error},  # type: ignore[dict-item]
        lifespan=[services],
        openapi_config=OpenAPIConfig(
            title="Sjaak API",
            version=API_VERSION,
            description="Customer journeys, loyalty and offers for web shops.",
            path="/schema",
            servers=[Server(url="/", description="This server")],
            use_handler_docstrings=True,
            render_plugins=[ScalarRenderPlugin(path="/")],
        ),
        debug=False,
        logging_config=None,  # ours: JSON lines, configured above
    )
    app.state.settings = settings
    if settings.bench_echo:
        from api.touchpoints.echo import echo

        app.register(echo)
    if database is not None:
        # A caller-owned pool (tests, tools): services are ready without the lifespan.
        install_services(app.state, settings, database, keyring)
    app.state.publishable_paths = publishable_paths(app)
    document_security(app)
    document_request_bodies(app)
    app.state.migrations = migrations
    app.asgi_handler = RequestContextMiddleware(app.asgi_handler)
    return app


def publishable_paths(app: Litestar) -> frozenset[str]:
    """Paths with a handler that admits publishable keys (they get CORS preflight answers)."""
    return frozenset(
        route.path_format
        for route in app.routes
        for handler in getattr(route, "route_handlers", ())
        if handler.opt.get("publishable")
    )
