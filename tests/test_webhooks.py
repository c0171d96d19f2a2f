"""Webhooks end to end: endpoints over HTTP, the dispatcher and the delivery job on real pgqueuer
workers, and a real receiver on loopback that verifies signatures the way the README tells shops
to, answers 500s to see retries, and dedupes by event id. The SSRF guard is tested on its own
and through the API. Every test makes its own shops; the receiver gives each test its own paths.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from litestar import Litestar

from api.auth.secrets import Keyring
from api.db import Database, Tenant, TenantConn, in_tenant, tenant_tx
from api.db.queue import connect_queue_pool
from api.jobs import JobContext, periodic_jobs, queued_jobs
from api.tenants.lifecycle import ProvisionedShop
from api.webhooks import delivery, dispatch, endpoints, events, history, outbound
from api.webhooks.delivery import RetryPolicy, delivery_job
from api.webhooks.dispatch import dispatch as dispatch_shop
from api.webhooks.events import publish
from api.webhooks.signing import generate_secret, signature_header, verify
from api.webhooks.ssrf import Target, UnsafeUrl, check_url, ipv4_in_any_notation, resolve
from api.worker import run_worker
from tests.conftest import ProvisionFactory, bearer, http_client, make_app, settings_for_tests
from tests.test_http import assert_problem

PATH = "/v1/webhook-endpoints"
#: Retries within a second, nothing disabled: the retry tests finish quickly.
FAST = RetryPolicy(
    first_delay=timedelta(milliseconds=100),
    max_delay=timedelta(milliseconds=400),
    jitter=0.1,
    disable_min_failures=1000,
)
METADATA_REDIRECT = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


# --- a receiver on loopback -------------------------------------------------------------------


def verify_signature(header: str, body: bytes, secret: str, tolerance: int = 300) -> bool:
    """The README's recipe, written out independently of api.webhooks.signing."""
    items = [item.split("=", 1) for item in header.split(",")]
    timestamps = [value for key, value in items if key == "t"]
    signatures = [value for key, value in items if key == "v1"]
    if len(timestamps) != 1 or abs(time.time() - int(timestamps[0])) > tolerance:
        return False
    signed = timestamps[0].encode() + b"." + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, s) for s in signatures)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    verified_with: list[str]

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Receiver:
    """Answers each path by its plan (statuses in turn, then 200), verifies every request with
    the secrets registered for the path, and processes each event id once."""

    base: str = ""
    received: list[Received] = field(default_factory=list)
    plans: dict[str, list[int]] = field(default_factory=dict)
    secrets: dict[str, list[str]] = field(default_factory=dict)
    processed: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return self.base + path

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        with self.lock:
            plan = self.plans.get(path, [])
            status = plan.pop(0) if plan else 200
            extra = {"Location": METADATA_REDIRECT} if path.startswith("/redirect") else {}
            if extra:
                status = 302
            header = headers.get("sjaak-signature", "")
            verified = [s for s in self.secrets.get(path, []) if verify_signature(header, body, s)]
            if 200 <= status < 300 and verified:
                event_id = json.loads(body)["id"]
                seen = self.processed.setdefault(path, [])
                if event_id not in seen:  # dedupe by event id: at-least-once becomes once
                    seen.append(event_id)
            self.received.append(Received(path, headers, body, status, verified))
        return status, extra


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra = state.handle(self.path, headers, body)
            answer = json.dumps({"status": status}).encode()
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


# --- the app, the worker, and helpers ---------------------------------------------------------


@pytest.fixture(scope="module")
def loopback_app(db: Database) -> Litestar:
    """The API with loopback targets allowed (development), so endpoints can reach the
    receiver."""
    return make_app(db, webhooks_allow_loopback=True)


@pytest.fixture
async def api(loopback_app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(loopback_app) as client:
        yield client


@asynccontextmanager
async def running_worker(
    db: Database,
    db_url: str,
    keyring: Keyring,
    policy: RetryPolicy = FAST,
    **settings: Any,
) -> AsyncIterator[None]:
    """A worker running only the delivery job, with ``policy`` and loopback allowed unless
    ``settings`` say otherwise."""
    pool = await connect_queue_pool(db_url)
    stop = asyncio.Event()
    context = JobContext(
        settings_for_tests(**{"webhooks_allow_loopback": True, **settings}), db, keyring
    )
    task = asyncio.create_task(
        run_worker(
            context,
            pool,
            stop,
            periodic=[],
            queued=[delivery_job(policy)],
            dequeue_timeout=timedelta(seconds=1),
        )
    )
    try:
        yield
        assert not task.done(), task
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=30)
        finally:
            await pool.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(0.05)


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    async def check() -> bool:
        return condition()

    await eventually(check, timeout)


def tenant_of(shop: ProvisionedShop) -> Tenant:
    return shop.tenant.as_tenant()


