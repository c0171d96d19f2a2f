"""API keys end to end: the key format, every way authentication fails, publishable keys and
CORS, shop isolation, scopes, suspension, rotation, creation, pagination, logs, last use, rate
limits, and the one authorization model every route follows.

Everything runs against the real database through the real app; each test provisions its own
shops, so tests do not depend on each other or on the order they run in.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from litestar import Litestar, Request, post
from litestar.handlers.base import BaseRouteHandler

from api.app import publishable_paths
from api.auth import api_keys
from api.auth.guards import is_public, principal_of, required_scopes
from api.auth.key_format import (
    BASE62,
    KEY_PATTERN,
    KeyFormatError,
    checksum,
    generate_key,
    masked,
    parse_key,
)
from api.auth.scopes import ALL_SCOPES, PUBLISHABLE_SCOPES
from api.auth.secrets import Keyring
from api.db import Database
from api.tenants.lifecycle import ProvisionedShop, resume_tenant, suspend_tenant
from tests.conftest import ProvisionFactory, bearer, http_client, make_app
from tests.test_http import JsonLines, assert_problem

KEYS = "/v1/api-keys"
ME = "/v1/me"
INGEST = "/test/ingest"
SHOP_ORIGIN = "https://shop.example"
#: ``sjk_<kind>_<mode>_``: 12 characters, then 30 random ones, then the 6-character checksum.
PREFIX_LENGTH = 12
RANDOM_LENGTH = 30


# --- helpers ---------------------------------------------------------------------------------


def unique(label: str) -> str:
    """A shop name no response could contain by accident."""
    return f"{label} {uuid.uuid4().hex[:10]}"


def mistype(key: str, position: int = PREFIX_LENGTH + 20) -> str:
    """``key`` with one character of its random part replaced, as a typo would."""
    replacement = "A" if key[position] != "A" else "B"
    return key[:position] + replacement + key[position + 1 :]


def assert_unauthenticated(
    response: httpx.Response, reason: str, *shops: ProvisionedShop
) -> dict[str, Any]:
    """A 401 problem with a Bearer challenge naming ``reason``, saying nothing about the shop."""
    body: dict[str, Any] = assert_problem(response, 401, "unauthenticated")
    challenge = response.headers["www-authenticate"]
    if reason == "missing":
        assert challenge == 'Bearer realm="sjaak"'
    else:
        assert challenge.startswith('Bearer realm="sjaak"')
        assert f'error_description="{reason}"' in challenge
    for shop in shops:
        assert shop.tenant.name not in response.text
        assert str(shop.tenant.id) not in response.text
        assert shop.tenant.schema_name not in response.text
    return body


async def create_key(client: httpx.AsyncClient, secret: str, **body: Any) -> dict[str, Any]:
    response = await client.post(KEYS, json=body, headers=bearer(secret))
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def list_all(client: httpx.AsyncClient, secret: str) -> list[dict[str, Any]]:
    response = await client.get(KEYS, params={"limit": 100}, headers=bearer(secret))
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["data"]
    return items


async def key_id_of(client: httpx.AsyncClient, secret: str, kind: str) -> str:
    """The id of the shop's (single) key of ``kind``, as listed."""
    [key_id] = [k["id"] for k in await list_all(client, secret) if k["kind"] == kind]
    return str(key_id)


async def works(client: httpx.AsyncClient, key: str) -> bool:
    response = await client.get(KEYS, params={"limit": 1}, headers=bearer(key))
    assert response.status_code in (200, 401), response.text
    return response.status_code == 200


def when(value: str) -> datetime:
    return datetime.fromisoformat(value)


# --- a test-only publishable route, for CORS -------------------------------------------------


@post(INGEST, opt={"scopes": ("touchpoints:write",), "publishable": True}, status_code=202)
async def ingest(request: Request[Any, Any, Any]) -> dict[str, str]:
    principal = principal_of(request)
    return {"tenant": str(principal.tenant.id), "kind": principal.kind}


@pytest.fixture(scope="module")
def ingest_app(db: Database) -> Litestar:
    app = make_app(db)
    app.register(ingest)
    # create_app computed the preflight paths before this route existed.
    app.state.publishable_paths = publishable_paths(app)
    return app


