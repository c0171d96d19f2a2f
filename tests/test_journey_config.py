"""``/v1/config/journey``: reading, replacing, versioning, restoring and previewing a shop's rules,
end to end over HTTP against the real database, with customers made by real ingest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from litestar import Litestar

from api.db import Database, tenant_tx
from api.journey.config_routes import journey_config_routes
from api.journey.rules import DEFAULT_RULES, rules_json
from api.tenants.lifecycle import ProvisionedShop
from tests.conftest import ProvisionFactory, bearer, http_client, make_app
from tests.test_touchpoints import NOW, iso, send, touchpoint

CONFIG = "/v1/config/journey"
VERSIONS = f"{CONFIG}/versions"
PREVIEW = f"{CONFIG}/preview"
STAGE_KEYS = (
    "awareness",
    "consideration",
    "acquisition",
    "service",
    "loyalty",
    "advocacy",
    "at_risk",
    "lapsed",
)

#: A rule set unlike the defaults in every part the fixture below exercises.
CUSTOM: dict[str, Any] = {
    "stages": {
        "consideration": {"touchpoints": {"at_least": 2, "channels": ["web"]}},
        "acquisition": {"spend": {"currency": "EUR", "at_least": 10000}},
        "loyalty": {"all": [{"orders": {"at_least": 2}}, {"days_since_purchase": {"at_most": 30}}]},
    },
    "drift": {"at_risk_after_days": 150, "lapsed_after_days": 365},
}


# --- the app with this package's routes ---------------------------------------------------------


@pytest.fixture(scope="module")
def config_app(db: Database) -> Litestar:
    """The app with the journey config routes, whether or not ``create_app`` registers them."""
    app = make_app(db)
    if PREVIEW not in {route.path for route in app.routes}:
        for handler in journey_config_routes:
            app.register(handler)
    return app


@pytest.fixture
async def api(config_app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(config_app) as client:
        yield client


async def restricted_key(api: httpx.AsyncClient, shop: ProvisionedShop, *scopes: str) -> Any:
    response = await api.post(
        "/v1/api-keys",
        json={"kind": "restricted", "scopes": list(scopes)},
        headers=bearer(shop.secret_key),
    )
    assert response.status_code == 201, response.text
    return response.json()


async def put_rules(api: httpx.AsyncClient, key: str, rules: Any, **headers: str) -> httpx.Response:
    return await api.put(CONFIG, json=rules, headers={**bearer(key), **headers})


def as_stored(rules: dict[str, Any]) -> dict[str, Any]:
    """A rule set as the API answers it: the drift defaults filled in."""
    drift = {"at_risk_after_days": 90, "lapsed_after_days": 180, **rules.get("drift", {})}
    return {**rules, "drift": drift}


def stage_map(**counts: int) -> dict[str, int]:
    return {key: counts.get(key, 0) for key in STAGE_KEYS}


async def footprint(db: Database, shop: ProvisionedShop) -> dict[str, Any]:
    """Everything a preview could change: versions, every profile's stage, transitions."""
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        return {
            "versions": await conn.fetchval("SELECT count(*) FROM journey_rule_versions"),
            "stages": [
                tuple(row)
                for row in await conn.fetch(
                    "SELECT id, stage, reached_stage, stage_since FROM customers ORDER BY id"
                )
            ],
            "transitions": await conn.fetchval("SELECT count(*) FROM stage_transitions"),
        }


# --- reading and replacing ----------------------------------------------------------------------


