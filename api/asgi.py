"""Entry point for ASGI servers: ``granian --interface asgi --factory api.asgi:app_from_env``."""

from __future__ import annotations

from litestar import Litestar

from api.app import create_app
from api.config import load_settings


def app_from_env() -> Litestar:
    return create_app(load_settings())
