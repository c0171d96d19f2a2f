"""The published spec states, for every operation, the credential and scopes the API enforces."""

from __future__ import annotations

from typing import Any

from litestar import Litestar

from api.auth.guards import is_public, required_scopes


def operations(app: Litestar) -> list[tuple[str, str, Any, dict[str, Any]]]:
    spec = app.openapi_schema.to_schema()
    found = []
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            for method in getattr(handler, "http_methods", ()):
                if method == "OPTIONS" or not handler.include_in_schema:
                    continue
                operation = spec["paths"].get(route.path_format, {}).get(method.lower())
                if operation is not None:
                    found.append((method, route.path_format, handler, operation))
    return found


def test_every_operation_states_its_security(app: Litestar) -> None:
    found = operations(app)
    assert len(found) > 10
    for method, path, handler, operation in found:
        where = f"{method} {path}"
        if path.startswith("/oauth/"):
            assert operation["security"] == [{"oauthClient": []}], where
        elif is_public(handler):
            assert operation["security"] == [], where
        else:
            scopes = sorted(required_scopes(handler))
            assert operation["security"] == [{"apiKey": []}, {"oauth2": scopes}], where
            for scope in scopes:
                assert scope in operation["description"], where


def test_every_operation_has_a_stable_operation_id(app: Litestar) -> None:
    ids = [operation.get("operationId") for *_, operation in operations(app)]
    assert all(ids), "every operation names its operationId"
    assert len(ids) == len(set(ids))


def test_the_security_schemes_list_every_scope(app: Litestar) -> None:
    from api.auth.scopes import SCOPES

    schemes = app.openapi_schema.to_schema()["components"]["securitySchemes"]
    flows = schemes["oauth2"]["flows"]
    assert flows["clientCredentials"]["tokenUrl"] == "/oauth/token"
    assert flows["clientCredentials"]["scopes"] == SCOPES
    assert schemes["apiKey"]["scheme"] == "bearer"


def test_ingest_documents_its_request_bodies(app: Litestar) -> None:
    spec = app.openapi_schema.to_schema()
    single = spec["paths"]["/v1/touchpoints"]["post"]["requestBody"]
    batch = spec["paths"]["/v1/touchpoints/batch"]["post"]["requestBody"]
    assert single["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TouchpointIn"
    }
    assert batch["required"] is True
    touchpoint = spec["components"]["schemas"]["TouchpointIn"]
    assert set(touchpoint["required"]) == {"id", "type", "channel", "occurred_at"}
    assert touchpoint["additionalProperties"] is False


def test_every_protected_operation_documents_the_auth_problems(app: Litestar) -> None:
    for method, path, handler, operation in operations(app):
        if is_public(handler) or path.startswith("/oauth/"):
            continue
        for status in ("401", "403", "429"):
            response = operation["responses"].get(status)
            assert response is not None, f"{method} {path} lacks {status}"
            schema = response["content"]["application/problem+json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ProblemBody"}
