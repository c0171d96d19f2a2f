"""The command line, run as a user would: ``python -m api …`` in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, TEST_SECRET, DatabaseFactory, bearer


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def cli_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SJAAK_")}
    env.update(variables)
    return env


@pytest.fixture
async def cli_database(new_database: DatabaseFactory) -> dict[str, str]:
    return cli_env(SJAAK_DATABASE_URL=await new_database(), SJAAK_SECRET_KEY=TEST_SECRET)


def test_tenant_commands_round_trip(cli_database: dict[str, str], tmp_path: Path) -> None:
    created = run_cli("tenants", "create", "Corner shop", "--json", env=cli_database)
    assert created.returncode == 0, created.stderr
    shop = json.loads(created.stdout)
    assert shop["name"] == "Corner shop"
    assert shop["schema"].startswith("shop_")
    assert shop["status"] == "active"
    assert shop["secret_key"].startswith("sjk_sk_live_")
    assert shop["publishable_key"].startswith("sjk_pk_live_")

    listed = json.loads(run_cli("tenants", "list", env=cli_database).stdout)
    assert [s["id"] for s in listed] == [shop["id"]]

    suspended = run_cli(
        "tenants", "suspend", shop["id"], "--reason", "fraud", "--json", env=cli_database
    )
    assert json.loads(suspended.stdout)["status"] == "suspended"
    resumed = run_cli("tenants", "resume", shop["id"], "--json", env=cli_database)
    assert json.loads(resumed.stdout)["status"] == "active"

    exported = run_cli("tenants", "export", shop["id"], str(tmp_path), env=cli_database)
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads(exported.stdout)
    assert manifest["tenant"]["schema"] == shop["schema"]
    assert (tmp_path / shop["schema"] / "touchpoints.jsonl").exists()
    again = run_cli("tenants", "export", shop["id"], str(tmp_path), env=cli_database)
    assert again.returncode == 2, "an export never overwrites an earlier one"

    refused = run_cli("tenants", "delete", shop["id"], env=cli_database)
    assert refused.returncode == 2
    assert "--confirm" in refused.stderr
    deleted = run_cli("tenants", "delete", shop["id"], "--confirm", "--json", env=cli_database)
    assert json.loads(deleted.stdout)["status"] == "deleted"
    assert json.loads(run_cli("tenants", "list", env=cli_database).stdout) == []


def test_unknown_tenant_is_a_clear_error(cli_database: dict[str, str]) -> None:
    result = run_cli("tenants", "suspend", "6f1c1a52-3b4e-4c55-9a55-2f3e0c3c1b7d", env=cli_database)
    assert result.returncode == 2
    assert "no shop with id" in result.stderr


def test_migrate_and_status(cli_database: dict[str, str]) -> None:
    before = run_cli("migrate", "--status", env=cli_database)
    assert before.returncode == 1
    assert json.loads(before.stdout)["up_to_date"] is False

    migrated = run_cli("migrate", env=cli_database)
    assert migrated.returncode == 0, migrated.stderr
    assert "control migration applied: 0001_tenants.sql" in migrated.stderr

    after = run_cli("migrate", "--status", env=cli_database)
    assert after.returncode == 0
    status = json.loads(after.stdout)
    assert status["up_to_date"] is True
    assert status["control_version"] == status["control_latest"]


def test_bad_settings_are_refused(cli_database: dict[str, str]) -> None:
    result = run_cli("migrate", env={**cli_database, "SJAAK_PORT": "nope"})
    assert result.returncode == 2
    assert "port" in result.stderr


def test_openapi_command_prints_the_committed_spec() -> None:
    result = run_cli("openapi", env=cli_env())
    assert result.returncode == 0, result.stderr
    committed = json.loads((REPO / "openapi" / "openapi.json").read_text())
    assert json.loads(result.stdout) == committed, "run `make openapi` and commit the spec"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "api", "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, process)
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_until_ready(base: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"serve exited early:\n{process.stdout.read() if process.stdout else ''}"
            )
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("serve did not become ready within 60 s")


def test_serve_with_a_configured_database(cli_database: dict[str, str], tmp_path: Path) -> None:
    env = {**cli_database, "SJAAK_DATA_DIR": str(tmp_path)}
    with serving(env) as (base, process):
        health = httpx.get(f"{base}/health")
        assert health.status_code == 200
        assert health.headers["x-request-id"]
        assert httpx.get(f"{base}/schema/openapi.json").status_code == 200
        demo = json.loads((tmp_path / "demo_keys.json").read_text())
        assert oct((tmp_path / "demo_keys.json").stat().st_mode & 0o777) == "0o600"
        listed = httpx.get(f"{base}/v1/api-keys", headers=bearer(demo["secret_key"]))
        assert listed.status_code == 200, listed.text
        assert len(listed.json()["data"]) == 2
        assert httpx.get(f"{base}/v1/api-keys").status_code == 401
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    output = process.stdout.read() if process.stdout else ""
    assert "demo shop created" in output
    assert demo["secret_key"] in output, "make run prints the demo shop's keys"
    access = [json.loads(line) for line in output.splitlines() if '"sjaak.access"' in line]
    assert {"request_id", "route", "status", "duration_ms"} <= access[-1].keys()
    assert any(line.get("tenant") == demo["tenant_id"] for line in access)


def test_serve_embedded_reuses_its_data_and_stops_postgres(tmp_path: Path) -> None:
    env = cli_env(SJAAK_DATA_DIR=str(tmp_path / "data"))
    with serving(env) as (_, process):
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    first = process.stdout.read() if process.stdout else ""
    assert "demo shop created" in first
    pgdata = tmp_path / "data" / "pg"
    assert (pgdata / "PG_VERSION").exists()
    assert not (pgdata / "postmaster.pid").exists(), "PostgreSQL was stopped on Ctrl-C"

    with serving(env) as (_, process):
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    second = process.stdout.read() if process.stdout else ""
    assert "demo shop found" in second, "the second start reused the first one's data"
    assert not (pgdata / "postmaster.pid").exists()