async def create_endpoint(
    api: httpx.AsyncClient,
    shop: ProvisionedShop,
    url: str,
    event_types: list[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    response = await api.post(
        PATH,
        json={"url": url, "event_types": event_types or ["*"], **extra},
        headers=bearer(shop.secret_key),
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def endpoint_to(
    api: httpx.AsyncClient,
    receiver: Receiver,
    shop: ProvisionedShop,
    label: str,
    event_types: list[str] | None = None,
    plan: list[int] | None = None,
) -> tuple[dict[str, Any], str]:
    """An endpoint at a fresh receiver path whose secret the receiver knows."""
    path = f"/{label}/{uuid.uuid4().hex[:8]}"
    receiver.plans[path] = list(plan or [])
    created = await create_endpoint(api, shop, receiver.url(path), event_types)
    receiver.secrets[path] = [created["secret"]]
    return created, path


async def publish_event(
    db: Database, shop: ProvisionedShop, type_: str = "offer.issued", **data: Any
) -> None:
    async def work(conn: TenantConn) -> None:
        await publish(conn, type_, {"offer": unique("offer"), **data})

    await in_tenant(db, tenant_of(shop), work)


async def run_dispatch(db: Database, shop: ProvisionedShop) -> int:
    tenant = tenant_of(shop)
    return await in_tenant(db, tenant, lambda conn: dispatch_shop(conn, tenant))


async def deliveries(
    api: httpx.AsyncClient, shop: ProvisionedShop, endpoint_id: str, **params: Any
) -> list[dict[str, Any]]:
    response = await api.get(
        f"{PATH}/{endpoint_id}/deliveries",
        params={"limit": 100, **params},
        headers=bearer(shop.secret_key),
    )
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


async def finished(api: httpx.AsyncClient, shop: ProvisionedShop, endpoint_id: str) -> bool:
    found = await deliveries(api, shop, endpoint_id)
    return bool(found) and all(d["status"] != "pending" for d in found)


# --- signatures -------------------------------------------------------------------------------


def test_a_signature_verifies_with_either_secret_and_only_while_fresh() -> None:
    new, old = generate_secret(), generate_secret()
    assert new.startswith("whsec_") and len(new) == 38 and new != old
    body = b'{"id":"evt_1"}'
    now = int(time.time())
    header = signature_header(now, body, [new, old])
    assert header.startswith(f"t={now},v1=") and header.count("v1=") == 2
    assert verify(header, body, new) and verify(header, body, old)
    assert verify_signature(header, body, new) and verify_signature(header, body, old)
    assert not verify(header, body, generate_secret())
    assert not verify(header, body + b" ", new)
    assert not verify(header, body, new, now=now + 301)
    assert not verify(signature_header(now - 301, body, [new]), body, new)
    assert not verify("v1=abc", body, new) and not verify(f"t={now}", body, new)


# --- the SSRF guard ---------------------------------------------------------------------------

REFUSED = [
    ("https://10.0.0.1/hook", "a private address"),
    ("https://172.16.5.4/hook", "a private address"),
    ("https://192.168.1.1/hook", "a private address"),
    ("https://[fd12:3456::1]/hook", "a private address"),
    ("https://127.0.0.1/hook", "a loopback address"),
    ("https://[::1]/hook", "a loopback address"),
    ("https://localhost/hook", "a loopback host"),
    ("https://169.254.10.1/hook", "a link-local address"),
    ("https://[fe80::1]/hook", "a link-local address"),
    ("https://100.64.0.1/hook", "a shared (CGNAT) address"),
    ("https://224.0.0.251/hook", "a multicast address"),
    ("https://0.0.0.0/hook", "the unspecified address"),
    ("https://240.0.0.1/hook", "address"),
    ("https://169.254.169.254/latest/meta-data/", "a cloud metadata address"),
    ("https://[fd00:ec2::254]/", "a cloud metadata address"),
    ("https://168.63.129.16/", "a cloud metadata address"),
    ("https://metadata.google.internal/computeMetadata/v1/", "a cloud metadata host"),
    ("https://[::ffff:127.0.0.1]/hook", "an IPv4-mapped IPv6 address"),
    ("https://[::ffff:a9fe:a9fe]/hook", "an IPv4-mapped IPv6 address"),
    ("https://[::ffff:10.0.0.1]/hook", "an IPv4-mapped IPv6 address"),
    ("https://[::127.0.0.1]/hook", "wrapping an IPv4 one"),
    ("https://[64:ff9b::a9fe:a9fe]/hook", "wrapping an IPv4 one"),
    ("https://[2002:7f00:1::1]/hook", "wrapping an IPv4 one"),
    ("https://2130706433/hook", "127.0.0.1 (a loopback address) in another notation"),
    ("https://0x7f000001/hook", "127.0.0.1 (a loopback address) in another notation"),
    ("https://0x7f.0.0.1/hook", "127.0.0.1 (a loopback address) in another notation"),
    ("https://0177.0.0.1/hook", "127.0.0.1 (a loopback address) in another notation"),
    ("https://017700000001/hook", "127.0.0.1 (a loopback address) in another notation"),
    ("https://127.1/hook", "127.0.0.1 (a loopback address) in another notation"),
    ("https://2852039166/", "169.254.169.254 (a cloud metadata address) in another notation"),
    ("https://0xa9fea9fe/", "169.254.169.254 (a cloud metadata address) in another notation"),
    ("https://0251.0376.0251.0376/", "169.254.169.254 (a cloud metadata address)"),
    ("https://167772161/", "10.0.0.1 (a private address) in another notation"),
    ("https://0x08080808/", "8.8.8.8 in another notation"),
    ("https://08.1.2.3/", "neither a valid name nor a valid IPv4 address"),
    ("https://shop.123/", "neither a valid name nor a valid IPv4 address"),
    ("https://[fe80::1%25eth0]/", "must not name an IPv6 zone"),
    ("https://user:secret@example.com/hook", "must not contain a user name or password"),
    ("https://@example.com/hook", "must not contain a user name or password"),
    ("ftp://example.com/hook", "must be an https:// URL"),
    ("https://intranet/hook", "not a fully qualified public host name"),
    ("https://printer.local/hook", "not a public host name"),
    ("https://exa mple.com/", "must not contain spaces"),
    ("https://example.com\\@10.0.0.1/", "backslashes"),
    ("https://example.com:0/", "invalid port"),
    ("https://example.com/#frag", "fragment"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_the_guard_refuses(url: str, reason: str) -> None:
    with pytest.raises(UnsafeUrl) as refused:
        check_url(url, allow_http=True)
    assert reason in str(refused.value), str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://[::ffff:127.0.0.1]/",
        "https://2130706433/",
        "https://127.1/",
        "https://0x7f000001/",
        "https://169.254.169.254/",
        "https://10.0.0.1/",
    ],
)
def test_allowing_loopback_allows_nothing_else(url: str) -> None:
    with pytest.raises(UnsafeUrl):
        check_url(url, allow_http=True, allow_loopback=True)


def test_the_guard_accepts_public_hosts_and_the_dev_loopback() -> None:
    target = check_url("https://hooks.example.com:8443/in?x=1", allow_http=False)
    assert (target.host, target.port, target.host_header, target.address) == (
        "hooks.example.com",
        8443,
        "hooks.example.com:8443",
        None,
    )
    assert check_url("https://8.8.8.8/", allow_http=False).host_header == "8.8.8.8"
    assert check_url("https://[2606:4700::1111]/", allow_http=False).host == "2606:4700::1111"
    with pytest.raises(UnsafeUrl, match="https"):
        check_url("http://hooks.example.com/", allow_http=False)
    assert check_url("http://127.0.0.1:9000/", allow_http=True, allow_loopback=True).port == 9000
    assert check_url("http://localhost:9000/", allow_http=True, allow_loopback=True)


def test_ipv4_numbers_are_read_as_resolvers_read_them() -> None:
    cases = {
        "2130706433": "127.0.0.1",
        "0x7f000001": "127.0.0.1",
        "0177.0.0.01": "127.0.0.1",
        "127.1": "127.0.0.1",
        "127.0.1": "127.0.0.1",
        "10.1": "10.0.0.1",
        "0": "0.0.0.0",
        "0x0a.0x00.0x00.0x01": "10.0.0.1",
        "255.255.255.255": "255.255.255.255",
    }
    for host, address in cases.items():
        assert str(ipv4_in_any_notation(host)) == address, host
    for host in ("256.0.0.1", "1.2.3.4.5", "0x100000000", "089.1.1.1", "example.com", "1..2"):
        assert ipv4_in_any_notation(host) is None, host


async def test_a_name_resolving_to_a_loopback_address_is_refused() -> None:
    target = Target(
        url="https://localhost/", scheme="https", host="localhost", port=443,
        host_header="localhost", address=None,
    )  # fmt: skip
    with pytest.raises(UnsafeUrl, match=r"localhost resolves to .*a loopback address"):
        await resolve(target)
    assert all(a.is_loopback for a in await resolve(target, allow_loopback=True))
    nowhere = Target(
        url="https://nowhere.invalid/", scheme="https", host="nowhere.invalid", port=443,
        host_header="nowhere.invalid", address=None,
    )  # fmt: skip
    with pytest.raises(UnsafeUrl, match="does not resolve"):
        await resolve(nowhere)


def test_loopback_delivery_is_refused_as_a_production_setting() -> None:
    with pytest.raises(Exception, match="SJAAK_WEBHOOKS_ALLOW_LOOPBACK"):
        settings_for_tests(
            environment="production",
            database_url="postgresql://localhost/x",
            webhooks_allow_loopback=True,
        )
    assert settings_for_tests().webhooks_allow_loopback is False


# --- endpoints over HTTP ----------------------------------------------------------------------


async def test_endpoints_are_created_listed_read_changed_and_deleted(
    api: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision(unique("Hooked shop"))
    key = bearer(shop.secret_key)
    response = await api.post(
        PATH,
        json={
            "url": "https://8.8.8.8/hooks",
            "event_types": ["offer.issued", "loyalty.tier_changed", "offer.issued"],
            "description": "CRM",
        },
        headers=key,
    )
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    created = response.json()
    assert created["object"] == "webhook_endpoint"
    assert created["id"].startswith("we_") and len(created["id"]) == 35
    assert created["secret"].startswith("whsec_")
    assert created["event_types"] == ["offer.issued", "loyalty.tier_changed"]
    assert created["enabled"] is True and created["disabled_reason"] is None
    assert created["previous_secret_expires_at"] is None

    read = (await api.get(f"{PATH}/{created['id']}", headers=key)).json()
    assert "secret" not in read
    assert read == {k: v for k, v in created.items() if k != "secret"}

    # The secret is stored encrypted only.
    async with tenant_tx(db, tenant_of(shop)) as conn:
        stored = await conn.fetchval("SELECT secret FROM webhook_endpoints")
    assert created["secret"].encode() not in stored

    changed = await api.patch(
        f"{PATH}/{created['id']}",
        json={"event_types": ["*"], "enabled": False, "url": "https://1.1.1.1/new"},
        headers=key,
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["event_types"] == ["*"]
    assert changed.json()["enabled"] is False
    assert changed.json()["url"] == "https://1.1.1.1/new"
    assert changed.json()["description"] == "CRM"

    more = [await create_endpoint(api, shop, f"https://8.8.4.4/{n}") for n in range(2)]
    first = (await api.get(PATH, params={"limit": 2}, headers=key)).json()
    assert [e["id"] for e in first["data"]] == [more[1]["id"], more[0]["id"]]
    assert first["has_more"] is True
    rest = (
        await api.get(PATH, params={"limit": 2, "starting_after": more[0]["id"]}, headers=key)
    ).json()
    assert [e["id"] for e in rest["data"]] == [created["id"]] and rest["has_more"] is False

    deleted = await api.delete(f"{PATH}/{created['id']}", headers=key)
    assert deleted.status_code == 200 and deleted.json()["id"] == created["id"]
    assert_problem(await api.get(f"{PATH}/{created['id']}", headers=key), 404, "not-found")
    assert_problem(await api.delete(f"{PATH}/{created['id']}", headers=key), 404, "not-found")


async def test_writes_are_idempotent_and_a_replay_shows_the_same_secret(
    api: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision(unique("Retrying shop"))
    headers = {**bearer(shop.secret_key), "Idempotency-Key": unique("create")}
    body = {"url": "https://8.8.8.8/x", "event_types": ["offer.redeemed"]}
    first = await api.post(PATH, json=body, headers=headers)
    again = await api.post(PATH, json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotency-replayed"] == "true"
    assert again.headers["cache-control"] == "no-store"
    listed = (await api.get(PATH, headers=bearer(shop.secret_key))).json()["data"]
    assert len(listed) == 1
    # The stored answer holds the secret sealed, never in the clear.
    async with tenant_tx(db, tenant_of(shop)) as conn:
        stored = await conn.fetch("SELECT response FROM idempotency_keys")
    assert stored and all(first.json()["secret"].encode() not in r["response"] for r in stored)

    reused = await api.post(PATH, json={**body, "description": "other"}, headers=headers)
    assert_problem(reused, 422, "idempotency-key-reused")

    endpoint_id = first.json()["id"]
    rotate_key = {**bearer(shop.secret_key), "Idempotency-Key": unique("rotate")}
    rotated = await api.post(f"{PATH}/{endpoint_id}/rotate-secret", headers=rotate_key)
    replayed = await api.post(f"{PATH}/{endpoint_id}/rotate-secret", headers=rotate_key)
    assert rotated.status_code == replayed.status_code == 200
    assert rotated.json()["secret"] == replayed.json()["secret"] != first.json()["secret"]

    patch_key = {**bearer(shop.secret_key), "Idempotency-Key": unique("patch")}
    patched = [
        await api.patch(f"{PATH}/{endpoint_id}", json={"description": "v2"}, headers=patch_key)
        for _ in range(2)
    ]
    assert patched[0].json() == patched[1].json()
    assert patched[1].headers["idempotency-replayed"] == "true"

    delete_key = {**bearer(shop.secret_key), "Idempotency-Key": unique("delete")}
    gone = [await api.delete(f"{PATH}/{endpoint_id}", headers=delete_key) for _ in range(2)]
    assert [g.status_code for g in gone] == [200, 200]
    assert gone[1].headers["idempotency-replayed"] == "true"


async def test_credentials_scopes_and_shops(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    mine, theirs = await provision(unique("Mine")), await provision(unique("Theirs"))
    endpoint = await create_endpoint(api, mine, "https://8.8.8.8/mine")
    url = f"{PATH}/{endpoint['id']}"

    assert_problem(await api.get(PATH), 401, "unauthenticated")
    assert_problem(await api.post(PATH, json={}), 401, "unauthenticated")
    restricted = await api.post(
        "/v1/api-keys",
        json={"kind": "restricted", "scopes": ["customers:read", "offers:write"]},
        headers=bearer(mine.secret_key),
    )
    weak = bearer(restricted.json()["key"])
    for response in (
        await api.get(PATH, headers=weak),
        await api.get(url, headers=weak),
        await api.post(PATH, json={"url": "https://8.8.8.8/", "event_types": ["*"]}, headers=weak),
        await api.post(f"{url}/test", headers=weak),
    ):
        assert_problem(response, 403, "insufficient-scope")
    assert_problem(await api.get(PATH, headers=bearer(mine.publishable_key)), 403, "forbidden")

    other = bearer(theirs.secret_key)
    assert (await api.get(PATH, headers=other)).json()["data"] == []
    for response in (
        await api.get(url, headers=other),
        await api.patch(url, json={"description": "x"}, headers=other),
        await api.delete(url, headers=other),
        await api.post(f"{url}/rotate-secret", headers=other),
        await api.post(f"{url}/test", headers=other),
        await api.get(f"{url}/deliveries", headers=other),
        await api.post(f"{url}/deliveries/whd_0/redeliver", headers=other),
    ):
        assert_problem(response, 404, "not-found")
    assert (await api.get(url, headers=bearer(mine.secret_key))).status_code == 200


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"url": "https://8.8.8.8/", "event_types": ["offer.issued", "offer.nope"]},
         "$.event_types[1]"),
        ({"url": "https://8.8.8.8/", "event_types": ["*", "offer.issued"]}, "$.event_types"),
        ({"url": "https://8.8.8.8/", "event_types": []}, "$.event_types"),
        ({"url": "https://8.8.8.8/", "event_types": ["*"], "description": "x" * 501},
         "$.description"),
        ({"url": "https://8.8.8.8/", "event_types": ["*"], "enabled": "yes"}, "$.enabled"),
        ({"url": "", "event_types": ["*"]}, "$.url"),
        ({"url": "https://10.1.2.3/", "event_types": ["*"]}, "$.url"),
        ({"url": "https://0x7f000001/", "event_types": ["*"]}, "$.url"),
        ({"url": "https://nowhere.invalid/", "event_types": ["*"]}, "$.url"),
    ],
)  # fmt: skip
async def test_bad_endpoints_are_422_with_the_failing_path(
    client: httpx.AsyncClient, provision: ProvisionFactory, body: dict[str, Any], path: str
) -> None:
    shop = await provision(unique("Strict shop"))
    response = await client.post(PATH, json=body, headers=bearer(shop.secret_key))
    problem = assert_problem(response, 422, "validation")
    assert path in [e["path"] for e in problem["errors"]], problem  # type: ignore[union-attr]
    assert (await client.get(PATH, headers=bearer(shop.secret_key))).json()["data"] == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://192.168.0.10/hook", "a private address"),
        ("http://127.0.0.1:8080/hook", "a loopback address"),
        ("https://localhost/hook", "a loopback host"),
        ("https://169.254.1.1/hook", "a link-local address"),
        ("https://[::ffff:127.0.0.1]/hook", "an IPv4-mapped IPv6 address"),
        ("https://2130706433/hook", "in another notation"),
        ("https://0x7f000001/hook", "in another notation"),
        ("https://0177.0.0.1/hook", "in another notation"),
        ("https://169.254.169.254/latest/meta-data/", "a cloud metadata address"),
        ("https://100.100.100.200/", "a cloud metadata address"),
    ],
)
async def test_the_api_refuses_unsafe_urls_on_create_and_update(
    client: httpx.AsyncClient, provision: ProvisionFactory, url: str, reason: str
) -> None:
    """The default app (no loopback allowance) refuses each with a 422 naming ``$.url``."""
    shop = await provision(unique("Guarded shop"))
    key = bearer(shop.secret_key)
    created = await client.post(PATH, json={"url": url, "event_types": ["*"]}, headers=key)
    problem = assert_problem(created, 422, "validation")
    assert problem["errors"][0]["path"] == "$.url"  # type: ignore[index]
    assert reason in problem["errors"][0]["message"]  # type: ignore[index]
    endpoint = await client.post(
        PATH, json={"url": "https://8.8.8.8/", "event_types": ["*"]}, headers=key
    )
    updated = await client.patch(f"{PATH}/{endpoint.json()['id']}", json={"url": url}, headers=key)
    assert assert_problem(updated, 422, "validation")["errors"][0]["path"] == "$.url"  # type: ignore[index]


async def test_production_takes_https_only(db: Database, provision: ProvisionFactory) -> None:
    app = make_app(db, environment="production", database_url="postgresql://unused/x")
    shop = await provision(unique("Live shop"))
    async with http_client(app) as client:
        response = await client.post(
            PATH,
            json={"url": "http://8.8.8.8/hook", "event_types": ["*"]},
            headers=bearer(shop.secret_key),
        )
    problem = assert_problem(response, 422, "validation")
    assert problem["errors"] == [{"path": "$.url", "message": "must be an https:// URL"}]


# --- delivery through the worker --------------------------------------------------------------


async def test_deliveries_are_signed_retried_after_500s_logged_and_deduped_by_the_receiver(
    api: httpx.AsyncClient,
    provision: ProvisionFactory,
    receiver: Receiver,
    db: Database,
    db_url: str,
    keyring: Keyring,
) -> None:
    shop = await provision(unique("Delivering shop"))
    endpoint, path = await endpoint_to(api, receiver, shop, "flaky", ["offer.issued"], [500, 503])
    await publish_event(db, shop, "offer.issued", code="SAVE10")
    assert await run_dispatch(db, shop) == 1

    async with running_worker(db, db_url, keyring):
        await until(lambda: len(receiver.at(path)) == 3)
        await eventually(lambda: finished(api, shop, endpoint["id"]))
        [first] = await deliveries(api, shop, endpoint["id"])
        redelivered = await api.post(
            f"{PATH}/{endpoint['id']}/deliveries/{first['id']}/redeliver",
            headers=bearer(shop.secret_key),
        )
        assert redelivered.status_code == 202, redelivered.text
        assert redelivered.json()["status"] == "pending"
        await until(lambda: len(receiver.at(path)) == 4)
        await eventually(lambda: finished(api, shop, endpoint["id"]))

    got = receiver.at(path)
    assert [r.status for r in got] == [500, 503, 200, 200]
    assert all(r.verified_with == [endpoint["secret"]] for r in got)
    event_ids = {r.event["id"] for r in got}
    assert len(event_ids) == 1 and next(iter(event_ids)).startswith("evt_")
    assert receiver.processed[path] == list(event_ids)  # four deliveries, processed once
    event = got[0].event
    assert set(event) == {"id", "type", "created_at", "occurred_at", "data"}
    assert event["type"] == "offer.issued" and event["data"]["code"] == "SAVE10"
    assert [r.headers["sjaak-delivery-attempt"] for r in got] == ["1", "2", "3", "1"]
    assert got[0].headers["user-agent"].startswith("Sjaak-Webhooks/")
    assert got[0].headers["content-type"] == "application/json"
    assert got[0].headers["host"] == receiver.base.removeprefix("http://")

    log = await deliveries(api, shop, endpoint["id"])
    assert [d["trigger"] for d in log] == ["redelivery", "event"]
    again, original = log
    assert again["redelivery_of"] == original["id"]
    assert again["event"]["id"] == original["event"]["id"] == event["id"]
    assert original["status"] == "succeeded" and original["next_attempt_at"] is None
    attempts = original["attempts"]
    assert [a["number"] for a in attempts] == [1, 2, 3]
    assert [a["response"]["status"] for a in attempts] == [500, 503, 200]
    assert [a["error"] for a in attempts] == ["HTTP 500", "HTTP 503", None]
    assert attempts[0]["response"]["body"] == '{"status": 500}'
    assert attempts[0]["address"] == "127.0.0.1"
    assert all(a["duration_ms"] >= 0 for a in attempts)
    sent = attempts[2]["request"]
    assert json.loads(sent["body"]) == event
    assert sent["headers"]["Sjaak-Signature"] == got[2].headers["sjaak-signature"]
    assert sent["headers"]["Sjaak-Event-Id"] == event["id"]
    # Filters and the single delivery.
    assert [d["id"] for d in await deliveries(api, shop, endpoint["id"], status="succeeded")] == [
        again["id"],
        original["id"],
    ]
    assert await deliveries(api, shop, endpoint["id"], status="failed") == []
    one = await api.get(
        f"{PATH}/{endpoint['id']}/deliveries/{original['id']}", headers=bearer(shop.secret_key)
    )
    assert one.json() == original
    page = await api.get(
        f"{PATH}/{endpoint['id']}/deliveries",
        params={"limit": 1, "starting_after": again["id"]},
        headers=bearer(shop.secret_key),
    )
    assert [d["id"] for d in page.json()["data"]] == [original["id"]]
    # The endpoint's failure run ended with the success.
    current = (await api.get(f"{PATH}/{endpoint['id']}", headers=bearer(shop.secret_key))).json()
    assert current["failing_since"] is None and current["consecutive_failures"] == 0


async def test_the_dispatcher_makes_one_delivery_per_subscribed_endpoint_per_event(
    api: httpx.AsyncClient,
    provision: ProvisionFactory,
    receiver: Receiver,
    db: Database,
    db_url: str,
    keyring: Keyring,
) -> None:
    shop, other = await provision(unique("Busy shop")), await provision(unique("Other shop"))
    _, offers = await endpoint_to(api, receiver, shop, "offers", ["offer.issued"])
    _, everything = await endpoint_to(api, receiver, shop, "all", ["*"])
    _, loyalty = await endpoint_to(api, receiver, shop, "loyalty", ["loyalty.tier_changed"])
    off, disabled = await endpoint_to(api, receiver, shop, "off", ["*"])
    await api.patch(f"{PATH}/{off['id']}", json={"enabled": False}, headers=bearer(shop.secret_key))
    _, theirs = await endpoint_to(api, receiver, other, "theirs", ["*"])

    for _ in range(3):
        await publish_event(db, shop, "offer.issued")
    await publish_event(db, shop, "customer.stage_changed")
    await publish_event(db, other, "offer.redeemed")
    # Twice at once, then again: rows are taken once (SKIP LOCKED) and marked dispatched.
    made = await asyncio.gather(run_dispatch(db, shop), run_dispatch(db, shop))
    assert sum(made) == 3 + 4
    assert await run_dispatch(db, shop) == 0
    # Even rows marked undispatched again make no second delivery.
    async with tenant_tx(db, tenant_of(shop)) as conn:
        await conn.execute("UPDATE outbox SET delivered_at = NULL")
    assert await run_dispatch(db, shop) == 0
    assert await run_dispatch(db, other) == 1

    async with running_worker(db, db_url, keyring):
        await until(lambda: len(receiver.at(offers)) == 3 and len(receiver.at(everything)) == 4)
        await until(lambda: len(receiver.at(theirs)) == 1)
        async with tenant_tx(db, tenant_of(shop)) as conn:
            await eventually(
                lambda: conn.fetchval(
                    "SELECT count(*) = 0 FROM webhook_deliveries WHERE status = 'pending'"
                )
            )
    assert len({r.event["id"] for r in receiver.at(offers)}) == 3
    assert {r.event["type"] for r in receiver.at(everything)} == {
        "offer.issued",
        "customer.stage_changed",
    }
    assert receiver.at(loyalty) == [] and receiver.at(disabled) == []
    assert [r.event["type"] for r in receiver.at(theirs)] == ["offer.redeemed"]
    # The same event has the same id at every endpoint.
    assert {r.event["id"] for r in receiver.at(offers)} < {
        r.event["id"] for r in receiver.at(everything)
    }


async def test_loyalty_events_from_the_outbox_reach_subscribers(
    api: httpx.AsyncClient,
    provision: ProvisionFactory,
    receiver: Receiver,
    db: Database,
    db_url: str,
    keyring: Keyring,
) -> None:
    from tests.test_loyalty import PROGRAM, purchase
    from tests.test_touchpoints import NOW, send

    shop = await provision(unique("Loyal hooks"))
    put = await api.put("/v1/config/loyalty", json=PROGRAM, headers=bearer(shop.secret_key))
    assert put.status_code == 200, put.text
    _, path = await endpoint_to(api, receiver, shop, "points", ["loyalty.points_earned"])
    await send(api, shop.secret_key, purchase("c-42", "o-1", 12_345, NOW - timedelta(hours=1)))
    assert await run_dispatch(db, shop) == 1
    async with running_worker(db, db_url, keyring):
        await until(lambda: len(receiver.at(path)) == 1)
    [got] = receiver.at(path)
    assert got.verified_with and got.event["type"] == "loyalty.points_earned"
    assert got.event["data"]["customer_id"] == "c-42" and got.event["data"]["points"] == 123


async def test_a_test_event_and_a_rotated_secret(
    api: httpx.AsyncClient,
    provision: ProvisionFactory,
    receiver: Receiver,
    db: Database,
    db_url: str,
    keyring: Keyring,
) -> None:
    shop = await provision(unique("Testing shop"))
    key = bearer(shop.secret_key)
    endpoint, path = await endpoint_to(api, receiver, shop, "test", ["offer.issued"])
    old = endpoint["secret"]
    async with running_worker(db, db_url, keyring):
        tested = await api.post(f"{PATH}/{endpoint['id']}/test", headers=key)
        assert tested.status_code == 202, tested.text
        assert tested.json()["trigger"] == "test"
        assert tested.json()["event"]["type"] == "webhook.test"
        await until(lambda: len(receiver.at(path)) == 1)

        rotated = await api.post(f"{PATH}/{endpoint['id']}/rotate-secret", headers=key)
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()["secret"]
        assert new.startswith("whsec_") and new != old
        assert rotated.json()["previous_secret_expires_at"] is not None
        receiver.secrets[path] = [new, old]
        await api.post(f"{PATH}/{endpoint['id']}/test", headers=key)
        await until(lambda: len(receiver.at(path)) == 2)

        # Without a grace period the rotated-out secret stops at once.
        final = await api.post(
            f"{PATH}/{endpoint['id']}/rotate-secret", json={"expires_in": 0}, headers=key
        )
        newest = final.json()["secret"]
        assert final.json()["previous_secret_expires_at"] is None
        receiver.secrets[path] = [newest, new, old]
        await api.post(f"{PATH}/{endpoint['id']}/test", headers=key)
        await until(lambda: len(receiver.at(path)) == 3)

    first, second, third = receiver.at(path)
    assert first.event["type"] == "webhook.test"
    assert first.event["data"]["endpoint_id"] == endpoint["id"]
    assert first.verified_with == [old]
    assert first.headers["sjaak-signature"].count("v1=") == 1
    assert second.headers["sjaak-signature"].count("v1=") == 2
    assert second.verified_with == [new, old]
    assert third.headers["sjaak-signature"].count("v1=") == 1
    assert third.verified_with == [newest]
    tests = await deliveries(api, shop, endpoint["id"])
    assert [d["trigger"] for d in tests] == ["test"] * 3
    assert all(d["status"] == "succeeded" for d in tests)


async def test_redirects_are_not_followed_even_to_metadata(
    api: httpx.AsyncClient,
    provision: ProvisionFactory,
    receiver: Receiver,
    db: Database,
    db_url: str,
    keyring: Keyring,
) -> None:
    shop = await provision(unique("Redirected shop"))
    endpoint, path = await endpoint_to(api, receiver, shop, "redirect", ["*"])
    tested = await api.post(f"{PATH}/{endpoint['id']}/test", headers=bearer(shop.secret_key))
    assert tested.status_code == 202
    async with running_worker(db, db_url, keyring):
        await eventually(lambda: finished(api, shop, endpoint["id"]))
    assert [r.status for r in receiver.at(path)] == [302]
    [delivered] = await deliveries(api, shop, endpoint["id"])
    assert delivered["status"] == "failed"
    [attempt] = delivered["attempts"]
    assert attempt["response"]["status"] == 302
    assert attempt["response"]["body"].startswith(f"[Location: {METADATA_REDIRECT}]")
    assert "redirects are not followed" in attempt["error"]


async def test_the_guard_runs_again_at_delivery_time(
    api: httpx.AsyncClient,
    provision: ProvisionFactory,
    receiver: Receiver,
    db: Database,
    db_url: str,
    keyring: Keyring,
) -> None:
    """An endpoint saved while loopback was allowed is refused by a worker that does not allow
    it: nothing is sent, and the attempt says why."""
    shop = await provision(unique("Rechecked shop"))
    endpoint, path = await endpoint_to(api, receiver, shop, "recheck", ["offer.issued"])
    await publish_event(db, shop)
    await run_dispatch(db, shop)
    give_up = RetryPolicy(give_up_after=timedelta(0), disable_min_failures=1000)
    async with running_worker(db, db_url, keyring, give_up, webhooks_allow_loopback=False):
        await eventually(lambda: finished(api, shop, endpoint["id"]))
    assert receiver.at(path) == []
    [delivered] = await deliveries(api, shop, endpoint["id"])
    assert delivered["status"] == "failed"  # given up at once by this policy
    [attempt] = delivered["attempts"]
    assert attempt["response"] is None and attempt["address"] is None
    assert attempt["error"] == "refused: the URL points at 127.0.0.1, a loopback address"


async def test_an_endpoint_failing_for_long_enough_is_disabled_with_a_notice(
    api: httpx.AsyncClient,
    provision: ProvisionFactory,
    receiver: Receiver,
    db: Database,
    db_url: str,
    keyring: Keyring,
) -> None:
    shop = await provision(unique("Failing shop"))
    key = bearer(shop.secret_key)
    failing, down = await endpoint_to(api, receiver, shop, "down", ["offer.issued"], [500] * 100)
    _, watcher = await endpoint_to(api, receiver, shop, "watch", ["webhook_endpoint.disabled"])
    await publish_event(db, shop)
    await publish_event(db, shop)
    assert await run_dispatch(db, shop) == 2
    impatient = RetryPolicy(
        first_delay=timedelta(milliseconds=50),
        max_delay=timedelta(milliseconds=100),
        disable_after=timedelta(0),
        disable_min_failures=3,
    )
    async with running_worker(db, db_url, keyring, impatient):

        async def disabled() -> bool:
            found = await api.get(f"{PATH}/{failing['id']}", headers=key)
            return found.json()["enabled"] is False

        await eventually(disabled)
        await eventually(lambda: finished(api, shop, failing["id"]))
        assert await run_dispatch(db, shop) == 1  # the notice, to the watcher
        await until(lambda: len(receiver.at(watcher)) == 1)

    current = (await api.get(f"{PATH}/{failing['id']}", headers=key)).json()
    assert current["disabled_reason"] == "sustained_failure"
    assert current["disabled_at"] is not None and current["consecutive_failures"] == 3
    # Attempts already on their way when it was disabled may still arrive; no more follow.
    assert len(receiver.at(down)) in (3, 4)
    statuses = sorted(d["status"] for d in await deliveries(api, shop, failing["id"]))
    assert statuses == ["cancelled", "failed"]
    [notice] = receiver.at(watcher)
    assert notice.event["type"] == "webhook_endpoint.disabled"
    assert notice.event["data"]["endpoint_id"] == failing["id"]
    assert notice.event["data"]["consecutive_failures"] == 3

    # Enabling it again clears the record.
    enabled = await api.patch(f"{PATH}/{failing['id']}", json={"enabled": True}, headers=key)
    assert enabled.json()["enabled"] is True
    assert enabled.json()["disabled_reason"] is None and enabled.json()["disabled_at"] is None
    assert enabled.json()["failing_since"] is None and enabled.json()["consecutive_failures"] == 0


async def test_retries_back_off_exponentially_with_jitter_for_three_days() -> None:
    policy = RetryPolicy()
    nominal = [30, 60, 120, 240, 480, 960, 1920, 3840, 7680, 15360, 21600, 21600]
    for attempt, seconds in enumerate(nominal, start=1):
        delays = {policy.delay(attempt).total_seconds() for _ in range(20)}
        assert all(0.75 * seconds <= d <= 1.25 * seconds for d in delays), attempt
        assert len(delays) > 1  # jittered
    total, attempts = timedelta(0), 1
    while total + policy.delay(attempts) <= policy.give_up_after:
        total += policy.delay(attempts)
        attempts += 1
    assert 15 <= attempts <= 25


# --- TLS to the checked address, under the URL's name ------------------------------------------


def issue(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: Any, ca: bool,
          san: str | None = None) -> x509.Certificate:  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture
def tls_receiver(tmp_path: Path) -> Iterator[tuple[int, ssl.SSLContext, list[Any]]]:
    """An https server on 127.0.0.1 with a certificate for ``localhost`` from a CA of the test's
    own; yields its port, a client context trusting that CA, and what it saw (SNI, Host)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Sjaak test CA")])
    ca = issue("Sjaak test CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = issue("localhost", key, ca_name, ca_key, ca=False, san="localhost")
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    seen: list[Any] = []
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "key.pem")
    server_tls.sni_callback = lambda _sock, name, _ctx: seen.append(("sni", name))  # type: ignore[assignment,func-returns-value]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            seen.append(("host", self.headers["Host"]))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = server_tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client_tls = ssl.create_default_context(
        cadata=ca.public_bytes(serialization.Encoding.PEM).decode()
    )
    try:
        yield server.server_address[1], client_tls, seen
    finally:
        server.shutdown()
        server.server_close()


async def test_https_goes_to_the_checked_address_under_the_urls_name(
    tls_receiver: tuple[int, ssl.SSLContext, list[Any]],
) -> None:
    """``localhost`` is resolved once and the connection made to a checked address (::1 first
    perhaps, where nothing listens, then 127.0.0.1); TLS still names ``localhost`` (SNI) and the
    certificate is checked against that name."""
    port, trusted, seen = tls_receiver
    url = f"https://localhost:{port}/hook"
    sent = await outbound.post(url, {}, b"{}", allow_http=False, allow_loopback=True, tls=trusted)
    assert (sent.status, sent.error, sent.address) == (204, None, "127.0.0.1")
    assert seen == [("sni", "localhost"), ("host", f"localhost:{port}")]
    # Without the test CA the certificate is not trusted: verification is on.
    untrusted = await outbound.post(url, {}, b"{}", allow_http=False, allow_loopback=True)
    assert untrusted.status is None and "CERTIFICATE_VERIFY_FAILED" in (untrusted.error or "")
    # Nor would the name match an address: https://127.0.0.1 is refused by the certificate.
    by_address = await outbound.post(
        f"https://127.0.0.1:{port}/hook", {}, b"{}", allow_http=False, allow_loopback=True,
        tls=trusted,
    )  # fmt: skip
    assert by_address.status is None and "CERTIFICATE_VERIFY_FAILED" in (by_address.error or "")


# --- wiring and SQL ---------------------------------------------------------------------------


async def test_publish_refuses_unknown_types(db: Database, provision: ProvisionFactory) -> None:
    shop = await provision(unique("Publishing shop"))
    async with tenant_tx(db, tenant_of(shop)) as conn:
        with pytest.raises(ValueError, match="unknown event type"):
            await publish(conn, "offer.isued", {})
        await publish(conn, "customer.deleted", {"customer_id": "c1"})
        assert await conn.fetchval("SELECT type FROM outbox") == "customer.deleted"


def test_the_jobs_are_registered() -> None:
    assert {j.name: j.cron for j in periodic_jobs()}["webhooks-dispatch"] == "* * * * * */5"
    assert "prune-webhook-events" in {j.name for j in periodic_jobs()}
    assert dispatch.ENTRYPOINT in {j.entrypoint for j in queued_jobs()}


async def test_every_query_prepares_against_a_shop_schema(
    db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Prepared hooks"))
    queries = {
        f"{module.__name__}.{name}": value
        for module in (endpoints, events, dispatch, delivery, history)
        for name, value in vars(module).items()
        if name.endswith("_SQL") and isinstance(value, str) and name != "_ENQUEUE_SQL"
    }
    assert len(queries) >= 25
    async with tenant_tx(db, tenant_of(shop)) as conn:
        for name, sql in queries.items():
            assert "SELECT *" not in sql and "shop_" not in sql and "sjaak." not in sql, name
            await conn.prepare(sql)
        assert await dispatch.prune_events(conn) == 0


async def test_pruning_removes_old_dispatched_outbox_rows_only(
    db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Pruned outbox"))
    async with tenant_tx(db, tenant_of(shop)) as conn:
        for _ in range(3):
            await publish(conn, "customer.deleted", {"customer_ids": ["x"]})
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM outbox ORDER BY id")]
        await conn.execute(
            "UPDATE outbox SET delivered_at = now() - interval '31 days' WHERE id = $1", ids[0]
        )
        await conn.execute("UPDATE outbox SET delivered_at = now() WHERE id = $1", ids[1])
        assert await dispatch.prune_events(conn) == 1
        left = [r["id"] for r in await conn.fetch("SELECT id FROM outbox ORDER BY id")]
    assert left == ids[1:]


async def test_the_plan_caps_webhook_endpoints(db: Database, provision: ProvisionFactory) -> None:
    settings = {"billing_plans": "", "webhooks_allow_loopback": True}
    async with http_client(make_app(db, **settings)) as client:  # the real plans
        key = (await provision(unique("Capped hooks"))).secret_key
        body = {"url": "http://127.0.0.1:9/hook", "event_types": ["*"]}
        made = await client.post("/v1/webhook-endpoints", json=body, headers=bearer(key))
        assert made.status_code == 201, made.text
        refused = await client.post("/v1/webhook-endpoints", json=body, headers=bearer(key))
        assert_problem(refused, 403, "plan-limit-reached")
