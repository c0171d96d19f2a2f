"""RFM: scores, segments, the report and its movement, the settings, the incremental skip and the
worker's chore, end to end over HTTP against the real database with data made by real ingest.

The fixture (:data:`PURCHASES`) is ten buyers and one browser whose scores are worked out by hand
below; with ten buyers ``ntile(5)`` puts two positions in each quintile, and a tie takes the score
of its first position."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, get_args

import httpx
import pytest
from litestar import Litestar

from api.customers.schemas import RfmSegment
from api.db import Database, tenant_tx
from api.journey import rfm
from api.journey.rfm import (
    SEGMENT_RULES,
    SEGMENTS,
    recompute,
    recompute_rfm_all_shops,
    segment_for,
    segment_sql,
    window_start,
)
from api.journey.rfm_routes import rfm_routes
from api.tenants.lifecycle import ProvisionedShop
from tests.conftest import ProvisionFactory, bearer, http_client, make_app
from tests.test_touchpoints import NOW, iso, send, touchpoint

REPORT = "/v1/analytics/rfm"
RECOMPUTE = f"{REPORT}/recompute"
CONFIG = "/v1/config/rfm"

# (customer, type, days ago, amount, currency)
PURCHASES: list[tuple[str, str, int, int, str]] = [
    ("lost", "purchase", 500, 10000, "EUR"),  # outside the 365-day window
    ("fading", "purchase", 300, 6000, "EUR"),
    ("fading", "purchase", 250, 6000, "EUR"),
    ("fading", "refund", 240, 6000, "EUR"),
    ("atrisk", "purchase", 260, 3000, "EUR"),
    ("atrisk", "purchase", 230, 3000, "EUR"),
    ("atrisk", "purchase", 200, 3000, "EUR"),
    ("hib", "purchase", 180, 1500, "EUR"),
    ("need", "purchase", 150, 2500, "EUR"),
    ("need", "purchase", 120, 2500, "EUR"),
    ("loyal", "purchase", 180, 5000, "EUR"),
    ("loyal", "purchase", 150, 5000, "EUR"),
    ("loyal", "purchase", 120, 5000, "EUR"),
    ("loyal", "purchase", 90, 5000, "EUR"),
    ("promising", "purchase", 40, 2000, "EUR"),
    ("potential", "purchase", 60, 4000, "EUR"),
    ("potential", "purchase", 30, 9999, "USD"),  # an order, but not EUR spend
    ("champ", "purchase", 100, 8000, "EUR"),
    ("champ", "purchase", 75, 8000, "EUR"),
    ("champ", "purchase", 50, 8000, "EUR"),
    ("champ", "purchase", 25, 8000, "EUR"),
    ("champ", "purchase", 5, 8000, "EUR"),
    ("new", "purchase", 2, 3000, "EUR"),
]

# By hand. Recency, days since the last purchase (worst first): lost 500, fading 250, atrisk 200,
# hib 180, need 120, loyal 90, promising 40, potential 30, champ 5, new 2 -> 1 1 2 2 3 3 4 4 5 5.
# Frequency, orders in the window: lost 0 | hib, promising, new 1 (positions 2-4: all 1) |
# fading, need, potential 2 (positions 5-7: all 3) | atrisk 3 (8: 4) | loyal 4, champ 5 (5).
# Monetary, EUR purchases minus refunds in the window: lost 0, hib 1500, promising 2000,
# new 3000, potential 4000, need 5000, fading 6000, atrisk 9000, loyal 20000, champ 40000.
FIRST: dict[str, tuple[int, int, int, str]] = {
    "champ": (5, 5, 5, "champions"),
    "new": (5, 1, 2, "new"),
    "promising": (4, 1, 2, "promising"),
    "potential": (4, 3, 3, "potential_loyalists"),
    "need": (3, 3, 3, "need_attention"),
    "loyal": (3, 5, 5, "loyal"),
    "atrisk": (2, 4, 4, "at_risk"),
    "hib": (2, 1, 1, "hibernating"),
    "fading": (1, 3, 4, "at_risk"),
    "lost": (1, 1, 1, "lost"),
}
FIRST_SEGMENTS = {
    "champions": (1, 40000),
    "loyal": (1, 20000),
    "potential_loyalists": (1, 4000),
    "new": (1, 3000),
    "promising": (1, 2000),
    "need_attention": (1, 5000),
    "at_risk": (2, 15000),
    "hibernating": (1, 1500),
    "lost": (1, 0),
}

# After "hib" buys again today for 3000: recency hib 0 days, the rest keep their order ->
# lost 1, fading 1, atrisk 2, need 2, loyal 3, promising 3, potential 4, champ 4, new 5, hib 5.
# Frequency: lost 0 | new, promising 1 (2-3: 1) | hib, need, potential, fading 2 (4-7: 2) |
# atrisk 3 (4) | loyal, champ (5). Monetary: hib 4500 sits between potential and need.
SECOND: dict[str, tuple[int, int, int, str]] = {
    "champ": (4, 5, 5, "loyal"),
    "new": (5, 1, 2, "new"),
    "promising": (3, 1, 1, "need_attention"),
    "potential": (4, 2, 2, "potential_loyalists"),
    "need": (2, 2, 3, "hibernating"),
    "loyal": (3, 5, 5, "loyal"),
    "atrisk": (2, 4, 4, "at_risk"),
    "hib": (5, 2, 3, "potential_loyalists"),
    "fading": (1, 2, 4, "hibernating"),
    "lost": (1, 1, 1, "lost"),
}
SECOND_SEGMENTS = {
    "champions": (0, 0),
    "loyal": (2, 60000),
    "potential_loyalists": (2, 8500),
    "new": (1, 3000),
    "promising": (0, 0),
    "need_attention": (1, 2000),
    "at_risk": (1, 9000),
    "hibernating": (2, 11000),
    "lost": (1, 0),
}
SECOND_MOVEMENT = [
    ("champions", "loyal", 1),
    ("loyal", "loyal", 1),
    ("potential_loyalists", "potential_loyalists", 1),
    ("new", "new", 1),
    ("promising", "need_attention", 1),
    ("need_attention", "hibernating", 1),
    ("at_risk", "at_risk", 1),
    ("at_risk", "hibernating", 1),
    ("hibernating", "potential_loyalists", 1),
    ("lost", "lost", 1),
]

#: The segment grid, R 5 (top) to 1, F 1 to 5 left to right.
GRID: dict[int, list[str]] = {
    5: ["new", "potential_loyalists", "potential_loyalists", "champions", "champions"],
    4: ["promising", "potential_loyalists", "potential_loyalists", "loyal", "loyal"],
    3: ["need_attention", "need_attention", "need_attention", "loyal", "loyal"],
    2: ["hibernating", "hibernating", "at_risk", "at_risk", "at_risk"],
    1: ["lost", "hibernating", "at_risk", "at_risk", "at_risk"],
}


# --- the app and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rfm_app(db: Database) -> Litestar:
    """The app with the RFM routes, whether or not ``create_app`` registers them."""
    app = make_app(db)
    if RECOMPUTE not in {route.path for route in app.routes}:
        for handler in rfm_routes:
            app.register(handler)
    return app


@pytest.fixture
async def api(rfm_app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(rfm_app) as client:
        yield client


def order_touch(
    event_id: str, customer: str, kind: str, days: int, amount: int, currency: str
) -> dict[str, Any]:
    return touchpoint(
        event_id,
        type=kind,
        customer_id=customer,
        anonymous_id=None,
        occurred_at=iso(NOW - timedelta(days=days)),
        order={"order_id": event_id, "amount": amount, "currency": currency},
    )


async def seed(api: httpx.AsyncClient, shop: ProvisionedShop) -> None:
    """The ten buyers of :data:`PURCHASES` and a browser who never bought."""
    items = [
        order_touch(f"o{i}", customer, kind, days, amount, currency)
        for i, (customer, kind, days, amount, currency) in enumerate(PURCHASES)
    ]
    items.append(touchpoint("browse", customer_id="browser", anonymous_id=None))
    body = await send(api, shop.secret_key, *items)
    assert body["accepted"] == len(items), body


async def restricted_key(api: httpx.AsyncClient, shop: ProvisionedShop, *scopes: str) -> str:
    response = await api.post(
        "/v1/api-keys",
        json={"kind": "restricted", "scopes": list(scopes)},
        headers=bearer(shop.secret_key),
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


async def post_recompute(api: httpx.AsyncClient, key: str, **headers: str) -> dict[str, Any]:
    response = await api.post(RECOMPUTE, headers={**bearer(key), **headers})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def get_report(api: httpx.AsyncClient, key: str) -> dict[str, Any]:
    response = await api.get(REPORT, headers=bearer(key))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def stored_scores(db: Database, shop: ProvisionedShop) -> dict[str, tuple[Any, ...]]:
    """customer_id -> (R, F, M, segment) of every profile with a customer id."""
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        rows = await conn.fetch(
            "SELECT customer_id, rfm_recency, rfm_frequency, rfm_monetary, rfm_segment"
            " FROM customers WHERE customer_id IS NOT NULL"
        )
    return {row["customer_id"]: tuple(row)[1:] for row in rows}


async def run_count(db: Database, shop: ProvisionedShop) -> int:
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        count: int = await conn.fetchval("SELECT count(*) FROM rfm_runs")
    return count


def share(part: int, whole: int) -> float:
    if whole == 0:
        return 0.0
    return float((Decimal(part) / Decimal(whole)).quantize(Decimal("0.0001"), ROUND_HALF_UP))


def expected_segments(sizes: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    customers = sum(n for n, _ in sizes.values())
    revenue = sum(r for _, r in sizes.values())
    return [
        {
            "segment": segment,
            "customers": sizes[segment][0],
            "share": share(sizes[segment][0], customers),
            "revenue": sizes[segment][1],
            "revenue_share": share(sizes[segment][1], revenue),
        }
        for segment in SEGMENTS
    ]


def moves(*triples: tuple[str | None, str | None, int]) -> list[dict[str, Any]]:
    return [{"from": a, "to": b, "customers": n} for a, b, n in triples]


def as_stored(expected: dict[str, tuple[int, int, int, str]]) -> dict[str, tuple[Any, ...]]:
    return {**expected, "browser": (None, None, None, None)}


# --- the segment table --------------------------------------------------------------------------


def test_every_recency_and_frequency_has_exactly_one_segment() -> None:
    assert get_args(RfmSegment) == SEGMENTS
    assert {rule.segment for rule in SEGMENT_RULES} == set(SEGMENTS)
    winners = set()
    for r, f in itertools.product(range(1, 6), repeat=2):
        assert segment_for(r, f) == GRID[r][f - 1], (r, f)
        matching = [rule.segment for rule in SEGMENT_RULES if rule.matches(r, f)]
        # First match wins; only (1, 1) is claimed twice, by lost before hibernating.
        assert len(matching) == (2 if (r, f) == (1, 1) else 1), (r, f, matching)
        winners.add(matching[0])
    assert winners == set(SEGMENTS), "every rule wins at least one cell"
    with pytest.raises(ValueError, match="no RFM segment"):
        segment_for(0, 3)


async def test_the_sql_segment_table_agrees_with_python(db: Database) -> None:
    async with db.control() as conn:
        rows = await conn.fetch(
            f"SELECT r, f, {segment_sql('r', 'f')} AS segment"
            " FROM generate_series(1, 5) AS r, generate_series(1, 5) AS f"
        )
    assert len(rows) == 25
    for row in rows:
        assert row["segment"] == segment_for(row["r"], row["f"])


def test_the_window_is_whole_utc_days_ending_with_as_of() -> None:
    assert window_start(date(2025, 3, 10), 1) == datetime(2025, 3, 10, tzinfo=UTC)
    assert window_start(date(2025, 3, 10), 365) == datetime(2024, 3, 11, tzinfo=UTC)


# --- scores, report, movement -------------------------------------------------------------------


async def test_before_the_first_computation_the_report_is_empty(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    await seed(api, shop)
    assert await get_report(api, shop.secret_key) == {
        "object": "rfm_report",
        "computed_at": None,
        "as_of": None,
        "window_days": 365,
        "currency": None,
        "customers": 0,
        "segments": expected_segments(dict.fromkeys(SEGMENTS, (0, 0))),
        "movement": [],
    }
    profile = await api.get("/v1/customers/champ", headers=bearer(shop.secret_key))
    assert profile.status_code == 200, profile.text
    assert profile.json()["rfm"] is None


async def test_a_shop_without_buyers_is_computed_once(
    api: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    await send(api, shop.secret_key, touchpoint("browse", customer_id="browser", anonymous_id=None))
    report = await post_recompute(api, shop.secret_key)
    assert report["computed_at"] is not None
    assert (report["customers"], report["currency"], report["movement"]) == (0, "EUR", [])
    assert report["segments"] == expected_segments(dict.fromkeys(SEGMENTS, (0, 0)))
    # Days passing change nothing for a shop without buyers: no run is recorded.
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        later = await recompute(conn, as_of=datetime.now(UTC).date() + timedelta(days=3))
    assert later.skipped
    assert await run_count(db, shop) == 1


async def test_scores_segments_and_movement_by_hand(
    api: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    await seed(api, shop)

    first = await post_recompute(api, shop.secret_key)
    assert await stored_scores(db, shop) == as_stored(FIRST)
    assert first["object"] == "rfm_report"
    assert (first["window_days"], first["currency"], first["customers"]) == (365, "EUR", 10)
    assert first["as_of"] == datetime.now(UTC).date().isoformat()
    assert first["segments"] == expected_segments(FIRST_SEGMENTS)
    # Everyone is scored for the first time: from null.
    assert first["movement"] == moves(
        *((None, s, FIRST_SEGMENTS[s][0]) for s in SEGMENTS if FIRST_SEGMENTS[s][0])
    )
    assert await get_report(api, shop.secret_key) == first

    # The profile shows the scores; a customer who never bought has none.
    champ = (await api.get("/v1/customers/champ", headers=bearer(shop.secret_key))).json()
    assert champ["rfm"] == {
        "recency": 5,
        "frequency": 5,
        "monetary": 5,
        "segment": "champions",
        "computed_at": first["computed_at"],
        "changed_at": first["computed_at"],
    }
    browser = (await api.get("/v1/customers/browser", headers=bearer(shop.secret_key))).json()
    assert browser["rfm"] is None
    listed = await api.get("/v1/customers", headers=bearer(shop.secret_key))
    by_id = {c["customer_id"]: c["rfm"] for c in listed.json()["data"]}
    assert by_id["loyal"]["segment"] == "loyal" and by_id["browser"] is None

    # "hib" buys again today: the quintiles move for others too.
    await send(api, shop.secret_key, order_touch("again", "hib", "purchase", 0, 3000, "EUR"))
    second = await post_recompute(api, shop.secret_key)
    assert await stored_scores(db, shop) == as_stored(SECOND)
    assert second["computed_at"] > first["computed_at"]
    assert second["customers"] == 10
    assert second["segments"] == expected_segments(SECOND_SEGMENTS)
    assert second["movement"] == moves(*SECOND_MOVEMENT)

    # Only the six whose scores changed were written: "loyal" kept its scores from the first run.
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        assert await conn.fetchval("SELECT changed FROM rfm_runs ORDER BY id DESC LIMIT 1") == 6
    loyal = (await api.get("/v1/customers/loyal", headers=bearer(shop.secret_key))).json()
    assert loyal["rfm"]["computed_at"] == second["computed_at"]
    assert loyal["rfm"]["changed_at"] == first["computed_at"]
    hib = (await api.get("/v1/customers/hib", headers=bearer(shop.secret_key))).json()
    assert hib["rfm"]["changed_at"] == second["computed_at"]
    assert (hib["rfm"]["recency"], hib["rfm"]["segment"]) == (5, "potential_loyalists")


async def test_recomputing_without_changes_is_stable(
    api: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    await seed(api, shop)
    first = await post_recompute(api, shop.secret_key)

    # Nothing changed: the computation in force is answered again, no new run is recorded.
    again = await post_recompute(api, shop.secret_key)
    assert again == first
    assert await run_count(db, shop) == 1

    # A retried request with an Idempotency-Key replays its first answer.
    retried = await api.post(
        RECOMPUTE, headers={**bearer(shop.secret_key), "Idempotency-Key": "rfm-retry-1"}
    )
    replay = await api.post(
        RECOMPUTE, headers={**bearer(shop.secret_key), "Idempotency-Key": "rfm-retry-1"}
    )
    assert replay.json() == retried.json() == first
    assert replay.headers.get("Idempotency-Replayed") == "true"

    # A real run the next day (the window moves, every purchase stays in it) changes no score:
    # the movement says everyone stayed, nothing is written.
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        done = await recompute(conn, as_of=tomorrow)
        forced = await recompute(conn, as_of=tomorrow, force=True)
    assert not done.skipped and done.changed == 0
    assert done.report.as_of == tomorrow
    assert await stored_scores(db, shop) == as_stored(FIRST)
    stays = [(s, s, FIRST_SEGMENTS[s][0]) for s in SEGMENTS if FIRST_SEGMENTS[s][0]]
    report = await get_report(api, shop.secret_key)
    assert report["movement"] == moves(*stays)
    assert report["segments"] == first["segments"]
    assert not forced.skipped and forced.changed == 0
    assert await run_count(db, shop) == 3


async def test_a_request_during_a_running_computation_is_told_to_retry(
    api: httpx.AsyncClient,
    provision: ProvisionFactory,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shop = await provision()
    await seed(api, shop)
    monkeypatch.setattr(rfm, "REQUEST_LOCK_WAIT_MS", 200)
    async with tenant_tx(db, shop.tenant.as_tenant()) as running:
        await running.execute("LOCK TABLE rfm_runs IN EXCLUSIVE MODE")
        busy = await api.post(RECOMPUTE, headers=bearer(shop.secret_key))
        # Reading the report is not blocked by a computation.
        assert (await get_report(api, shop.secret_key))["computed_at"] is None
    assert busy.status_code == 409, busy.text
    assert busy.json()["type"] == "/problems/conflict"
    assert busy.headers["Retry-After"] == "60"
    assert (await post_recompute(api, shop.secret_key))["customers"] == 10


async def test_a_merge_or_a_new_buyer_triggers_a_computation(
    api: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    await seed(api, shop)
    first = await post_recompute(api, shop.secret_key)

    # "lost" is folded into "champ": one buyer fewer, and the absorbed profile loses its scores.
    merged = await api.post(
        "/v1/customers/champ/merge", json={"customer_id": "lost"}, headers=bearer(shop.secret_key)
    )
    assert merged.status_code == 200, merged.text
    after_merge = await post_recompute(api, shop.secret_key)
    assert after_merge["computed_at"] > first["computed_at"]
    assert after_merge["customers"] == 9
    assert {"from": "lost", "to": None, "customers": 1} in after_merge["movement"]
    assert sum(m["customers"] for m in after_merge["movement"]) == 10
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        leftovers = await conn.fetchval(
            "SELECT count(*) FROM customers WHERE merged_into IS NOT NULL"
            " AND (rfm_segment IS NOT NULL OR rfm_recency IS NOT NULL)"
        )
    assert leftovers == 0

    # The browser's first purchase: a buyer without scores, so the next request computes.
    await send(api, shop.secret_key, order_touch("first", "browser", "purchase", 1, 100, "EUR"))
    third = await post_recompute(api, shop.secret_key)
    assert third["customers"] == 10
    assert {"from": None, "to": "new", "customers": 1} in third["movement"]
    browser = (await api.get("/v1/customers/browser", headers=bearer(shop.secret_key))).json()
    assert browser["rfm"]["segment"] == "new"


# --- settings -----------------------------------------------------------------------------------


async def test_settings_change_the_next_computation(
    api: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    await seed(api, shop)
    writer = await restricted_key(api, shop, "config:write")

    defaults = await api.get(CONFIG, headers=bearer(shop.secret_key))
    assert defaults.json() == {
        "object": "rfm_settings",
        "window_days": 365,
        "currency": None,
        "is_default": True,
        "updated_at": None,
        "updated_by": None,
    }
    first = await post_recompute(api, shop.secret_key)

    # Monetary in USD: only "potential" spent any; segments follow R and F, so they stay.
    saved = await api.put(CONFIG, json={"currency": "USD"}, headers=bearer(writer))
    assert saved.status_code == 200, saved.text
    body = saved.json()
    assert (body["window_days"], body["currency"], body["is_default"]) == (365, "USD", False)
    assert body["updated_by"].startswith("key:") and body["updated_at"]
    assert (await api.get(CONFIG, headers=bearer(shop.secret_key))).json() == body
    assert await get_report(api, shop.secret_key) == first, "saving settings rescored nobody"

    usd = await post_recompute(api, shop.secret_key)
    assert usd["currency"] == "USD"
    scores = await stored_scores(db, shop)
    assert {c: s[2] for c, s in scores.items() if s[2] is not None} == {
        **dict.fromkeys(FIRST, 1),
        "potential": 5,
    }
    assert {c: s[3] for c, s in scores.items() if s[3]} == {c: e[3] for c, e in FIRST.items()}
    potential = next(s for s in usd["segments"] if s["segment"] == "potential_loyalists")
    assert (potential["revenue"], potential["revenue_share"]) == (9999, 1.0)

    # A 70-day window: orders in the last 70 days are champ 3 (50, 25, 5 days ago),
    # potential 2, promising 1, new 1, the rest 0 (positions 1-6: F 1; 7-8: F 4; 9-10: F 5).
    saved = await api.put(
        CONFIG, json={"window_days": 70, "currency": "USD"}, headers=bearer(writer)
    )
    assert saved.status_code == 200, saved.text
    narrow = await post_recompute(api, shop.secret_key)
    assert narrow["window_days"] == 70
    assert {s["segment"]: s["customers"] for s in narrow["segments"] if s["customers"]} == {
        "champions": 2,  # champ (5, 5), new (5, 4)
        "loyal": 2,  # promising (4, 4), potential (4, 5)
        "need_attention": 2,  # need, loyal (3, 1)
        "hibernating": 2,  # atrisk, hib (2, 1)
        "lost": 2,  # fading, lost (1, 1)
    }

    # Back to the defaults: the automatic currency is EUR again (the most revenue).
    reset = await api.put(CONFIG, json={}, headers=bearer(writer))
    assert reset.json()["window_days"] == 365 and reset.json()["currency"] is None
    back = await post_recompute(api, shop.secret_key)
    assert back["currency"] == "EUR"
    assert back["segments"] == first["segments"]
    assert await stored_scores(db, shop) == as_stored(FIRST)


@pytest.mark.parametrize(
    ("body", "path"),
    [
        pytest.param({"window_days": 0}, "$.window_days", id="window-zero"),
        pytest.param({"window_days": 3651}, "$.window_days", id="window-too-long"),
        pytest.param({"window_days": "30"}, "$.window_days", id="window-string"),
        pytest.param({"window_days": 30.5}, "$.window_days", id="window-fraction"),
        pytest.param({"currency": "eur"}, "$.currency", id="currency-lowercase"),
        pytest.param({"currency": "EURO"}, "$.currency", id="currency-four-letters"),
        pytest.param({"currency": 978}, "$.currency", id="currency-number"),
        pytest.param({"window_day": 30}, "$.window_day", id="unknown-field"),
        pytest.param([365], "$", id="not-an-object"),
    ],
)
async def test_bad_settings_are_a_422_naming_the_field(
    api: httpx.AsyncClient, provision: ProvisionFactory, body: Any, path: str
) -> None:
    shop = await provision()
    response = await api.put(CONFIG, json=body, headers=bearer(shop.secret_key))
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["type"] == "/problems/validation"
    assert [e["path"] for e in problem["errors"]] == [path]
    stored = await api.get(CONFIG, headers=bearer(shop.secret_key))
    assert stored.json()["is_default"] is True


async def test_settings_bounds_and_malformed_bodies(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    for days in (1, 3650):
        ok = await api.put(CONFIG, json={"window_days": days}, headers=bearer(shop.secret_key))
        assert ok.status_code == 200, ok.text
        assert ok.json()["window_days"] == days
    broken = await api.put(
        CONFIG,
        content=b'{"window_days": ',
        headers={**bearer(shop.secret_key), "Content-Type": "application/json"},
    )
    assert broken.status_code == 400, broken.text
    assert broken.json()["type"] == "/problems/malformed-body"


# --- credentials and shops ----------------------------------------------------------------------


async def test_scopes(api: httpx.AsyncClient, provision: ProvisionFactory) -> None:
    shop = await provision()
    reader = await restricted_key(api, shop, "analytics:read")
    writer = await restricted_key(api, shop, "config:write")
    customers = await restricted_key(api, shop, "customers:read")

    calls = {
        "report": ("GET", REPORT, None),
        "recompute": ("POST", RECOMPUTE, None),
        "settings": ("GET", CONFIG, None),
        "replace": ("PUT", CONFIG, {"window_days": 90}),
    }

    async def status(name: str, headers: dict[str, str]) -> int:
        method, url, body = calls[name]
        response = await api.request(method, url, json=body, headers=headers)
        if response.status_code in (401, 403):
            assert response.headers["content-type"].startswith("application/problem+json")
        return response.status_code

    for name in calls:
        assert await status(name, {}) == 401, name
        assert await status(name, bearer("sk_test_not_a_real_key")) == 401, name
        assert await status(name, bearer(shop.publishable_key)) == 403, name
        assert await status(name, bearer(customers)) == 403, name
    assert [await status(n, bearer(reader)) for n in calls] == [200, 403, 200, 403]
    assert [await status(n, bearer(writer)) for n in calls] == [403, 200, 403, 200]
    assert [await status(n, bearer(shop.secret_key)) for n in calls] == [200, 200, 200, 200]


async def test_two_shops_never_mix(
    api: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    a = await provision("RFM shop A")
    b = await provision("RFM shop B")
    await seed(api, a)
    # Shop B has a "champ" too, with an old single purchase, and one more recent buyer.
    await send(
        api,
        b.secret_key,
        order_touch("o0", "champ", "purchase", 300, 100, "GBP"),
        order_touch("o1", "other", "purchase", 10, 500, "GBP"),
        order_touch("o2", "other", "purchase", 9, 500, "GBP"),
    )

    a_report = await post_recompute(api, a.secret_key)
    assert a_report["customers"] == 10
    assert (await get_report(api, b.secret_key))["computed_at"] is None
    b_champ = (await api.get("/v1/customers/champ", headers=bearer(b.secret_key))).json()
    assert b_champ["rfm"] is None
    assert await stored_scores(db, b) == {"champ": (None,) * 4, "other": (None,) * 4}

    b_report = await post_recompute(api, b.secret_key)
    # Two buyers: ntile(5) gives 1 and 2 (fewer than five buyers cannot reach 5).
    assert (b_report["customers"], b_report["currency"]) == (2, "GBP")
    assert await stored_scores(db, b) == {
        "champ": (1, 1, 1, "lost"),
        "other": (2, 2, 2, "hibernating"),
    }
    assert await stored_scores(db, a) == as_stored(FIRST)
    assert await get_report(api, a.secret_key) == a_report
    a_champ = (await api.get("/v1/customers/champ", headers=bearer(a.secret_key))).json()
    assert a_champ["rfm"]["segment"] == "champions"
    assert (await api.get("/v1/customers/other", headers=bearer(a.secret_key))).status_code == 404


# --- the worker's chore -------------------------------------------------------------------------


async def test_the_worker_chore_computes_every_shop_and_then_skips(
    api: httpx.AsyncClient, provision: ProvisionFactory, db: Database
) -> None:
    shop = await provision()
    await seed(api, shop)
    changed = await recompute_rfm_all_shops(db)
    assert changed >= 10
    assert await stored_scores(db, shop) == as_stored(FIRST)
    async with tenant_tx(db, shop.tenant.as_tenant()) as conn:
        trigger = await conn.fetchval("SELECT trigger FROM rfm_runs ORDER BY id DESC LIMIT 1")
    assert trigger == "schedule"

    # A second pass finds nothing changed in this shop: no new run.
    await recompute_rfm_all_shops(db)
    assert await run_count(db, shop) == 1