@pytest.fixture
async def ingest_client(ingest_app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(ingest_app) as client:
        yield client


# --- the key format --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["publishable", "secret", "restricted"])
@pytest.mark.parametrize("mode", ["live", "test"])
def test_a_generated_key_parses_back_to_its_kind_and_mode(kind: Any, mode: Any) -> None:
    key = generate_key(kind, mode)
    assert KEY_PATTERN.fullmatch(key)
    assert len(key) == PREFIX_LENGTH + RANDOM_LENGTH + 6
    assert parse_key(key) == (kind, mode)
    assert masked(kind, mode, key[-4:]).endswith(key[-4:])
    assert generate_key(kind, mode) != key


@pytest.mark.parametrize("kind", ["publishable", "secret", "restricted"])
def test_every_single_character_typo_in_the_random_part_fails_the_checksum(kind: Any) -> None:
    key = generate_key(kind)
    tried = 0
    for position in range(PREFIX_LENGTH, PREFIX_LENGTH + RANDOM_LENGTH):
        for char in BASE62:
            if char == key[position]:
                continue
            typo = key[:position] + char + key[position + 1 :]
            with pytest.raises(KeyFormatError) as caught:
                parse_key(typo)
            assert caught.value.reason == "checksum", (position, char)
            tried += 1
    assert tried == RANDOM_LENGTH * (len(BASE62) - 1)


def test_the_checksum_covers_the_kind_too() -> None:
    """A publishable key edited into a secret-looking one fails before any look-up."""
    key = generate_key("publishable")
    forged = key.replace("sjk_pk_", "sjk_sk_", 1)
    with pytest.raises(KeyFormatError) as caught:
        parse_key(forged)
    assert caught.value.reason == "checksum"
    assert checksum(forged[:-6]) != forged[-6:]


_GOOD = "sjk_sk_live_" + "a" * RANDOM_LENGTH


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("sjk_xk_live_" + "a" * 36, id="unknown-kind"),
        pytest.param("sjk_sk_prod_" + "a" * 36, id="unknown-mode"),
        pytest.param("SJK_sk_live_" + "a" * 36, id="upper-case-prefix"),
        pytest.param("sk_live_" + "a" * 36, id="no-sjk"),
        pytest.param("sjk-sk-live-" + "a" * 36, id="dashes"),
        pytest.param("xsjk_sk_live_" + "a" * 36, id="leading-junk"),
        pytest.param(_GOOD[:-1] + checksum(_GOOD[:-1]), id="random-part-too-short"),
        pytest.param(_GOOD + "a" + checksum(_GOOD + "a"), id="random-part-too-long"),
        pytest.param(_GOOD + checksum(_GOOD)[:-1], id="checksum-too-short"),
        pytest.param(_GOOD + checksum(_GOOD) + "0", id="one-char-too-long"),
        pytest.param(_GOOD[:-1] + "-" + checksum(_GOOD[:-1] + "-"), id="not-base62"),
        pytest.param(_GOOD + checksum(_GOOD) + "\n", id="trailing-newline"),
        pytest.param(" " + _GOOD + checksum(_GOOD), id="leading-space"),
        pytest.param("", id="empty"),
    ],
)
def test_the_pattern_rejects_wrong_prefixes_and_lengths(key: str) -> None:
    assert KEY_PATTERN.fullmatch(key) is None
    with pytest.raises(KeyFormatError) as caught:
        parse_key(key)
    assert caught.value.reason == "malformed"


def test_the_well_formed_reference_key_of_the_rejection_cases_parses() -> None:
    """The cases above differ from a valid key only in what each one breaks."""
    assert parse_key(_GOOD + checksum(_GOOD)) == ("secret", "live")


# --- authentication failures -----------------------------------------------------------------


async def test_a_mistyped_key_fails_on_its_checksum_without_a_database_lookup(
    client: httpx.AsyncClient, provision: ProvisionFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = await provision(unique("Typo shop"))
    looked_up: list[list[bytes]] = []
    real_find_key = api_keys.find_key

    async def spy(db: Database, digests: list[bytes]) -> api_keys.VerifiedKey | None:
        looked_up.append(digests)
        return await real_find_key(db, digests)

    monkeypatch.setattr(api_keys, "find_key", spy)

    response = await client.get(KEYS, headers=bearer(mistype(shop.secret_key)))
    body = assert_unauthenticated(response, "checksum", shop)
    assert "checksum" in body["detail"]
    assert looked_up == []

    # The spy is wired where the authenticator looks: a well-formed unknown key is looked up.
    unknown = await client.get(KEYS, headers=bearer(generate_key("secret")))
    assert_unauthenticated(unknown, "unknown", shop)
    assert len(looked_up) == 1


async def test_a_request_without_a_credential_gets_a_bearer_challenge(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get(KEYS)
    body = assert_unauthenticated(response, "missing")
    assert "Authorization" in body["detail"]


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Basic dXNlcjpwYXNzd29yZA==", id="basic"),
        pytest.param("Bearer", id="bearer-without-token"),
        pytest.param("Bearer    ", id="bearer-with-blanks"),
        pytest.param("Token sjk_sk_live_abc", id="other-scheme"),
        pytest.param("Bearer not-a-key-or-token", id="neither-key-nor-jwt"),
        pytest.param("Bearer sjk_sk_live_tooshort", id="malformed-key"),
    ],
)
async def test_a_malformed_authorization_header_is_401(
    client: httpx.AsyncClient, authorization: str
) -> None:
    response = await client.get(KEYS, headers={"Authorization": authorization})
    assert_unauthenticated(response, "malformed")


