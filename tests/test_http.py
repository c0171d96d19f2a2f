"""The HTTP skeleton: health, readiness, problem+json errors, request ids, access logs."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest
from litestar import Litestar, get, post
from litestar.params import JSONBody

from api.db import Database
from api.db.migrate import MigrationSet, migrate
from api.logs import JsonFormatter
from api.tenants.lifecycle import create_tenant
from tests.conftest import add_tenant_migration, http_client, make_app

PROBLEM = "application/problem+json"


def assert_problem(response: object, status: int, slug: str) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    assert response.headers["content-type"] == PROBLEM  # type: ignore[attr-defined]
    body: dict[str, object] = response.json()  # type: ignore[attr-defined]
    assert body["type"] == f"/problems/{slug}"
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]  # type: ignore[attr-defined]
    return body


class Order(msgspec.Struct, forbid_unknown_fields=True):
    amount: int
    currency: str


class Probe(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    order: Order


@post("/test/validate", opt={"public": True})
async def validate_probe(data: JSONBody[Probe]) -> Probe:
    return data


@get("/test/explode", opt={"public": True})
async def explode() -> None:
    raise RuntimeError("secret internals: password=hunter2")


@pytest.fixture(scope="module")
def probe_app(db: Database) -> Litestar:
    app = make_app(db)
    app.register(validate_probe)
    app.register(explode)
    return app


@pytest.fixture
async def probe_client(probe_app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(probe_app) as client:
        yield client


async def test_health_is_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ready_when_everything_is_migrated(client: httpx.AsyncClient) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"


async def test_ready_is_503_while_a_shop_is_behind(fresh_db: Database, migration_dir: Path) -> None:
    await migrate(fresh_db, MigrationSet.from_directory(migration_dir))
    await create_tenant(fresh_db, "Lagging shop")
    app = make_app(fresh_db)
    app.state.migrations = add_tenant_migration(
        migration_dir, "notes", "CREATE TABLE notes (id bigint PRIMARY KEY);"
    )
    async with http_client(app) as client:
        body = assert_problem(await client.get("/ready"), 503, "unavailable")
        assert f"1 shop(s) are behind tenant migration {app.state.migrations.latest_tenant}" in str(
            body["detail"]
        )

        await migrate(fresh_db, app.state.migrations)
        assert (await client.get("/ready")).status_code == 200


async def test_ready_is_503_before_the_control_schema_exists(fresh_db: Database) -> None:
    app = make_app(fresh_db)
    async with http_client(app) as client:
        body = assert_problem(await client.get("/ready"), 503, "unavailable")
        assert "control schema" in str(body["detail"])


async def test_unknown_path_is_a_problem(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/v1/nothing-here"), 404, "not-found")
    assert body["instance"] == "/v1/nothing-here"


async def test_wrong_method_is_a_problem(client: httpx.AsyncClient) -> None:
    response = await client.delete("/health")
    assert_problem(response, 405, "method-not-allowed")
    assert "GET" in response.headers["allow"]


async def test_validation_errors_name_each_failing_field(
    probe_client: httpx.AsyncClient,
) -> None:
    response = await probe_client.post(
        "/test/validate", json={"name": "x", "order": {"amount": "ten", "currency": "EUR"}}
    )
    body = assert_problem(response, 422, "validation")
    assert body["errors"] == [{"path": "$.order.amount", "message": "Expected `int`, got `str`"}]


async def test_unknown_fields_are_reported(probe_client: httpx.AsyncClient) -> None:
    response = await probe_client.post(
        "/test/validate",
        json={"name": "x", "order": {"amount": 1, "currency": "EUR"}, "colour": "red"},
    )
    body = assert_problem(response, 422, "validation")
    assert [e["path"] for e in body["errors"]] == ["$"]  # type: ignore[union-attr]
    assert "colour" in body["errors"][0]["message"]  # type: ignore[index]


async def test_malformed_json_is_a_400(probe_client: httpx.AsyncClient) -> None:
    response = await probe_client.post(
        "/test/validate", content=b'{"name": ', headers={"content-type": "application/json"}
    )
    assert_problem(response, 400, "malformed-body")


async def test_an_unexpected_error_leaks_nothing(
    probe_client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        response = await probe_client.get("/test/explode")
    body = assert_problem(response, 500, "internal")
    assert "hunter2" not in response.text and "Traceback" not in response.text
    assert "RuntimeError" not in response.text
    assert body["detail"].startswith("Something failed on our side")  # type: ignore[union-attr]
    assert any("unhandled error" in r.getMessage() for r in caplog.records)


async def test_request_id_is_taken_when_valid(client: httpx.AsyncClient) -> None:
    response = await client.get("/health", headers={"X-Request-Id": "client-id-1234"})
    assert response.headers["x-request-id"] == "client-id-1234"


@pytest.mark.parametrize("bad", ["short", "has spaces in it", "x" * 200, "semi;colon-id"])
async def test_an_unusable_request_id_is_replaced(client: httpx.AsyncClient, bad: str) -> None:
    response = await client.get("/health", headers={"X-Request-Id": bad})
    generated = response.headers["x-request-id"]
    assert generated != bad and len(generated) == 32


class JsonLines(logging.Handler):
    """Keeps what the service's JSON formatter writes, line by line."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


async def test_every_request_is_logged_as_json(client: httpx.AsyncClient) -> None:
    handler = JsonLines()
    access_log = logging.getLogger("sjaak.access")
    access_log.addHandler(handler)
    try:
        await client.get("/ready", headers={"X-Request-Id": "log-check-0001"})
    finally:
        access_log.removeHandler(handler)
    [entry] = handler.lines
    assert entry["message"] == "request"
    assert entry["request_id"] == "log-check-0001"
    assert entry["route"] == "/ready"
    assert entry["status"] == 200
    assert entry["method"] == "GET"
    assert isinstance(entry["duration_ms"], float)
    assert entry["level"] == "info" and str(entry["ts"]).endswith("Z")


async def test_problem_types_are_documented_pages(client: httpx.AsyncClient) -> None:
    page = await client.get("/problems/validation")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert "Invalid request" in page.text
    assert_problem(await client.get("/problems/no-such-thing"), 404, "not-found")


async def test_openapi_spec_is_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    assert response.json()["info"]["title"] == "Sjaak API"


async def test_absurdly_nested_json_is_a_400_not_a_crash(
    probe_client: httpx.AsyncClient,
) -> None:
    body = b'{"name": "x", "order": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    response = await probe_client.post(
        "/test/validate", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code in (400, 422), response.text
    assert response.headers["content-type"] == PROBLEM
