"""The OAuth 2 authorization server end to end: client management, the token endpoint and its
grants, bearer-token verification (including forged tokens), revocation, introspection, signing-key
rotation and metadata. Real PostgreSQL, real HTTP over ASGI; tokens are forged with joserfc."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from litestar import Litestar

from api.auth import oauth_clients
from api.auth.oauth import s256
from api.auth.secrets import Keyring
from api.auth.tokens import TokenService
from api.db import Database
from api.tenants.lifecycle import ProvisionedShop
from tests.conftest import ProvisionFactory, bearer, http_client, make_app

ISSUER = "http://sjaak.test"
FORM = "application/x-www-form-urlencoded"
PARTNER_CALLBACK = "https://partner.example/cb"


# --- helpers -----------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def unb64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWT, read without verifying it."""
    header, claims, _signature = token.split(".")
    return json.loads(unb64url(header)), json.loads(unb64url(claims))


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = f"{client_id}:{secret}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


async def new_shop_client(
    client: httpx.AsyncClient,
    shop: ProvisionedShop,
    scopes: list[str] | None = None,
    name: str = "Back office",
) -> dict[str, Any]:
    response = await client.post(
        "/v1/oauth-clients",
        json={"name": name, "scopes": scopes or ["keys:write", "customers:read"]},
        headers=bearer(shop.secret_key),
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def client_credentials(
    client: httpx.AsyncClient, oauth_client: dict[str, Any], **form: str
) -> httpx.Response:
    return await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", **form},
        headers=basic(oauth_client["client_id"], oauth_client["client_secret"]),
    )


async def access_token(client: httpx.AsyncClient, oauth_client: dict[str, Any], **form: str) -> str:
    response = await client_credentials(client, oauth_client, **form)
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


