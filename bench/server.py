"""The service under test: a provisioned shop, ``python -m api serve`` in a subprocess, its log.

The server runs as production runs it (granian, several workers) plus the benchmark-only echo
route, with rate limits lifted so they do not bind; its log goes to a scratch file that is kept
only when the server logged an error.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from api.auth import oauth_clients
from api.auth.scopes import ALL_SCOPES
from api.auth.secrets import Keyring
from api.db import Database
from api.db.migrate import migrate
from api.tenants.lifecycle import provision_shop

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
UNLIMITED = "1000000000"
PROFILE_ROUTE = "/v1/customers/{customer_id}"
#: Usage is still counted, but Free's monthly quota never refuses a benchmark's touchpoints.
LIFTED_QUOTA = '{"free": {"touchpoints_per_month": 1000000000000}}'


@dataclass(frozen=True)
class Fixture:
    """What the scenarios need from the provisioned shop."""

    secret_key: str
    client_id: str
    client_secret: str
    schema: str


async def provision(url: str, secret: str) -> Fixture:
    db = await Database.connect(url, min_size=1, max_size=4)
    try:
        await migrate(db)
        keyring = Keyring(secret)
        shop = await provision_shop(db, keyring, "Bench shop", actor="bench")
        async with db.control() as conn:
            client = await oauth_clients.create_client(
                conn,
                keyring,
                tenant_id=shop.tenant.id,
                name="bench",
                scopes=ALL_SCOPES,
                grant_types=frozenset({"client_credentials"}),
            )
        return Fixture(
            shop.secret_key, client.client_id, client.client_secret, shop.tenant.schema_name
        )
    finally:
        await db.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(
    url: str, secret: str, workers: int, log: Path, extra_env: dict[str, str] | None = None
) -> Iterator[int]:
    """``python -m api serve`` as production runs it, plus the echo route; rate limits and the
    Free plan's monthly quota lifted so they do not bind; its log lines go to ``log``.
    ``extra_env`` adds or overrides ``SJAAK_*`` variables."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SJAAK_")}
    env.update(
        SJAAK_DATABASE_URL=url,
        SJAAK_SECRET_KEY=secret,
        SJAAK_SEED_DEMO="false",
        SJAAK_BENCH_ECHO="true",
        SJAAK_ISSUER=f"http://{HOST}:{port}",
        SJAAK_RATE_LIMIT_PER_SECOND=UNLIMITED,
        SJAAK_RATE_LIMIT_BURST=UNLIMITED,
        SJAAK_SHOP_RATE_LIMIT_PER_SECOND=UNLIMITED,
        SJAAK_SHOP_RATE_LIMIT_BURST=UNLIMITED,
        SJAAK_BILLING_PLANS=LIFTED_QUOTA,
    )
    env.update(extra_env or {})
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "api", "serve", "--port", str(port), "--workers", str(workers)],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_ready(port, process)
            yield port
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_until_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(f"http://{HOST}:{port}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready within 60 s")


def access_token(port: int, fixture: Fixture) -> str:
    basic = base64.b64encode(f"{fixture.client_id}:{fixture.client_secret}".encode()).decode()
    response = httpx.post(
        f"http://{HOST}:{port}/oauth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": f"Basic {basic}"},
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


def serves_profiles(port: int) -> bool:
    """Whether this server documents ``GET /v1/customers/{customer_id}`` in its OpenAPI spec."""
    response = httpx.get(f"http://{HOST}:{port}/schema/openapi.json", timeout=10)
    response.raise_for_status()
    return "get" in response.json().get("paths", {}).get(PROFILE_ROUTE, {})


@contextmanager
def server_log() -> Iterator[Path]:
    """A scratch file for the server's log, deleted afterwards unless it recorded an error."""
    handle, name = tempfile.mkstemp(prefix="sjaak-bench-server-", suffix=".log")
    os.close(handle)
    path = Path(name)
    try:
        yield path
    finally:
        if path.exists() and not logged_errors(path)[0]:
            path.unlink()


def logged_errors(path: Path, keep: int = 3) -> tuple[int, list[str]]:
    """How many error lines the server logged, and the first few (shortened)."""
    count = 0
    first: list[str] = []
    with path.open("rb") as lines:
        for line in lines:
            if b'"level":"error"' in line or b'"level":"critical"' in line or b"Traceback" in line:
                count += 1
                if len(first) < keep:
                    first.append(line.decode(errors="replace").strip()[:400])
    return count, first