async def test_a_well_formed_key_that_does_not_exist_is_401(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Bystander shop"))
    response = await client.get(KEYS, headers=bearer(generate_key("secret")))
    body = assert_unauthenticated(response, "unknown", shop)
    assert "not recognised" in body["detail"]


async def test_an_expired_key_is_401_expired(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database, keyring: Keyring
) -> None:
    shop = await provision(unique("Expired-key shop"))
    async with db.control() as conn:
        expired = await api_keys.create_api_key(
            conn,
            keyring,
            shop.tenant.id,
            kind="secret",
            scopes=ALL_SCOPES,
            expires_at=datetime.now(UTC) - timedelta(minutes=1),
        )
    assert expired.status == "expired"
    response = await client.get(KEYS, headers=bearer(expired.key))
    body = assert_unauthenticated(response, "expired", shop)
    assert "expired" in body["detail"]
    assert await works(client, shop.secret_key)


async def test_a_revoked_key_is_401_revoked_at_once(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Revoking shop"))
    doomed = await create_key(client, shop.secret_key, kind="secret", name="doomed")
    assert await works(client, doomed["key"])  # now cached by this app's authenticator

    response = await client.delete(f"{KEYS}/{doomed['id']}", headers=bearer(shop.secret_key))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "revoked"
    assert response.json()["revoked_at"] is not None
    assert "key" not in response.json()

    refused = await client.get(KEYS, headers=bearer(doomed["key"]))
    body = assert_unauthenticated(refused, "revoked", shop)
    assert "revoked" in body["detail"]
    assert await works(client, shop.secret_key)


async def test_a_revocation_reaches_another_worker_on_its_next_request(
    db: Database, provision: ProvisionFactory
) -> None:
    """Two apps stand for two workers, each with its own cache; the feed tells the other."""
    shop = await provision(unique("Two-worker shop"))
    async with http_client(make_app(db)) as first, http_client(make_app(db)) as second:
        doomed = await create_key(first, shop.secret_key, kind="secret")
        assert await works(first, doomed["key"])
        assert await works(second, doomed["key"])  # cached in the second worker too

        revoked = await first.delete(f"{KEYS}/{doomed['id']}", headers=bearer(shop.secret_key))
        assert revoked.status_code == 200

        assert_unauthenticated(
            await second.get(KEYS, headers=bearer(doomed["key"])), "revoked", shop
        )


# --- publishable keys and CORS ---------------------------------------------------------------


async def test_a_publishable_key_is_forbidden_outside_touchpoint_ingest(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Browser shop"), allowed_origins=(SHOP_ORIGIN,))
    headers = {**bearer(shop.publishable_key), "Origin": SHOP_ORIGIN}
    for response in (
        await client.get(KEYS, headers=headers),
        await client.get(KEYS, headers=bearer(shop.publishable_key)),
        await client.post(KEYS, json={"kind": "secret"}, headers=headers),
        # Even the route any valid credential may call is not for browser keys.
        await client.get(ME, headers=headers),
    ):
        body = assert_problem(response, 403, "forbidden")
        assert "Publishable keys" in str(body["detail"])
        assert "access-control-allow-origin" not in response.headers
    assert len(await list_all(client, shop.secret_key)) == 2  # nothing was created


async def test_a_publishable_key_from_an_allowed_origin_gets_the_cors_grant(
    ingest_client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Ingest shop"), allowed_origins=(SHOP_ORIGIN,))
    response = await ingest_client.post(
        INGEST, headers={**bearer(shop.publishable_key), "Origin": SHOP_ORIGIN}
    )
    assert response.status_code == 202, response.text
    assert response.json() == {"tenant": str(shop.tenant.id), "kind": "publishable"}
    assert response.headers["access-control-allow-origin"] == SHOP_ORIGIN
    assert "Origin" in response.headers.get_list("vary")
    exposed = response.headers["access-control-expose-headers"]
    assert "x-request-id" in exposed and "retry-after" in exposed


async def test_a_publishable_key_from_another_origin_is_refused_without_a_grant(
    ingest_client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Ingest shop"), allowed_origins=(SHOP_ORIGIN,))
    for origin in ("https://evil.example", "http://shop.example", "https://shop.example:8443"):
        response = await ingest_client.post(
            INGEST, headers={**bearer(shop.publishable_key), "Origin": origin}
        )
        body = assert_problem(response, 403, "origin-not-allowed")
        assert origin in str(body["detail"])
        assert "access-control-allow-origin" not in response.headers


async def test_a_publishable_key_without_an_origin_is_accepted_on_ingest(
    ingest_client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Server-side ingest shop"), allowed_origins=(SHOP_ORIGIN,))
    response = await ingest_client.post(INGEST, headers=bearer(shop.publishable_key))
    assert response.status_code == 202, response.text
    assert response.json()["tenant"] == str(shop.tenant.id)
    assert "access-control-allow-origin" not in response.headers


async def test_a_preflight_on_the_publishable_route_is_granted_without_a_credential(
    ingest_client: httpx.AsyncClient,
) -> None:
    response = await ingest_client.options(
        INGEST,
        headers={
            "Origin": SHOP_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status_code in (200, 204), response.text
    assert response.headers["access-control-allow-origin"] == SHOP_ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed_headers = response.headers["access-control-allow-headers"]
    assert "authorization" in allowed_headers and "content-type" in allowed_headers
    assert int(response.headers["access-control-max-age"]) > 0
    assert "Origin" in response.headers.get_list("vary")


async def test_a_preflight_on_a_secret_route_gets_no_cors_grant(
    ingest_client: httpx.AsyncClient,
) -> None:
    response = await ingest_client.options(
        KEYS, headers={"Origin": SHOP_ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert response.status_code in (200, 204), response.text
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-methods" not in response.headers


# --- shop isolation --------------------------------------------------------------------------


async def test_another_shops_key_is_not_found_and_left_alone(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop_a = await provision(unique("Shop A"))
    shop_b = await provision(unique("Shop B"))
    b_secret_id = await key_id_of(client, shop_b.secret_key, "secret")
    b_extra = await create_key(client, shop_b.secret_key, kind="secret", name="B's extra")
    a_headers = bearer(shop_a.secret_key)

    for key_id in (b_secret_id, b_extra["id"]):
        for response in (
            await client.get(f"{KEYS}/{key_id}", headers=a_headers),
            await client.delete(f"{KEYS}/{key_id}", headers=a_headers),
            await client.post(f"{KEYS}/{key_id}/rotate", headers=a_headers),
            await client.post(f"{KEYS}/{key_id}/rotate", json={"expires_in": 0}, headers=a_headers),
        ):
            body = assert_problem(response, 404, "not-found")
            assert shop_b.tenant.name not in response.text
            assert str(shop_b.tenant.id) not in response.text
            # Exactly what a key id that exists nowhere gets.
            assert body["detail"] == f"No API key {key_id}."

    # B's keys are untouched and still work.
    assert await works(client, shop_b.secret_key)
    assert await works(client, b_extra["key"])
    for listed in await list_all(client, shop_b.secret_key):
        assert listed["status"] == "active"
        assert listed["revoked_at"] is None and listed["expires_at"] is None
    assert len(await list_all(client, shop_b.secret_key)) == 3  # nothing rotated into being

    # A's listing holds A's keys only.
    a_ids = {k["id"] for k in await list_all(client, shop_a.secret_key)}
    b_ids = {k["id"] for k in await list_all(client, shop_b.secret_key)}
    assert len(a_ids) == 2
    assert not a_ids & b_ids


async def test_a_random_key_id_is_not_found_the_same_way(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Lonely shop"))
    nowhere = uuid.uuid4()
    response = await client.get(f"{KEYS}/{nowhere}", headers=bearer(shop.secret_key))
    body = assert_problem(response, 404, "not-found")
    assert body["detail"] == f"No API key {nowhere}."


# --- scopes ----------------------------------------------------------------------------------


async def test_a_restricted_key_without_keys_write_gets_insufficient_scope(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Restricted shop"))
    restricted = await create_key(
        client, shop.secret_key, kind="restricted", scopes=["customers:read"]
    )
    assert restricted["kind"] == "restricted"
    assert restricted["scopes"] == ["customers:read"]
    assert parse_key(restricted["key"])[0] == "restricted"
    me = await client.get(ME, headers=bearer(restricted["key"]))
    assert me.status_code == 200, me.text  # a valid credential, just without the scope
    assert me.json()["scopes"] == ["customers:read"]

    response = await client.get(KEYS, headers=bearer(restricted["key"]))
    body = assert_problem(response, 403, "insufficient-scope")
    challenge = response.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="keys:write"' in challenge
    assert "keys:write" in str(body["detail"])


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"kind": "secret"}, id="secret"),
        pytest.param({"kind": "restricted", "scopes": ["customers:write"]}, id="restricted"),
    ],
)
async def test_a_restricted_key_cannot_create_a_key_with_more_scopes_than_it_holds(
    client: httpx.AsyncClient, provision: ProvisionFactory, body: dict[str, Any]
) -> None:
    shop = await provision(unique("Escalation shop"))
    manager = await create_key(client, shop.secret_key, kind="restricted", scopes=["keys:write"])
    response = await client.post(KEYS, json=body, headers=bearer(manager["key"]))
    assert_problem(response, 403, "insufficient-scope")


async def test_a_restricted_key_cannot_rotate_a_key_with_more_scopes_than_it_holds(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Escalation shop"))
    manager = await create_key(client, shop.secret_key, kind="restricted", scopes=["keys:write"])
    secret_id = await key_id_of(client, shop.secret_key, "secret")
    response = await client.post(f"{KEYS}/{secret_id}/rotate", headers=bearer(manager["key"]))
    assert_problem(response, 403, "insufficient-scope")


# --- suspension ------------------------------------------------------------------------------


async def test_a_suspended_shop_is_refused_on_the_next_request_and_served_after_resuming(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision(unique("Suspended shop"))
    assert await works(client, shop.secret_key)  # the key is cached now

    await suspend_tenant(db, shop.tenant.id, reason="unpaid", actor="test")
    response = await client.get(KEYS, headers=bearer(shop.secret_key))
    assert_problem(response, 403, "tenant-suspended")
    assert shop.tenant.name not in response.text

    await resume_tenant(db, shop.tenant.id, actor="test")
    assert await works(client, shop.secret_key)


# --- rotation --------------------------------------------------------------------------------


async def test_rotation_gives_a_new_key_and_the_old_one_expires_after_its_grace(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Rotating shop"))
    old_id = await key_id_of(client, shop.secret_key, "secret")
    old_key = shop.secret_key

    before = datetime.now(UTC)
    response = await client.post(f"{KEYS}/{old_id}/rotate", headers=bearer(old_key))
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    second = response.json()
    assert second["rotated_from"] == old_id
    assert second["id"] != old_id
    assert second["kind"] == "secret"
    assert parse_key(second["key"]) == ("secret", "live")
    assert second["key"] != old_key
    assert second["masked_key"].endswith(second["key"][-4:])
    assert sorted(second["scopes"]) == sorted(ALL_SCOPES)

    # Both work during the grace, which defaults to a day.
    assert await works(client, old_key)
    assert await works(client, second["key"])
    old = (await client.get(f"{KEYS}/{old_id}", headers=bearer(second["key"]))).json()
    assert old["status"] == "active"
    grace = when(old["expires_at"]) - before
    assert timedelta(hours=23, minutes=59) < grace < timedelta(hours=24, minutes=1)

    # Rotating the new key with no grace ends it at once.
    response = await client.post(
        f"{KEYS}/{second['id']}/rotate", json={"expires_in": 0}, headers=bearer(second["key"])
    )
    assert response.status_code == 201, response.text
    third = response.json()
    assert third["rotated_from"] == second["id"]

    body = assert_unauthenticated(
        await client.get(KEYS, headers=bearer(second["key"])), "expired", shop
    )
    assert "expired" in body["detail"]
    assert await works(client, third["key"])
    assert await works(client, old_key)  # its own grace is not shortened by later rotations
    listed = {k["id"]: k for k in await list_all(client, third["key"])}
    assert listed[second["id"]]["status"] == "expired"


async def test_rotation_with_no_grace_reaches_another_worker(
    db: Database, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Two-worker rotation"))
    async with http_client(make_app(db)) as first, http_client(make_app(db)) as second:
        old_id = await key_id_of(first, shop.secret_key, "secret")
        assert await works(second, shop.secret_key)  # cached, without an expiry
        response = await first.post(
            f"{KEYS}/{old_id}/rotate", json={"expires_in": 0}, headers=bearer(shop.secret_key)
        )
        assert response.status_code == 201
        assert_unauthenticated(
            await second.get(KEYS, headers=bearer(shop.secret_key)), "expired", shop
        )
        assert await works(second, response.json()["key"])


async def test_a_revoked_or_expired_key_cannot_be_rotated(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Conflict shop"))
    doomed = await create_key(client, shop.secret_key, kind="secret")
    await client.delete(f"{KEYS}/{doomed['id']}", headers=bearer(shop.secret_key))
    response = await client.post(f"{KEYS}/{doomed['id']}/rotate", headers=bearer(shop.secret_key))
    assert_problem(response, 409, "conflict")

    ending = await create_key(client, shop.secret_key, kind="secret")
    await client.post(
        f"{KEYS}/{ending['id']}/rotate", json={"expires_in": 0}, headers=bearer(shop.secret_key)
    )
    response = await client.post(f"{KEYS}/{ending['id']}/rotate", headers=bearer(shop.secret_key))
    assert_problem(response, 409, "conflict")


@pytest.mark.parametrize(
    ("body", "path"),
    [
        pytest.param({"expires_in": -1}, "$.expires_in", id="negative"),
        pytest.param({"expires_in": 30 * 86400 + 1}, "$.expires_in", id="over-30-days"),
        pytest.param({"grace": 10}, "$", id="unknown-field"),
    ],
)
async def test_a_bad_rotation_grace_is_422(
    client: httpx.AsyncClient, provision: ProvisionFactory, body: dict[str, Any], path: str
) -> None:
    shop = await provision(unique("Grace shop"))
    old_id = await key_id_of(client, shop.secret_key, "secret")
    response = await client.post(
        f"{KEYS}/{old_id}/rotate", json=body, headers=bearer(shop.secret_key)
    )
    problem = assert_problem(response, 422, "validation")
    assert [e["path"] for e in problem["errors"]] == [path]  # type: ignore[union-attr]
    assert len(await list_all(client, shop.secret_key)) == 2


# --- creation --------------------------------------------------------------------------------


async def test_a_created_key_is_shown_once_and_masked_afterwards(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Creating shop"))
    response = await client.post(
        KEYS, json={"kind": "secret", "name": "CI deploys"}, headers=bearer(shop.secret_key)
    )
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    created = response.json()
    key = created["key"]
    assert parse_key(key) == ("secret", "live")
    assert created["object"] == "api_key"
    assert created["name"] == "CI deploys"
    assert created["status"] == "active"
    assert created["rotated_from"] is None and created["last_used_at"] is None
    assert created["masked_key"].endswith(key[-4:])
    assert key not in created["masked_key"]
    assert await works(client, key)

    shown = await client.get(f"{KEYS}/{created['id']}", headers=bearer(shop.secret_key))
    assert shown.status_code == 200
    assert "key" not in shown.json()
    assert shown.json()["masked_key"] == created["masked_key"]
    listing = await client.get(KEYS, headers=bearer(shop.secret_key))
    assert all("key" not in item for item in listing.json()["data"])
    for response in (shown, listing):
        assert key not in response.text
        assert key[PREFIX_LENGTH:-4] not in response.text


async def test_a_publishable_key_gets_the_ingest_scope_and_its_origins(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Origins shop"))
    created = await create_key(
        client,
        shop.secret_key,
        kind="publishable",
        allowed_origins=[SHOP_ORIGIN, "http://localhost:3000"],
    )
    assert parse_key(created["key"])[0] == "publishable"
    assert created["scopes"] == sorted(PUBLISHABLE_SCOPES)
    assert created["allowed_origins"] == [SHOP_ORIGIN, "http://localhost:3000"]


_PAST = "2000-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("body", "paths", "message"),
    [
        pytest.param({"kind": "restricted"}, ["$.scopes"], "scope", id="restricted-no-scopes"),
        pytest.param(
            {"kind": "restricted", "scopes": []}, ["$.scopes"], "scope", id="restricted-empty"
        ),
        pytest.param(
            {"kind": "restricted", "scopes": ["customers:read", "customers:fly"]},
            ["$.scopes"],
            "customers:fly",
            id="unknown-scope",
        ),
        pytest.param(
            {"kind": "secret", "scopes": ["customers:read"]},
            ["$.scopes"],
            "fixed",
            id="scopes-on-secret",
        ),
        pytest.param(
            {"kind": "secret", "allowed_origins": [SHOP_ORIGIN]},
            ["$.allowed_origins"],
            "publishable",
            id="origins-on-secret",
        ),
        pytest.param(
            {"kind": "publishable", "allowed_origins": ["https://shop.example/path"]},
            ["$.allowed_origins[0]"],
            "without a path",
            id="origin-with-path",
        ),
        pytest.param(
            {"kind": "publishable", "allowed_origins": [SHOP_ORIGIN, "https://shop.example/"]},
            ["$.allowed_origins[1]"],
            "trailing slash",
            id="second-origin-with-slash",
        ),
        pytest.param(
            {"kind": "publishable", "allowed_origins": ["shop.example"]},
            ["$.allowed_origins[0]"],
            "scheme",
            id="origin-without-scheme",
        ),
        pytest.param({"kind": "secret", "colour": "red"}, ["$"], "colour", id="unknown-field"),
        pytest.param(
            {"kind": "secret", "expires_at": _PAST}, ["$.expires_at"], "future", id="past-expiry"
        ),
        pytest.param({"kind": "master"}, ["$.kind"], "", id="unknown-kind"),
    ],
)
async def test_an_invalid_new_key_is_422_naming_the_field(
    client: httpx.AsyncClient,
    provision: ProvisionFactory,
    body: dict[str, Any],
    paths: list[str],
    message: str,
) -> None:
    shop = await provision(unique("Validating shop"))
    response = await client.post(KEYS, json=body, headers=bearer(shop.secret_key))
    problem = assert_problem(response, 422, "validation")
    errors: list[dict[str, str]] = problem["errors"]  # type: ignore[assignment]
    assert [e["path"] for e in errors] == paths
    assert message in errors[0]["message"]
    assert len(await list_all(client, shop.secret_key)) == 2  # nothing was created


async def test_an_expiry_without_a_time_zone_is_422(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Naive shop"))
    response = await client.post(
        KEYS,
        json={"kind": "secret", "expires_at": "2999-01-01T00:00:00"},
        headers=bearer(shop.secret_key),
    )
    problem = assert_problem(response, 422, "validation")
    assert [e["path"] for e in problem["errors"]] == ["$.expires_at"]  # type: ignore[union-attr]


# --- pagination ------------------------------------------------------------------------------


async def test_keys_are_listed_newest_first_in_pages(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Paging shop"))
    headers = bearer(shop.secret_key)
    extra = [(await create_key(client, shop.secret_key, kind="secret"))["id"] for _ in range(3)]

    first = await client.get(KEYS, params={"limit": 2}, headers=headers)
    assert first.status_code == 200, first.text
    page = first.json()
    assert [k["id"] for k in page["data"]] == [extra[2], extra[1]]
    assert page["has_more"] is True

    seen = [k["id"] for k in page["data"]]
    pages = 1
    while page["has_more"]:
        response = await client.get(
            KEYS, params={"limit": 2, "starting_after": seen[-1]}, headers=headers
        )
        assert response.status_code == 200, response.text
        page = response.json()
        assert 1 <= len(page["data"]) <= 2
        seen.extend(k["id"] for k in page["data"])
        pages += 1
    assert pages == 3
    assert len(seen) == len(set(seen)) == 5  # no overlap, nothing skipped
    assert seen[:3] == [extra[2], extra[1], extra[0]]

    everything = await list_all(client, shop.secret_key)
    assert [k["id"] for k in everything] == seen
    created = [when(k["created_at"]) for k in everything]
    assert created == sorted(created, reverse=True)


@pytest.mark.parametrize(
    ("params", "path", "message"),
    [
        pytest.param({"limit": 0}, "query.limit", ">= 1", id="limit-0"),
        pytest.param({"limit": 101}, "query.limit", "<= 100", id="limit-101"),
        pytest.param(
            {"starting_after": "not-a-uuid"},
            "query.starting_after",
            "not an object id",
            id="not-a-uuid",
        ),
    ],
)
async def test_bad_page_parameters_are_422(
    client: httpx.AsyncClient,
    provision: ProvisionFactory,
    params: dict[str, Any],
    path: str,
    message: str,
) -> None:
    shop = await provision(unique("Paging shop"))
    response = await client.get(KEYS, params=params, headers=bearer(shop.secret_key))
    problem = assert_problem(response, 422, "validation")
    [error] = problem["errors"]  # type: ignore[misc]
    assert error["path"] == path
    assert message in error["message"]


async def test_paging_from_another_shops_key_is_422_like_an_unknown_id(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop_a = await provision(unique("Paging shop A"))
    shop_b = await provision(unique("Paging shop B"))
    b_key_id = await key_id_of(client, shop_b.secret_key, "secret")
    nowhere = str(uuid.uuid4())

    bodies = []
    for cursor in (b_key_id, nowhere):
        response = await client.get(
            KEYS, params={"starting_after": cursor}, headers=bearer(shop_a.secret_key)
        )
        problem = assert_problem(response, 422, "validation")
        assert shop_b.tenant.name not in response.text
        assert str(shop_b.tenant.id) not in response.text
        bodies.append(
            (str(problem["detail"]).replace(cursor, "<id>"), problem["errors"], problem["title"])
        )
    assert bodies[0] == bodies[1]
    assert bodies[0][1] == [{"path": "query.starting_after", "message": "no such API key"}]


# --- logs ------------------------------------------------------------------------------------


class RawJsonLines(JsonLines):
    """:class:`JsonLines` that also keeps each line exactly as written."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        self.raw.append(line)
        self.lines.append(json.loads(line))


async def test_the_plaintext_key_never_reaches_the_logs(
    app: Litestar, client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Logged shop"))
    handler = RawJsonLines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        created = await create_key(client, shop.secret_key, kind="secret", name="logged")
        key = created["key"]
        typo = mistype(key)
        assert await works(client, key)
        assert_unauthenticated(await client.get(KEYS, headers=bearer(typo)), "checksum")
        revoked = await client.delete(f"{KEYS}/{created['id']}", headers=bearer(shop.secret_key))
        assert revoked.status_code == 200
        assert_unauthenticated(await client.get(KEYS, headers=bearer(key)), "revoked")
        await app.state.authenticator.flush_last_used()
    finally:
        root.removeHandler(handler)
        root.setLevel(level)

    access = [line for line in handler.lines if line.get("logger") == "sjaak.access"]
    assert len(access) == 5, handler.raw  # the capture saw every request
    for secret in (key, typo, shop.secret_key):
        for part in (secret, secret[PREFIX_LENGTH:], secret[PREFIX_LENGTH:-6]):
            leaked = [line for line in handler.raw if part in line]
            assert leaked == []


# --- last use --------------------------------------------------------------------------------


async def test_using_a_key_records_when_it_was_last_used(
    app: Litestar, client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Busy shop"))
    tracked = await create_key(client, shop.secret_key, kind="secret", name="tracked")
    url = f"{KEYS}/{tracked['id']}"
    assert (await client.get(url, headers=bearer(shop.secret_key))).json()["last_used_at"] is None

    before = datetime.now(UTC)
    assert await works(client, tracked["key"])
    await app.state.authenticator.flush_last_used()
    after = datetime.now(UTC)

    last_used = (await client.get(url, headers=bearer(shop.secret_key))).json()["last_used_at"]
    assert last_used is not None
    assert before <= when(last_used) <= after


# --- rate limits -----------------------------------------------------------------------------


async def test_rate_limits_are_announced_and_enforced_per_shop(
    db: Database, provision: ProvisionFactory
) -> None:
    first_shop = await provision(unique("Hasty shop"))
    second_shop = await provision(unique("Patient shop"))
    app = make_app(db, rate_limit_burst=2, rate_limit_per_second=0.001)
    async with http_client(app) as client:
        for remaining in ("1", "0"):
            response = await client.get(KEYS, headers=bearer(first_shop.secret_key))
            assert response.status_code == 200, response.text
            assert response.headers["ratelimit-limit"] == "2"
            assert response.headers["ratelimit-remaining"] == remaining
            assert int(response.headers["ratelimit-reset"]) >= 1
            assert "retry-after" not in response.headers

        limited = await client.get(KEYS, headers=bearer(first_shop.secret_key))
        assert_problem(limited, 429, "rate-limited")
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.headers["ratelimit-limit"] == "2"
        assert limited.headers["ratelimit-remaining"] == "0"
        assert int(limited.headers["ratelimit-reset"]) >= 1

        other = await client.get(KEYS, headers=bearer(second_shop.secret_key))
        assert other.status_code == 200, other.text
        assert other.headers["ratelimit-remaining"] == "1"


async def test_requests_refused_for_one_key_do_not_spend_the_shops_budget(
    db: Database, keyring: Keyring, provision: ProvisionFactory
) -> None:
    shop = await provision(unique("Noisy-neighbour shop"))
    async with db.control() as conn:
        other_key = await api_keys.create_api_key(
            conn, keyring, shop.tenant.id, kind="secret", scopes=ALL_SCOPES
        )
    app = make_app(
        db,
        rate_limit_burst=1,
        rate_limit_per_second=0.001,
        shop_rate_limit_burst=3,
        shop_rate_limit_per_second=0.001,
    )
    async with http_client(app) as client:
        assert (await client.get(KEYS, headers=bearer(shop.secret_key))).status_code == 200
        for _ in range(3):  # a client that ignores Retry-After
            refused = await client.get(KEYS, headers=bearer(shop.secret_key))
            assert refused.status_code == 429
        # The shop has been served one request of its three; its other key is within budget.
        response = await client.get(KEYS, headers=bearer(other_key.key))
        assert response.status_code == 200, response.text


# --- one authorization model -----------------------------------------------------------------


def _is_generated_options(handler: BaseRouteHandler) -> bool:
    """Litestar adds an OPTIONS handler to every path that declares none (HTTPRoute
    ``create_options_handler``). It only answers ``Allow``, and ``authorize`` answers every
    OPTIONS request as a CORS preflight before looking at any credential, so it has no scopes."""
    return getattr(handler, "http_methods", None) == {"OPTIONS"} and handler.fn.__qualname__ == (
        "HTTPRoute.create_options_handler.<locals>.options_handler"
    )


def _is_api_docs(app: Litestar, path: str) -> bool:
    """The OpenAPI spec and its renderer, which Litestar mounts itself; ``authorize`` lets them
    through as public docs (``_is_api_docs``)."""
    assert app.openapi_config is not None
    docs = app.openapi_config.path.rstrip("/")
    return path == docs or path.startswith(docs + "/")


def _our_handlers(app: Litestar) -> list[tuple[str, str, BaseRouteHandler]]:
    """(method(s), path, handler) for every handler we wrote, skipping the two kinds above."""
    found = []
    for route in app.routes:
        if _is_api_docs(app, route.path):
            continue
        for handler in route.route_handlers:
            if _is_generated_options(handler):
                continue
            methods = ",".join(sorted(getattr(handler, "http_methods", ()))) or "WS"
            found.append((methods, route.path, handler))
    return found


def _declarations(handler: BaseRouteHandler) -> list[str]:
    """What a handler declares about its callers. ``authorize`` reads ``public`` and ``scopes``;
    ``authenticated`` (any valid credential, ``/v1/me``) is documented in ``api.auth.guards`` and
    behaves like an empty scope list, so it must be said explicitly rather than left out."""
    declared = {
        "public": is_public(handler),
        "scopes": bool(required_scopes(handler)),
        "authenticated": bool(handler.opt.get("authenticated")),
    }
    return [name for name, present in declared.items() if present]


def test_every_route_is_public_scoped_or_explicitly_authenticated(db: Database) -> None:
    """Walks every route handler of the real app. Skipped: Litestar's OpenAPI routes (under the
    docs path) and the OPTIONS handlers Litestar generates; see the two predicates above."""
    app = make_app(db)
    handlers = _our_handlers(app)
    assert len(handlers) >= 15  # health, problems, keys, OAuth clients, OAuth endpoints

    unmarked = [f"{m} {p}" for m, p, h in handlers if not _declarations(h)]
    assert unmarked == [], "routes declaring none of opt['public'], ['scopes'], ['authenticated']"
    ambiguous = [
        f"{m} {p}: {_declarations(h)}" for m, p, h in handlers if len(_declarations(h)) > 1
    ]
    assert ambiguous == [], "routes that declare more than one kind of access"

    unknown = {scope for _, _, h in handlers for scope in required_scopes(h)} - ALL_SCOPES
    assert unknown == set(), "scopes no credential can hold"
    for methods, path, handler in handlers:
        if handler.opt.get("publishable"):
            assert required_scopes(handler) <= PUBLISHABLE_SCOPES, f"{methods} {path}"

    # The skip rule drops nothing else.
    kept = {id(h) for _, _, h in handlers}
    for route in app.routes:
        for handler in route.route_handlers:
            if id(handler) not in kept:
                assert _is_api_docs(app, route.path) or _is_generated_options(handler)


def test_key_and_oauth_client_management_needs_keys_write(db: Database) -> None:
    app = make_app(db)
    managed = {
        (methods, path): handler
        for methods, path, handler in _our_handlers(app)
        if path.startswith(("/v1/api-keys", "/v1/oauth-clients"))
    }
    assert set(managed) == {
        ("POST", "/v1/api-keys"),
        ("GET", "/v1/api-keys"),
        ("GET", "/v1/api-keys/{key_id:uuid}"),
        ("DELETE", "/v1/api-keys/{key_id:uuid}"),
        ("POST", "/v1/api-keys/{key_id:uuid}/rotate"),
        ("POST", "/v1/oauth-clients"),
        ("GET", "/v1/oauth-clients"),
        ("GET", "/v1/oauth-clients/{client_id:str}"),
        ("DELETE", "/v1/oauth-clients/{client_id:str}"),
    }
    for (methods, path), handler in managed.items():
        assert not is_public(handler), f"{methods} {path}"
        assert "keys:write" in required_scopes(handler), f"{methods} {path}"
        assert not handler.opt.get("publishable"), f"{methods} {path}"