async def shop_with_token(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> tuple[ProvisionedShop, dict[str, Any], str]:
    shop = await provision()
    oauth_client = await new_shop_client(client, shop)
    return shop, oauth_client, await access_token(client, oauth_client)


async def form_post(
    client: httpx.AsyncClient, path: str, oauth_client: dict[str, Any], **form: str
) -> httpx.Response:
    return await client.post(
        path, data=form, headers=basic(oauth_client["client_id"], oauth_client["client_secret"])
    )


def assert_oauth_error(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    """An RFC 6749 error body that also reads as an RFC 9457 problem."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == error
    assert isinstance(body["error_description"], str) and body["error_description"]
    assert body["type"] == "/problems/oauth-" + error.replace("_", "-")
    assert isinstance(body["title"], str) and body["title"]
    assert body["status"] == status
    assert isinstance(body["detail"], str) and body["detail"]
    assert response.headers["cache-control"] == "no-store"
    if status == 401:
        assert response.headers["www-authenticate"].lower().startswith("basic")
    return body


def assert_unauthenticated(response: httpx.Response, reason: str | None = None) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["type"] == "/problems/unauthenticated"
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer")
    if reason is not None:
        assert f'error_description="{reason}"' in challenge


async def secret_key_ids(client: httpx.AsyncClient, shop: ProvisionedShop) -> set[str]:
    response = await client.get("/v1/api-keys", headers=bearer(shop.secret_key))
    assert response.status_code == 200, response.text
    return {key["id"] for key in response.json()["data"]}


async def partner_client(
    db: Database, keyring: Keyring, scopes: frozenset[str] | None = None
) -> dict[str, Any]:
    async with db.control() as conn:
        created = await oauth_clients.create_client(
            conn,
            keyring,
            tenant_id=None,
            name="Partner app",
            scopes=scopes or frozenset({"keys:write", "customers:read"}),
            grant_types=frozenset({"authorization_code", "refresh_token"}),
            redirect_uris=(PARTNER_CALLBACK,),
        )
    return {"client_id": created.client_id, "client_secret": created.client_secret}


async def authorization_code(
    db: Database,
    keyring: Keyring,
    partner: dict[str, Any],
    shop: ProvisionedShop,
    verifier: str,
    scopes: frozenset[str] | None = None,
) -> str:
    """What the consent screen will do once the shop owner approves."""
    async with db.control() as conn:
        return await oauth_clients.create_authorization_code(
            conn,
            keyring,
            client_id=partner["client_id"],
            tenant_id=shop.tenant.id,
            redirect_uri=PARTNER_CALLBACK,
            scopes=scopes or frozenset({"keys:write", "customers:read"}),
            code_challenge=s256(verifier),
            granted_by="owner@test",
        )


async def exchange_code(
    client: httpx.AsyncClient, partner: dict[str, Any], code: str, **form: str
) -> httpx.Response:
    values = {"grant_type": "authorization_code", "code": code, "redirect_uri": PARTNER_CALLBACK}
    values.update(form)
    return await form_post(client, "/oauth/token", partner, **values)


def new_verifier() -> str:
    return secrets.token_urlsafe(48)


# --- /v1/oauth-clients -------------------------------------------------------------------------


async def test_shop_creates_a_client_whose_secret_is_shown_once(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    response = await client.post(
        "/v1/oauth-clients",
        json={"name": "Warehouse sync", "scopes": ["customers:read", "keys:write"]},
        headers=bearer(shop.secret_key),
    )
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    created = response.json()
    assert created["object"] == "oauth_client"
    assert created["client_id"].startswith("cl_")
    assert created["client_secret"].startswith("sjk_cs_")
    assert created["masked_secret"] == "sjk_cs_…" + created["client_secret"][-4:]
    assert created["scopes"] == ["customers:read", "keys:write"]
    assert created["grant_types"] == ["client_credentials"]
    assert created["revoked_at"] is None

    listed = await client.get("/v1/oauth-clients", headers=bearer(shop.secret_key))
    assert listed.status_code == 200
    [entry] = listed.json()["data"]
    assert entry["client_id"] == created["client_id"]
    assert entry["masked_secret"] == created["masked_secret"]
    assert "client_secret" not in entry
    assert created["client_secret"] not in listed.text

    one = await client.get(
        f"/v1/oauth-clients/{created['client_id']}", headers=bearer(shop.secret_key)
    )
    assert one.status_code == 200
    assert one.json()["masked_secret"] == created["masked_secret"]
    assert "client_secret" not in one.json()
    assert created["client_secret"] not in one.text


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"name": "Bad scope", "scopes": ["customers:read", "root:everything"]}, "$.scopes"),
        ({"scopes": ["customers:read"]}, "$"),
        ({"name": "", "scopes": ["customers:read"]}, "$.name"),
    ],
    ids=["unknown-scope", "missing-name", "empty-name"],
)
async def test_creating_a_client_validates_the_body(
    client: httpx.AsyncClient, provision: ProvisionFactory, body: dict[str, Any], path: str
) -> None:
    shop = await provision()
    response = await client.post("/v1/oauth-clients", json=body, headers=bearer(shop.secret_key))
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["type"] == "/problems/validation"
    assert [error["path"] for error in problem["errors"]] == [path]
    listed = await client.get("/v1/oauth-clients", headers=bearer(shop.secret_key))
    assert listed.json()["data"] == []


async def test_another_shops_client_is_not_found(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    owner, other = await provision("Owner"), await provision("Other")
    created = await new_shop_client(client, owner)
    path = f"/v1/oauth-clients/{created['client_id']}"

    for method in ("GET", "DELETE"):
        response = await client.request(method, path, headers=bearer(other.secret_key))
        assert response.status_code == 404, (method, response.text)
        assert response.json()["type"] == "/problems/not-found"
    assert (await client.get("/v1/oauth-clients", headers=bearer(other.secret_key))).json()[
        "data"
    ] == []

    # Still there, and still working, for its own shop.
    still = await client.get(path, headers=bearer(owner.secret_key))
    assert still.status_code == 200 and still.json()["revoked_at"] is None
    assert (await client_credentials(client, created)).status_code == 200


async def test_a_restricted_key_without_keys_write_cannot_manage_clients(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    made = await client.post(
        "/v1/api-keys",
        json={"kind": "restricted", "name": "reader", "scopes": ["customers:read"]},
        headers=bearer(shop.secret_key),
    )
    assert made.status_code == 201, made.text
    restricted = made.json()["key"]

    for response in (
        await client.post(
            "/v1/oauth-clients",
            json={"name": "Sneaky", "scopes": ["customers:read"]},
            headers=bearer(restricted),
        ),
        await client.get("/v1/oauth-clients", headers=bearer(restricted)),
    ):
        assert response.status_code == 403, response.text
        assert response.json()["type"] == "/problems/insufficient-scope"
        assert 'scope="keys:write"' in response.headers["www-authenticate"]


# --- client_credentials ------------------------------------------------------------------------


async def test_client_credentials_with_client_secret_basic_issues_an_rfc9068_jwt(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    oauth_client = await new_shop_client(client, shop)
    response = await client_credentials(client, oauth_client)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= 900
    assert body["scope"] == "customers:read keys:write"
    assert "refresh_token" not in body

    header, claims = jwt_parts(body["access_token"])
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "RS256"
    jwks = (await client.get("/.well-known/jwks.json")).json()
    assert header["kid"] in {key["kid"] for key in jwks["keys"]}
    assert claims["iss"] == ISSUER
    assert claims["aud"] == ISSUER
    assert claims["sub"] == oauth_client["client_id"]
    assert claims["client_id"] == oauth_client["client_id"]
    assert claims["scope"] == "customers:read keys:write"
    assert claims["tenant"] == str(shop.tenant.id)
    assert claims["jti"]
    assert 0 < claims["exp"] - claims["iat"] <= 900

    # And it verifies against the published key set, as a resource server would check it.
    verified = jwt.decode(body["access_token"], KeySet.import_key_set(jwks), algorithms=["RS256"])
    assert verified.claims == claims


async def test_client_credentials_with_client_secret_post(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    oauth_client = await new_shop_client(client, shop)
    response = await client.post(
        "/oauth/token",
        content=(
            "grant_type=client_credentials"
            f"&client_id={oauth_client['client_id']}"
            f"&client_secret={oauth_client['client_secret']}"
        ).encode(),
        headers={"Content-Type": FORM},
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] <= 900
    header, claims = jwt_parts(body["access_token"])
    assert header["typ"] == "at+jwt" and header["alg"] == "RS256"
    assert claims["client_id"] == oauth_client["client_id"]
    assert claims["tenant"] == str(shop.tenant.id)


async def test_an_access_token_is_a_bearer_credential_for_its_own_shop_only(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop, _, token = await shop_with_token(client, provision)
    other = await provision("Other shop")

    response = await client.get("/v1/api-keys", headers=bearer(token))
    assert response.status_code == 200, response.text
    seen = {key["id"] for key in response.json()["data"]}
    assert seen == await secret_key_ids(client, shop)
    assert not seen & await secret_key_ids(client, other)


async def test_a_narrower_scope_gives_a_narrower_token(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    oauth_client = await new_shop_client(client, shop)
    response = await client_credentials(client, oauth_client, scope="customers:read")
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "customers:read"
    _, claims = jwt_parts(response.json()["access_token"])
    assert claims["scope"] == "customers:read"

    refused = await client.get("/v1/api-keys", headers=bearer(response.json()["access_token"]))
    assert refused.status_code == 403, refused.text
    assert refused.json()["type"] == "/problems/insufficient-scope"
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]


@pytest.mark.parametrize(
    "scope", ["customers:write", "customers:read billing:write", "no:such-scope"]
)
async def test_a_scope_the_client_lacks_is_invalid_scope(
    client: httpx.AsyncClient, provision: ProvisionFactory, scope: str
) -> None:
    shop = await provision()
    oauth_client = await new_shop_client(client, shop)
    response = await client_credentials(client, oauth_client, scope=scope)
    assert_oauth_error(response, 400, "invalid_scope")


# --- token endpoint errors ---------------------------------------------------------------------


async def test_a_wrong_client_secret_is_invalid_client(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    oauth_client = await new_shop_client(client, shop)
    wrong = {**oauth_client, "client_secret": oauth_client["client_secret"][:-1] + "x"}
    response = await client_credentials(client, wrong)
    body = assert_oauth_error(response, 401, "invalid_client")
    assert "access_token" not in body


async def test_the_password_grant_is_unsupported(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    oauth_client = await new_shop_client(client, shop)
    response = await form_post(
        client,
        "/oauth/token",
        oauth_client,
        grant_type="password",
        username="owner@test",
        password="hunter2",
    )
    assert_oauth_error(response, 400, "unsupported_grant_type")


async def test_two_client_authentication_methods_at_once_are_refused(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    oauth_client = await new_shop_client(client, shop)
    response = await form_post(
        client,
        "/oauth/token",
        oauth_client,
        grant_type="client_credentials",
        client_id=oauth_client["client_id"],
        client_secret=oauth_client["client_secret"],
    )
    assert_oauth_error(response, 400, "invalid_request")


async def test_a_json_body_is_an_invalid_request(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    oauth_client = await new_shop_client(client, shop)
    response = await client.post(
        "/oauth/token",
        json={
            "grant_type": "client_credentials",
            "client_id": oauth_client["client_id"],
            "client_secret": oauth_client["client_secret"],
        },
    )
    body = assert_oauth_error(response, 400, "invalid_request")
    assert FORM in body["detail"]


# --- forged and broken bearer tokens -----------------------------------------------------------


def _sign(header: dict[str, Any], claims: dict[str, Any], key: RSAKey) -> str:
    return jwt.encode(header, claims, key, algorithms=[header["alg"]])


def _hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{b64url_json(header)}.{b64url_json(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def _real(app: Litestar, header: dict[str, Any], claims: dict[str, Any]) -> str:
    signing: RSAKey = app.state.tokens._signing
    return _sign(header, claims, signing)


def _alg_none(app: Litestar, header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64url_json({'alg': 'none', 'typ': 'at+jwt'})}.{b64url_json(claims)}."


def _hs256_public_pem(app: Litestar, header: dict[str, Any], claims: dict[str, Any]) -> str:
    signing: RSAKey = app.state.tokens._signing
    pem: bytes = signing.as_pem(private=False)
    return _hs256({**header, "alg": "HS256"}, claims, pem)


def _hs256_public_jwk(app: Litestar, header: dict[str, Any], claims: dict[str, Any]) -> str:
    signing: RSAKey = app.state.tokens._signing
    jwk = json.dumps(signing.as_dict(private=False)).encode()
    return _hs256({**header, "alg": "HS256"}, claims, jwk)


def _wrong_audience(app: Litestar, header: dict[str, Any], claims: dict[str, Any]) -> str:
    return _real(app, header, {**claims, "aud": "http://elsewhere.test"})


def _wrong_issuer(app: Litestar, header: dict[str, Any], claims: dict[str, Any]) -> str:
    return _real(app, header, {**claims, "iss": "http://evil.test"})


def _expired(app: Litestar, header: dict[str, Any], claims: dict[str, Any]) -> str:
    past = int(time.time()) - 3600
    return _real(app, header, {**claims, "iat": past - 900, "nbf": past - 900, "exp": past})


def _no_tenant(app: Litestar, header: dict[str, Any], claims: dict[str, Any]) -> str:
    return _real(app, header, {k: v for k, v in claims.items() if k != "tenant"})


def _typ_jwt(app: Litestar, header: dict[str, Any], claims: dict[str, Any]) -> str:
    return _real(app, {**header, "typ": "JWT"}, claims)


def _unknown_kid(app: Litestar, header: dict[str, Any], claims: dict[str, Any]) -> str:
    kid = "attacker-" + secrets.token_hex(4)
    stranger = RSAKey.generate_key(2048, parameters={"kid": kid, "alg": "RS256", "use": "sig"})
    return _sign({**header, "kid": kid}, claims, stranger)


def _garbage(app: Litestar, header: dict[str, Any], claims: dict[str, Any]) -> str:
    return "a.b.c"


FORGERIES: dict[str, Callable[[Litestar, dict[str, Any], dict[str, Any]], str]] = {
    "alg-none": _alg_none,
    "hs256-keyed-with-public-pem": _hs256_public_pem,
    "hs256-keyed-with-public-jwk": _hs256_public_jwk,
    "wrong-audience": _wrong_audience,
    "wrong-issuer": _wrong_issuer,
    "expired": _expired,
    "missing-tenant": _no_tenant,
    "typ-jwt": _typ_jwt,
    "unknown-kid": _unknown_kid,
    "garbage": _garbage,
}


@pytest.mark.parametrize("forgery", list(FORGERIES), ids=list(FORGERIES))
async def test_forged_or_invalid_bearer_tokens_are_refused(
    app: Litestar, client: httpx.AsyncClient, provision: ProvisionFactory, forgery: str
) -> None:
    _, _, token = await shop_with_token(client, provision)
    header, claims = jwt_parts(token)
    # The genuine token works: whatever fails below fails for the forged part alone.
    assert (await client.get("/v1/api-keys", headers=bearer(token))).status_code == 200

    forged = FORGERIES[forgery](app, header, claims)
    assert forged != token
    response = await client.get("/v1/api-keys", headers=bearer(forged))
    assert_unauthenticated(response, "invalid_token")


async def test_the_real_key_signs_an_acceptable_token_so_forgeries_fail_on_their_own_merits(
    app: Litestar, client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    """Control for the forgeries above: the same re-signing with nothing changed is accepted."""
    _, _, token = await shop_with_token(client, provision)
    header, claims = jwt_parts(token)
    resigned = _real(app, header, {**claims, "jti": uuid.uuid4().hex})
    assert (await client.get("/v1/api-keys", headers=bearer(resigned))).status_code == 200


# --- revocation (RFC 7009) ---------------------------------------------------------------------


async def test_a_client_revokes_its_own_access_token(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    _, oauth_client, token = await shop_with_token(client, provision)
    assert (await client.get("/v1/api-keys", headers=bearer(token))).status_code == 200

    response = await form_post(client, "/oauth/revoke", oauth_client, token=token)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"

    assert_unauthenticated(await client.get("/v1/api-keys", headers=bearer(token)), "revoked")
    # Another token of the same client is untouched.
    fresh = await access_token(client, oauth_client)
    assert (await client.get("/v1/api-keys", headers=bearer(fresh))).status_code == 200


async def test_another_client_cannot_revoke_a_token(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop, _, token = await shop_with_token(client, provision)
    same_shop = await new_shop_client(client, shop, name="Sibling")
    stranger = await new_shop_client(client, await provision("Stranger"))

    for other in (same_shop, stranger):
        response = await form_post(client, "/oauth/revoke", other, token=token)
        assert response.status_code == 200, response.text
    assert (await client.get("/v1/api-keys", headers=bearer(token))).status_code == 200


async def test_revoking_an_unknown_token_is_ok(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    oauth_client = await new_shop_client(client, shop)
    for unknown in ("a.b.c", "sjk_rt_" + secrets.token_urlsafe(32), "nothing-like-a-token"):
        response = await form_post(client, "/oauth/revoke", oauth_client, token=unknown)
        assert response.status_code == 200, (unknown, response.text)


async def test_a_revocation_reaches_other_workers(
    db: Database, client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    """Revoked on one worker, refused on another (test settings poll the feed every request)."""
    _, oauth_client, token = await shop_with_token(client, provision)
    async with http_client(make_app(db)) as other_worker:
        assert (await other_worker.get("/v1/api-keys", headers=bearer(token))).status_code == 200
        revoked = await form_post(client, "/oauth/revoke", oauth_client, token=token)
        assert revoked.status_code == 200
        refused = await other_worker.get("/v1/api-keys", headers=bearer(token))
        assert_unauthenticated(refused, "revoked")


async def test_introspection_on_another_worker_sees_a_revocation(
    db: Database, client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    _, oauth_client, token = await shop_with_token(client, provision)
    async with http_client(make_app(db)) as other_worker:
        before = await form_post(other_worker, "/oauth/introspect", oauth_client, token=token)
        assert before.json()["active"] is True
        revoked = await form_post(client, "/oauth/revoke", oauth_client, token=token)
        assert revoked.status_code == 200
        after = await form_post(other_worker, "/oauth/introspect", oauth_client, token=token)
        assert after.json() == {"active": False}


# --- introspection (RFC 7662) ------------------------------------------------------------------


async def test_introspection_shows_a_token_to_its_own_client_only(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop, oauth_client, token = await shop_with_token(client, provision)
    _, claims = jwt_parts(token)

    own = await form_post(client, "/oauth/introspect", oauth_client, token=token)
    assert own.status_code == 200, own.text
    assert own.headers["cache-control"] == "no-store"
    seen = own.json()
    assert seen["active"] is True
    assert seen["scope"] == "customers:read keys:write"
    assert seen["client_id"] == oauth_client["client_id"]
    assert seen["exp"] == claims["exp"]
    assert seen["tenant"] == str(shop.tenant.id)

    sibling = await new_shop_client(client, shop, name="Sibling")
    stranger = await new_shop_client(client, await provision("Stranger"))
    for other in (sibling, stranger):
        response = await form_post(client, "/oauth/introspect", other, token=token)
        assert response.status_code == 200
        assert response.json() == {"active": False}


async def test_a_revoked_or_garbage_token_introspects_inactive(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    _, oauth_client, token = await shop_with_token(client, provision)
    revoked = await form_post(client, "/oauth/revoke", oauth_client, token=token)
    assert revoked.status_code == 200

    for presented in (token, "a.b.c", "garbage", "sjk_rt_" + secrets.token_urlsafe(32)):
        response = await form_post(client, "/oauth/introspect", oauth_client, token=presented)
        assert response.status_code == 200, response.text
        assert response.json() == {"active": False}, presented


# --- authorization code + PKCE + refresh rotation ---------------------------------------------


async def test_authorization_code_with_pkce_then_rotating_refresh_tokens(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database, keyring: Keyring
) -> None:
    shop = await provision()
    partner = await partner_client(db, keyring)
    verifier = new_verifier()
    code = await authorization_code(db, keyring, partner, shop, verifier)

    response = await exchange_code(client, partner, code, code_verifier=verifier)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    issued = response.json()
    assert issued["token_type"] == "Bearer"
    assert issued["refresh_token"].startswith("sjk_rt_")
    assert issued["scope"] == "customers:read keys:write"
    _, claims = jwt_parts(issued["access_token"])
    assert claims["tenant"] == str(shop.tenant.id)
    assert claims["client_id"] == partner["client_id"]
    listed = await client.get("/v1/api-keys", headers=bearer(issued["access_token"]))
    assert listed.status_code == 200
    assert {k["id"] for k in listed.json()["data"]} == await secret_key_ids(client, shop)

    refreshed = await form_post(
        client,
        "/oauth/token",
        partner,
        grant_type="refresh_token",
        refresh_token=issued["refresh_token"],
    )
    assert refreshed.status_code == 200, refreshed.text
    second = refreshed.json()
    assert second["access_token"] != issued["access_token"]
    assert second["refresh_token"] and second["refresh_token"] != issued["refresh_token"]
    _, second_claims = jwt_parts(second["access_token"])
    assert second_claims["tenant"] == str(shop.tenant.id)
    assert (await client.get("/v1/api-keys", headers=bearer(second["access_token"]))).is_success

    # The refresh tokens as the partner sees them: the first is spent, the second live.
    first_state = await form_post(
        client, "/oauth/introspect", partner, token=issued["refresh_token"]
    )
    assert first_state.json() == {"active": False}
    second_state = (
        await form_post(client, "/oauth/introspect", partner, token=second["refresh_token"])
    ).json()
    assert second_state["active"] is True
    assert second_state["tenant"] == str(shop.tenant.id)
    assert second_state["client_id"] == partner["client_id"]


async def test_an_authorization_code_works_once(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database, keyring: Keyring
) -> None:
    shop = await provision()
    partner = await partner_client(db, keyring)
    verifier = new_verifier()
    code = await authorization_code(db, keyring, partner, shop, verifier)
    first = await exchange_code(client, partner, code, code_verifier=verifier)
    assert first.status_code == 200, first.text

    again = await exchange_code(client, partner, code, code_verifier=verifier)
    assert_oauth_error(again, 400, "invalid_grant")
    # The replay revokes what the first exchange issued (RFC 6749 4.1.2).
    refreshed = await form_post(
        client,
        "/oauth/token",
        partner,
        grant_type="refresh_token",
        refresh_token=first.json()["refresh_token"],
    )
    assert_oauth_error(refreshed, 400, "invalid_grant")


async def test_a_failed_exchange_spends_the_code(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database, keyring: Keyring
) -> None:
    shop = await provision()
    partner = await partner_client(db, keyring)
    verifier = new_verifier()
    code = await authorization_code(db, keyring, partner, shop, verifier)
    wrong = await exchange_code(client, partner, code, code_verifier=new_verifier())
    assert_oauth_error(wrong, 400, "invalid_grant")
    right = await exchange_code(client, partner, code, code_verifier=verifier)
    assert_oauth_error(right, 400, "invalid_grant")


async def test_a_code_for_scopes_the_client_lacks_is_refused(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database, keyring: Keyring
) -> None:
    shop = await provision()
    partner = await partner_client(db, keyring, scopes=frozenset({"customers:read"}))
    verifier = new_verifier()
    code = await authorization_code(
        db, keyring, partner, shop, verifier, scopes=frozenset({"customers:read", "keys:write"})
    )
    response = await exchange_code(client, partner, code, code_verifier=verifier)
    assert_oauth_error(response, 400, "invalid_grant")


async def test_a_repeated_parameter_is_an_invalid_request(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    oauth_client = await new_shop_client(client, shop)
    response = await client.post(
        "/oauth/token",
        content="grant_type=client_credentials&scope=keys:write&scope=customers:read",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            **basic(oauth_client["client_id"], oauth_client["client_secret"]),
        },
    )
    body = assert_oauth_error(response, 400, "invalid_request")
    assert "scope" in body["error_description"]


@pytest.mark.parametrize(
    "case", ["missing-verifier", "wrong-verifier", "redirect-uri-trailing-slash", "no-redirect-uri"]
)
async def test_a_code_exchange_that_does_not_match_is_invalid_grant(
    client: httpx.AsyncClient,
    provision: ProvisionFactory,
    db: Database,
    keyring: Keyring,
    case: str,
) -> None:
    shop = await provision()
    partner = await partner_client(db, keyring)
    verifier = new_verifier()
    code = await authorization_code(db, keyring, partner, shop, verifier)
    form = {
        "missing-verifier": {},
        "wrong-verifier": {"code_verifier": new_verifier()},
        "redirect-uri-trailing-slash": {
            "code_verifier": verifier,
            "redirect_uri": PARTNER_CALLBACK + "/",
        },
        "no-redirect-uri": {"code_verifier": verifier, "redirect_uri": ""},
    }[case]
    response = await exchange_code(client, partner, code, **form)
    assert_oauth_error(response, 400, "invalid_grant")


async def test_reusing_a_refresh_token_is_invalid_grant_and_revokes_the_family(
    client: httpx.AsyncClient, provision: ProvisionFactory, db: Database, keyring: Keyring
) -> None:
    shop = await provision()
    partner = await partner_client(db, keyring)
    verifier = new_verifier()
    code = await authorization_code(db, keyring, partner, shop, verifier)
    first = (await exchange_code(client, partner, code, code_verifier=verifier)).json()
    rotated = await form_post(
        client,
        "/oauth/token",
        partner,
        grant_type="refresh_token",
        refresh_token=first["refresh_token"],
    )
    assert rotated.status_code == 200, rotated.text
    newest = rotated.json()["refresh_token"]

    replayed = await form_post(
        client,
        "/oauth/token",
        partner,
        grant_type="refresh_token",
        refresh_token=first["refresh_token"],
    )
    assert_oauth_error(replayed, 400, "invalid_grant")
    family = await form_post(client, "/oauth/introspect", partner, token=newest)
    assert family.json() == {"active": False}
    after = await form_post(
        client, "/oauth/token", partner, grant_type="refresh_token", refresh_token=newest
    )
    assert_oauth_error(after, 400, "invalid_grant")


async def test_a_partner_app_may_not_use_client_credentials(
    client: httpx.AsyncClient, db: Database, keyring: Keyring
) -> None:
    partner = await partner_client(db, keyring)
    response = await client_credentials(client, partner)
    assert_oauth_error(response, 400, "unauthorized_client")


# --- deleting a client -------------------------------------------------------------------------


async def test_deleting_a_client_revokes_its_access_tokens(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop, oauth_client, token = await shop_with_token(client, provision)
    sibling = await new_shop_client(client, shop, name="Sibling")
    sibling_token = await access_token(client, sibling)
    assert (await client.get("/v1/api-keys", headers=bearer(token))).status_code == 200

    deleted = await client.delete(
        f"/v1/oauth-clients/{oauth_client['client_id']}", headers=bearer(shop.secret_key)
    )
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["revoked_at"] is not None
    assert "client_secret" not in deleted.json()

    assert_unauthenticated(await client.get("/v1/api-keys", headers=bearer(token)), "revoked")
    # Only that client's tokens.
    assert (await client.get("/v1/api-keys", headers=bearer(sibling_token))).status_code == 200


async def test_a_deleted_clients_secret_no_longer_authenticates(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    oauth_client = await new_shop_client(client, shop)
    deleted = await client.delete(
        f"/v1/oauth-clients/{oauth_client['client_id']}", headers=bearer(shop.secret_key)
    )
    assert deleted.status_code == 200
    assert_oauth_error(await client_credentials(client, oauth_client), 401, "invalid_client")


# --- signing-key rotation ----------------------------------------------------------------------


async def test_tokens_signed_before_and_after_a_key_rotation_both_verify(
    app: Litestar, client: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    oauth_client = await new_shop_client(client, shop)
    before = await access_token(client, oauth_client)

    async with db.control() as conn:
        await app.state.tokens._create_key(conn)
    await app.state.tokens.load()

    after = await access_token(client, oauth_client)
    old_kid, new_kid = jwt_parts(before)[0]["kid"], jwt_parts(after)[0]["kid"]
    assert old_kid != new_kid
    for token in (before, after):
        assert (await client.get("/v1/api-keys", headers=bearer(token))).status_code == 200
    published = {key["kid"] for key in (await client.get("/.well-known/jwks.json")).json()["keys"]}
    assert {old_kid, new_kid} <= published


async def test_a_running_token_service_rotates_its_signing_key_when_due(
    db: Database, keyring: Keyring
) -> None:
    clock = [time.time()]
    service = TokenService(
        db,
        keyring,
        issuer=ISSUER,
        audience=ISSUER,
        ttl_seconds=900,
        rotation_days=1,
        clock=lambda: clock[0],
    )
    claims = {
        "subject": "cl_rotation",
        "client_id": "cl_rotation",
        "tenant_id": uuid.uuid4(),
        "scopes": frozenset({"customers:read"}),
    }
    first, _ = await service.issue(**claims)  # type: ignore[arg-type]
    clock[0] += 2 * 86400  # two days later, the same process
    second, _ = await service.issue(**claims)  # type: ignore[arg-type]
    assert jwt_parts(second)[0]["kid"] != jwt_parts(first)[0]["kid"]


# --- metadata ----------------------------------------------------------------------------------


async def test_authorization_server_metadata(client: httpx.AsyncClient) -> None:
    response = await client.get("/.well-known/oauth-authorization-server")
    assert response.status_code == 200
    meta = response.json()
    assert meta["issuer"] == ISSUER
    assert meta["token_endpoint"] == f"{ISSUER}/oauth/token"
    assert meta["revocation_endpoint"] == f"{ISSUER}/oauth/revoke"
    assert meta["introspection_endpoint"] == f"{ISSUER}/oauth/introspect"
    assert meta["jwks_uri"] == f"{ISSUER}/.well-known/jwks.json"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    grants = meta["grant_types_supported"]
    assert "password" not in grants and "implicit" not in grants
    assert "token" not in meta["response_types_supported"]
    assert "none" not in meta["token_endpoint_auth_methods_supported"]


async def test_jwks_publishes_public_key_material_only(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    await shop_with_token(client, provision)  # a signing key exists
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    keys = response.json()["keys"]
    assert keys
    for key in keys:
        assert key["kty"] == "RSA"
        assert key["kid"]
        assert {"n", "e"} <= key.keys()
        assert not {"d", "p", "q", "dp", "dq", "qi", "oth"} & key.keys()


# --- tenant isolation --------------------------------------------------------------------------


async def test_a_token_cannot_read_another_shops_key(
    client: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    _, _, token = await shop_with_token(client, provision)
    other = await provision("Other shop")
    [other_key_id, *_] = sorted(await secret_key_ids(client, other))

    response = await client.get(f"/v1/api-keys/{other_key_id}", headers=bearer(token))
    assert response.status_code == 404, response.text
    assert response.json()["type"] == "/problems/not-found"
    own = await client.get(f"/v1/api-keys/{other_key_id}", headers=bearer(other.secret_key))
    assert own.status_code == 200