async def test_a_new_shop_has_the_default_rules(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    response = await api.get(CONFIG, headers=bearer(shop.secret_key))
    assert response.status_code == 200, response.text
    assert response.json() == {
        "object": "journey_rules",
        "version": 0,
        "is_default": True,
        "rules": rules_json(DEFAULT_RULES),
        "created_at": None,
        "created_by": None,
        "restored_from": None,
    }
    versions = await api.get(VERSIONS, headers=bearer(shop.secret_key))
    assert versions.json() == {"data": [], "has_more": False}


async def test_replacing_the_rules_stores_a_new_version(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    writer = await restricted_key(api, shop, "config:write")
    response = await put_rules(api, writer["key"], CUSTOM)
    assert response.status_code == 200, response.text
    saved = response.json()
    assert saved["object"] == "journey_rules"
    assert (saved["version"], saved["is_default"]) == (1, False)
    assert saved["rules"] == as_stored(CUSTOM)
    assert saved["created_by"] == f"key:{writer['id']}"
    assert saved["created_at"] is not None
    assert saved["restored_from"] is None

    current = await api.get(CONFIG, headers=bearer(shop.secret_key))
    assert current.json() == saved

    # Restating the defaults is a new version, and the rules in force are the defaults again.
    again = await put_rules(api, shop.secret_key, rules_json(DEFAULT_RULES))
    assert (again.json()["version"], again.json()["is_default"]) == (2, True)


async def test_concurrent_saves_get_consecutive_versions(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    bodies = [{"stages": {"loyalty": {"orders": {"at_least": n}}}} for n in range(3, 11)]
    responses = await asyncio.gather(*(put_rules(api, shop.secret_key, b) for b in bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert sorted(r.json()["version"] for r in responses) == list(range(1, len(bodies) + 1))
    newest = max(responses, key=lambda r: r.json()["version"]).json()
    assert (await api.get(CONFIG, headers=bearer(shop.secret_key))).json() == newest


async def test_a_retried_put_with_an_idempotency_key_saves_once(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    first = await put_rules(api, shop.secret_key, CUSTOM, **{"Idempotency-Key": "rules-1"})
    retry = await put_rules(api, shop.secret_key, CUSTOM, **{"Idempotency-Key": "rules-1"})
    assert first.status_code == retry.status_code == 200
    assert retry.json() == first.json()
    assert retry.headers["idempotency-replayed"] == "true"
    other = await put_rules(api, shop.secret_key, {"stages": {}}, **{"Idempotency-Key": "rules-1"})
    assert other.status_code == 422
    assert other.json()["type"] == "/problems/idempotency-key-reused"
    versions = await api.get(VERSIONS, headers=bearer(shop.secret_key))
    assert [v["version"] for v in versions.json()["data"]] == [1]


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "path"),
    [
        ({"stages": {"royalty": {"orders": {"at_least": 1}}}}, "$.stages.royalty"),
        ({"stages": {"awareness": {"orders": {"at_least": 1}}}}, "$.stages.awareness"),
        (
            {"stages": {"service": {"touchpoints": {"at_least": 1, "types": ["refund", "clik"]}}}},
            "$.stages.service.touchpoints.types[1]",
        ),
        (
            {"stages": {"service": {"touchpoints": {"at_least": 1, "channels": ["pigeon"]}}}},
            "$.stages.service.touchpoints.channels[0]",
        ),
        (
            {"stages": {"consideration": {"touchpoints": {"at_least": 0, "types": ["search"]}}}},
            "$.stages.consideration.touchpoints.at_least",
        ),
        (
            {
                "stages": {
                    "loyalty": {"any": [{"orders": {"at_least": 3}}, {"orders": {"at_least": -1}}]}
                }
            },
            "$.stages.loyalty.any[1].orders.at_least",
        ),
        (
            {
                "stages": {
                    "consideration": {
                        "touchpoints": {"at_least": 1, "types": ["search"], "channels": ["web"]}
                    }
                }
            },
            "$.stages.consideration.touchpoints",
        ),
        ({"stages": {"loyalty": {"any": []}}}, "$.stages.loyalty.any"),
        (
            {"stages": {"loyalty": {"all": [{"orders": {"at_least": 3}}, {"any": []}]}}},
            "$.stages.loyalty.all[1].any",
        ),
        (
            {"stages": {}, "drift": {"at_risk_after_days": 90, "lapsed_after_days": 90}},
            "$.drift.lapsed_after_days",
        ),
        ({"stages": {"loyalty": {"ordres": {"at_least": 3}}}}, "$.stages.loyalty.ordres"),
        ({"stages": {}, "colour": "blue"}, "$.colour"),
        ({"stages": {"loyalty": {"touchpoints": {"types": ["search"]}}}}, None),
        ({"stages": {"loyalty": {}}}, "$.stages.loyalty"),
        ({"stages": {"loyalty": {"spend": {"currency": "eur", "at_least": 1}}}}, None),
        ({"drift": {}}, "$.stages"),
        ([], "$"),
    ],
)
async def test_an_invalid_rule_set_is_a_422_naming_the_path(
    api: httpx.AsyncClient, provision: ProvisionFactory, rules: Any, path: str | None
) -> None:
    shop = await provision()
    for url, send_it in ((CONFIG, api.put), (PREVIEW, api.post)):
        response = await send_it(url, json=rules, headers=bearer(shop.secret_key))
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["type"] == "/problems/validation"
        paths = [error["path"] for error in body["errors"]]
        if path is not None:
            assert path in paths, paths
        else:  # the path is spelled by msgspec: just check it is inside the failing stage
            assert all(p.startswith("$.stages.loyalty.") for p in paths), paths
    current = await api.get(CONFIG, headers=bearer(shop.secret_key))
    assert current.json()["version"] == 0, "nothing is stored unless all of it is valid"


async def test_every_error_is_reported_at_once(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    rules = {
        "stages": {
            "loyalty": {"orders": {"at_least": 5, "at_most": 2}},
            "advocacy": {"touchpoints": {"at_least": 1, "types": ["shouted"]}},
        },
        "drift": {"at_risk_after_days": 200, "lapsed_after_days": 100},
    }
    response = await put_rules(api, shop.secret_key, rules)
    assert response.status_code == 422
    assert [e["path"] for e in response.json()["errors"]] == [
        "$.stages.loyalty.orders.at_most",
        "$.stages.advocacy.touchpoints.types[0]",
        "$.drift.lapsed_after_days",
    ]


async def test_broken_bodies_are_clear_errors(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    headers = {**bearer(shop.secret_key), "Content-Type": "application/json"}
    malformed = await api.put(CONFIG, content=b'{"stages": ', headers=headers)
    assert malformed.status_code == 400
    assert malformed.json()["type"] == "/problems/malformed-body"

    depth = 3000  # far past the nesting limit: refused, not a crash
    deep = (
        b'{"stages": {"loyalty": '
        + b'{"all": [' * depth
        + b'{"orders": {"at_least": 1}}'
        + b"]}" * depth
        + b"}}"
    )
    response = await api.post(PREVIEW, content=deep, headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["path"] == "$"

    nested: dict[str, Any] = {"orders": {"at_least": 1}}
    for _ in range(6):
        nested = {"all": [nested]}
    too_deep = await put_rules(api, shop.secret_key, {"stages": {"loyalty": nested}})
    assert too_deep.status_code == 422
    assert "nest at most" in too_deep.json()["errors"][0]["message"]

    huge = {"stages": {"loyalty": {"any": [{"orders": {"at_least": 1}}] * 5000}}}
    too_big = await put_rules(api, shop.secret_key, huge)
    assert too_big.status_code == 413
    assert "65,536 bytes" in too_big.json()["detail"]


# --- who may ------------------------------------------------------------------------------------


async def test_who_may_read_and_change_the_rules(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    calls = [
        ("GET", CONFIG, None, "analytics:read"),
        ("GET", VERSIONS, None, "analytics:read"),
        ("PUT", CONFIG, CUSTOM, "config:write"),
        ("POST", f"{VERSIONS}/0/restore", None, "config:write"),
        ("POST", PREVIEW, CUSTOM, "config:write"),
    ]
    reader = (await restricted_key(api, shop, "analytics:read"))["key"]
    writer = (await restricted_key(api, shop, "config:write"))["key"]
    neither = (await restricted_key(api, shop, "customers:read", "customers:write"))["key"]
    for method, url, body, scope in calls:
        anonymous = await api.request(method, url, json=body)
        assert anonymous.status_code == 401, (method, url)
        denied = await api.request(method, url, json=body, headers=bearer(neither))
        assert denied.status_code == 403, (method, url)
        assert denied.json()["type"] == "/problems/insufficient-scope"
        assert scope in denied.headers["www-authenticate"]
        allowed = await api.request(
            method, url, json=body, headers=bearer(reader if scope == "analytics:read" else writer)
        )
        assert allowed.status_code == 200, (method, url, allowed.text)
        other = await api.request(
            method, url, json=body, headers=bearer(writer if scope == "analytics:read" else reader)
        )
        assert other.status_code == 403, (method, url)


# --- versions and restore -----------------------------------------------------------------------


async def test_versions_are_listed_newest_first_and_restorable(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    key = shop.secret_key
    second = {"stages": {"acquisition": {"orders": {"at_least": 2}}}}
    assert (await put_rules(api, key, CUSTOM)).status_code == 200
    assert (await put_rules(api, key, second)).status_code == 200

    restored = await api.post(f"{VERSIONS}/1/restore", headers=bearer(key))
    assert restored.status_code == 200, restored.text
    assert restored.json()["version"] == 3
    assert restored.json()["restored_from"] == 1
    assert restored.json()["rules"] == as_stored(CUSTOM)
    assert (await api.get(CONFIG, headers=bearer(key))).json() == restored.json()

    defaults = await api.post(f"{VERSIONS}/0/restore", headers=bearer(key))
    assert defaults.status_code == 200, defaults.text
    assert (defaults.json()["version"], defaults.json()["restored_from"]) == (4, 0)
    assert defaults.json()["is_default"] is True
    assert defaults.json()["rules"] == rules_json(DEFAULT_RULES)

    for unknown in (5, 99, -1, 2**31 - 1, 2**31, 10**30):
        missing = await api.post(f"{VERSIONS}/{unknown}/restore", headers=bearer(key))
        assert missing.status_code == 404, unknown
        assert missing.json()["type"] == "/problems/not-found"

    everything = (await api.get(VERSIONS, headers=bearer(key))).json()
    assert everything["has_more"] is False
    listed = [(v["version"], v["restored_from"]) for v in everything["data"]]
    assert listed == [(4, 0), (3, 1), (2, None), (1, None)]
    assert everything["data"][2]["rules"] == as_stored(second)
    assert everything["data"][2]["object"] == "journey_rule_version"
    assert everything["data"][2]["created_by"].startswith("key:")

    first_page = (await api.get(VERSIONS, params={"limit": 3}, headers=bearer(key))).json()
    assert [v["version"] for v in first_page["data"]] == [4, 3, 2]
    assert first_page["has_more"] is True
    rest = await api.get(VERSIONS, params={"limit": 3, "starting_after": 2}, headers=bearer(key))
    assert ([v["version"] for v in rest.json()["data"]], rest.json()["has_more"]) == ([1], False)
    bad = await api.get(VERSIONS, params={"starting_after": "two"}, headers=bearer(key))
    assert bad.status_code in (400, 422)


async def test_a_retried_restore_restores_once(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    await put_rules(api, shop.secret_key, CUSTOM)
    headers = {**bearer(shop.secret_key), "Idempotency-Key": "restore-defaults"}
    first = await api.post(f"{VERSIONS}/0/restore", headers=headers)
    retry = await api.post(f"{VERSIONS}/0/restore", headers=headers)
    assert retry.json() == first.json()
    assert retry.headers["idempotency-replayed"] == "true"
    assert (await api.get(CONFIG, headers=bearer(shop.secret_key))).json()["version"] == 2


# --- preview ------------------------------------------------------------------------------------


def purchase(event_id: str, customer_id: str, amount: int, **fields: Any) -> dict[str, Any]:
    order = {"order_id": f"order-{event_id}", "amount": amount, "currency": "EUR"}
    return touchpoint(
        event_id, customer_id=customer_id, type="purchase", order=order, anonymous_id=None, **fields
    )


def known(event_id: str, customer_id: str, **fields: Any) -> dict[str, Any]:
    return touchpoint(event_id, customer_id=customer_id, anonymous_id=None, **fields)


async def shop_with_customers(api: httpx.AsyncClient, provision: ProvisionFactory) -> Any:
    """Nine profiles with known histories (and a tenth merged away), ingested under the
    defaults. Where each lands, under the defaults and under ``CUSTOM``:

    ======== ============================================ ============= =============
    profile  history                                      defaults      CUSTOM
    ======== ============================================ ============= =============
    anon-1   1 page view (web), anonymous                 awareness     awareness
    anon-2   2 page views (web), anonymous                awareness     consideration
    browser  product view (web) + dup's, merged in        consideration consideration
    buyer    1 purchase, EUR 50 (web)                     acquisition   awareness
    twice    2 purchases, EUR 120 (web)                   service       loyalty
    regular  3 purchases, EUR 30 (email)                  loyalty       loyalty
    fan      1 purchase, EUR 200 (store) + review (web)   advocacy      acquisition
    drifting 1 purchase 100 days ago, EUR 50 (web)        at_risk       awareness
    gone     1 purchase 200 days ago, EUR 50 (web)        lapsed        at_risk
    ======== ============================================ ============= =============
    """
    shop = await provision()
    key = shop.secret_key
    long_ago = NOW - timedelta(days=200)
    while_ago = NOW - timedelta(days=100)
    await send(
        api,
        key,
        touchpoint("a1", anonymous_id="anon-1"),
        touchpoint("a2-1", anonymous_id="anon-2"),
        touchpoint("a2-2", anonymous_id="anon-2"),
        known("b-1", "browser", type="product_view"),
        known("d-1", "dup", type="product_view"),
        purchase("buy-1", "buyer", 5000),
        purchase("tw-1", "twice", 6000),
        purchase("tw-2", "twice", 6000),
        purchase("reg-1", "regular", 1000, channel="email"),
        purchase("reg-2", "regular", 1000, channel="email"),
        purchase("reg-3", "regular", 1000, channel="email"),
        purchase("fan-1", "fan", 20000, channel="store"),
        known("fan-2", "fan", type="review_written"),
        purchase("dr-1", "drifting", 5000, occurred_at=iso(while_ago)),
        purchase("gone-1", "gone", 5000, occurred_at=iso(long_ago)),
    )
    merged = await api.post(
        "/v1/customers/browser/merge", json={"customer_id": "dup"}, headers=bearer(key)
    )
    assert merged.status_code == 200, merged.text
    return shop


DEFAULT_COUNTS = stage_map(
    awareness=2,
    consideration=1,
    acquisition=1,
    service=1,
    loyalty=1,
    advocacy=1,
    at_risk=1,
    lapsed=1,
)
CUSTOM_COUNTS = stage_map(awareness=3, consideration=2, acquisition=1, loyalty=2, at_risk=1)


async def test_a_preview_counts_where_the_customers_would_land(
    api: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with_customers(api, provision)
    key = shop.secret_key
    before = await footprint(db, shop)

    defaults = await api.post(PREVIEW, json=rules_json(DEFAULT_RULES), headers=bearer(key))
    assert defaults.status_code == 200, defaults.text
    assert defaults.json() == {
        "object": "journey_preview",
        "customers": 9,
        "stages": DEFAULT_COUNTS,
        "current": DEFAULT_COUNTS,  # ingest placed everyone by the same rules
    }

    custom = await api.post(PREVIEW, json=CUSTOM, headers=bearer(key))
    assert custom.status_code == 200, custom.text
    assert custom.json() == {
        "object": "journey_preview",
        "customers": 9,
        "stages": CUSTOM_COUNTS,
        "current": DEFAULT_COUNTS,
    }

    nothing = await api.post(PREVIEW, json={"stages": {}}, headers=bearer(key))
    assert nothing.json()["stages"] == stage_map(awareness=7, at_risk=1, lapsed=1)

    assert await footprint(db, shop) == before, "a preview writes nothing"
    assert (await api.get(CONFIG, headers=bearer(key))).json()["version"] == 0


async def test_a_preview_of_an_empty_shop_has_every_stage(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    response = await api.post(PREVIEW, json=CUSTOM, headers=bearer(shop.secret_key))
    assert response.json() == {
        "object": "journey_preview",
        "customers": 0,
        "stages": stage_map(),
        "current": stage_map(),
    }


async def test_new_rules_move_customers_only_on_their_next_touchpoint(
    api: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await shop_with_customers(api, provision)
    key = shop.secret_key
    before = await footprint(db, shop)
    assert (await put_rules(api, key, CUSTOM)).status_code == 200
    after = await footprint(db, shop)
    assert after["stages"] == before["stages"], "saving rules moves nobody"
    assert after["transitions"] == before["transitions"]

    # anon-2's third web visit: consideration under the new rules (the defaults ignore visits).
    # fan gets a touchpoint too, and stays in advocacy: stages never move back on a touchpoint.
    await send(
        api,
        key,
        touchpoint("a2-3", anonymous_id="anon-2"),
        known("fan-3", "fan", type="page_view"),
    )
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        rows = await conn.fetch(
            "SELECT i.value, c.stage FROM identities i JOIN customers c"
            " ON c.id = i.customer_ref WHERE i.value IN ('anon-2', 'fan', 'buyer')"
        )
    stages = {row["value"]: row["stage"] for row in rows}
    assert stages == {"anon-2": "consideration", "fan": "advocacy", "buyer": "acquisition"}
    preview = await api.post(PREVIEW, json=CUSTOM, headers=bearer(key))
    current = preview.json()["current"]
    assert current == {**DEFAULT_COUNTS, "awareness": 1, "consideration": 2}


# --- isolation ----------------------------------------------------------------------------------


async def test_two_shops_never_mix(
    api: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop_a = await shop_with_customers(api, provision)
    shop_b = await provision("Shop B")
    searches = (known(f"b{i}", "browser", type="search", channel="email") for i in range(3))
    await send(api, shop_b.secret_key, *searches)

    put_b = await put_rules(api, shop_b.secret_key, CUSTOM)
    assert put_b.json()["version"] == 1
    a_rules = await api.get(CONFIG, headers=bearer(shop_a.secret_key))
    assert (a_rules.json()["version"], a_rules.json()["is_default"]) == (0, True)
    a_versions = await api.get(VERSIONS, headers=bearer(shop_a.secret_key))
    assert a_versions.json()["data"] == []
    # Shop A cannot restore shop B's version.
    restore = await api.post(f"{VERSIONS}/1/restore", headers=bearer(shop_a.secret_key))
    assert restore.status_code == 404

    preview_a = await api.post(PREVIEW, json=CUSTOM, headers=bearer(shop_a.secret_key))
    assert preview_a.json()["customers"] == 9
    assert preview_a.json()["stages"] == CUSTOM_COUNTS
    preview_b = await api.post(PREVIEW, json=CUSTOM, headers=bearer(shop_b.secret_key))
    assert preview_b.json()["customers"] == 1
    assert preview_b.json()["current"] == stage_map(consideration=1)
    assert preview_b.json()["stages"] == stage_map(awareness=1)  # no web visits, no order
