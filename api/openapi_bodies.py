"""Request bodies in the spec for routes that read their body themselves.

Ingest decodes each touchpoint on its own (so one bad item cannot sink a batch), which means the
handler takes the raw request and Litestar cannot see the body's type. Such a route names its
body type in ``opt["request_body"]``; this adds the msgspec-generated schema to the spec.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar
from litestar.openapi.spec import OpenAPIMediaType, RequestBody, Schema

REF = "#/components/schemas/{name}"


def document_request_bodies(app: Litestar) -> None:
    spec = app.openapi_schema
    if spec.paths is None or spec.components is None:
        return
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            body_type: Any = handler.opt.get("request_body")
            if body_type is None:
                continue
            (top,), components = msgspec.json.schema_components([body_type], ref_template=REF)
            schemas = spec.components.schemas
            for name, component in components.items():
                schemas.setdefault(name, _schema(component))
            path_item = spec.paths[route.path_format]
            for method in handler.http_methods:
                operation = getattr(path_item, method.lower(), None)
                if operation is not None:
                    operation.request_body = RequestBody(
                        content={"application/json": OpenAPIMediaType(schema=_schema(top))},
                        required=True,
                    )


def _schema(raw: dict[str, Any]) -> Schema:
    return _RawSchema(raw)


class _RawSchema(Schema):
    """A schema given as ready JSON; serialised exactly as msgspec produced it."""

    def __init__(self, raw: dict[str, Any]) -> None:
        super().__init__()
        self._raw = raw

    def to_schema(self) -> dict[str, Any]:
        return self._raw
