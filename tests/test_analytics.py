"""``/v1/analytics``: funnel, paths, attribution and stage flow, checked to the unit against a small
fixture computed by hand, ingested through the real API (so stages and transitions are the ones
ingest derives with the default rules); auth, validation, and two shops that never mix."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from litestar import Litestar

from api.analytics.routes import analytics_routes
from api.db import Database
from tests.conftest import ProvisionFactory, bearer, http_client, make_app
from tests.test_touchpoints import NOW, iso, send, touchpoint

FUNNEL = "/v1/analytics/funnel"
PATHS = "/v1/analytics/paths"
ATTRIBUTION = "/v1/analytics/attribution"
FLOW = "/v1/analytics/stages/flow"
ENDPOINTS = (FUNNEL, PATHS, ATTRIBUTION, FLOW)
HOUR = 3600

# Every fixture time is ``T0`` plus some hours: T0 is a midnight 40 days ago, so no purchase is
# old enough to drift (90 days) and nothing is in the future.
T0 = (NOW - timedelta(days=40)).replace(hour=0, minute=0, second=0)
PERIOD = {"from": iso(T0), "to": iso(T0 + timedelta(days=30))}


def at(hours: float) -> str:
    return iso(T0 + timedelta(hours=hours))


def tp(
    event_id: str,
    customer: str,
    hours: float,
    type: str = "page_view",
    channel: str = "web",
    campaign: str | None = None,
    amount: int | None = None,
    currency: str = "EUR",
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "customer_id": customer,
        "anonymous_id": None,
        "type": type,
        "channel": channel,
        "occurred_at": at(hours),
    }
    if campaign is not None:
        fields["context"] = {"utm_campaign": campaign}
    if amount is not None:
        fields["order"] = {"order_id": f"order-{event_id}", "amount": amount, "currency": currency}
    return touchpoint(event_id, **fields)


# The fixture: eight customers, channels web and email (plus one store purchase), campaigns
# spring and summer. Stages by the default rules: consideration on product_view, search,
# add_to_cart, email_click...; acquisition on the first order; service on the second; advocacy
# on a review after an order. Each touchpoint is sent alone, in time order, so every transition
# is dated at the touchpoint that caused it.
#
#   who  hour  type           channel  campaign  order          stage after
#   ann     0  page_view      web      spring                   awareness
#   ann    24  email_click    email    summer                   consideration
#   ann    48  purchase       web                 10000 EUR     acquisition
#   ann    72  review_written web                               advocacy
#   bob    10  page_view      email    summer                   awareness
#   bob    12  product_view   web                               consideration
#   bob    20  add_to_cart    web
#   bob    34  purchase       web                  5000 EUR     acquisition
#   bob    80  email_click    email    summer
#   bob   100  purchase       web                  7000 EUR     service
#   cid     5  page_view      web      spring                   awareness
#   cid     6  search         web                               consideration
#   dee    30  purchase       store                2000 EUR     acquisition (from awareness)
#   eve    40  email_open     email    spring                   awareness
#   fay  -120  email_open     email                             awareness (first seen before T0)
#   fay    50  purchase       web                  3000 USD     acquisition
#   gus    60  page_view      web      spring                   awareness
#   gus    61  email_open     email
#   gus    62  page_view      web
#   gus    63  email_open     email
#   gus    64  page_view      web
#   gus    65  page_view      web
#   gus    66  email_open     email
#   gus    70  purchase       web                  6000 EUR     acquisition
#   hal    90  email_open     email    summer                   awareness
#   hal    91  purchase       web                  1000 EUR     acquisition
#
# Acquisition channels (first touchpoint): web: ann, cid, gus; email: bob, eve, fay, hal;
# store: dee.
FIXTURE: list[dict[str, Any]] = [
    tp("ann-1", "ann", 0, campaign="spring"),
    tp("ann-2", "ann", 24, "email_click", "email", "summer"),
    tp("ann-3", "ann", 48, "purchase", amount=10000),
    tp("ann-4", "ann", 72, "review_written"),
    tp("bob-1", "bob", 10, channel="email", campaign="summer"),
    tp("bob-2", "bob", 12, "product_view"),
    tp("bob-3", "bob", 20, "add_to_cart"),
    tp("bob-4", "bob", 34, "purchase", amount=5000),
    tp("bob-5", "bob", 80, "email_click", "email", "summer"),
    tp("bob-6", "bob", 100, "purchase", amount=7000),
    tp("cid-1", "cid", 5, campaign="spring"),
    tp("cid-2", "cid", 6, "search"),
    tp("dee-1", "dee", 30, "purchase", "store", amount=2000),
    tp("eve-1", "eve", 40, "email_open", "email", "spring"),
    tp("fay-1", "fay", -120, "email_open", "email"),
    tp("fay-2", "fay", 50, "purchase", amount=3000, currency="USD"),
    tp("gus-1", "gus", 60, campaign="spring"),
    tp("gus-2", "gus", 61, "email_open", "email"),
    tp("gus-3", "gus", 62),
    tp("gus-4", "gus", 63, "email_open", "email"),
    tp("gus-5", "gus", 64),
    tp("gus-6", "gus", 65),
    tp("gus-7", "gus", 66, "email_open", "email"),
    tp("gus-8", "gus", 70, "purchase", amount=6000),
    tp("hal-1", "hal", 90, "email_open", "email", "summer"),
    tp("hal-2", "hal", 91, "purchase", amount=1000),
]


async def seed(api: httpx.AsyncClient, key: str, items: list[dict[str, Any]]) -> None:
    for item in items:
        body = await send(api, key, item)
        assert body["accepted"] == 1, body


# --- the app with this package's routes ---------------------------------------------------------


@pytest.fixture(scope="module")
def analytics_app(db: Database) -> Litestar:
    """The app with the analytics routes, whether or not ``create_app`` registers them."""
    app = make_app(db)
    if FUNNEL not in {route.path for route in app.routes}:
        for handler in analytics_routes:
            app.register(handler)
    return app


@pytest.fixture
async def api(analytics_app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(analytics_app) as client:
        yield client


async def get(api: httpx.AsyncClient, key: str, path: str, **params: Any) -> dict[str, Any]:
    response = await api.get(path, params={**PERIOD, **params}, headers=bearer(key))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
async def shop_key(api: httpx.AsyncClient, provision: ProvisionFactory) -> str:
    shop = await provision()
    await seed(api, shop.secret_key, FIXTURE)
    return shop.secret_key


# --- expected figures, by hand ------------------------------------------------------------------

STAGES = ("awareness", "consideration", "acquisition", "service", "loyalty", "advocacy")


def funnel_group(
    channel: str | None,
    reached: tuple[int, ...],
    rates: tuple[float | None, ...],
    hours: tuple[tuple[float, float] | None, ...],
) -> dict[str, Any]:
    """A funnel group; ``hours`` gives (median, p75) per step in hours (None: no conversions)."""
    seconds = [
        (None, None) if h is None else (round(h[0] * HOUR), round(h[1] * HOUR)) for h in hours
    ]
    return {
        "acquisition_channel": channel,
        "customers": reached[0],
        "reached": dict(zip(STAGES, reached, strict=True)),
        "steps": [
            {
                "from_stage": STAGES[k],
                "to_stage": STAGES[k + 1],
                "reached_from": reached[k],
                "reached_to": reached[k + 1],
                "conversion_rate": rates[k],
                "median_seconds": seconds[k][0],
                "p75_seconds": seconds[k][1],
            }
            for k in range(5)
        ],
    }


# The cohort: customers first seen in the period, all but fay (first seen at -120). Furthest
# stage: ann advocacy (6), bob service (4), cid consideration (2), dee, gus, hal acquisition
# (3), eve awareness (1). Reaching a stage counts for every stage before it.
#   total  reached: 7, 6 (not eve), 5 (ann bob dee gus hal), 2 (ann bob), 1 (ann), 1 (ann)
#          rates 6/7 = 0.8571, 5/6 = 0.8333, 2/5 = 0.4, 1/2 = 0.5, 1/1 = 1.0
# Times reached (hours): awareness = first seen; a stage = the earliest transition into it or
# a later stage. ann 0, 24, 48, 72 (advocacy, so service and loyalty too), 72, 72;
# bob 10, 12, 34, 100; cid 5, 6; dee 30, 30, 30; eve 40; gus 60, 70, 70; hal 90, 91, 91.
# Steps (hours) and percentile_cont (position p * (n - 1) into the sorted values):
#   awareness->consideration: ann 24, bob 2, cid 1, dee 0, gus 10, hal 1 -> [0 1 1 2 10 24]
#       median at 2.5: 1.5; p75 at 3.75: 2 + 0.75 * 8 = 8
#   consideration->acquisition: ann 24, bob 22, dee 0, gus 0, hal 0 -> [0 0 0 22 24]
#       median at 2: 0; p75 at 3: 22
#   acquisition->service: ann 24, bob 66 -> median 45, p75 at 0.75: 24 + 0.75 * 42 = 55.5
#   service->loyalty, loyalty->advocacy: ann 0
TOTAL = funnel_group(
    None,
    (7, 6, 5, 2, 1, 1),
    (0.8571, 0.8333, 0.4, 0.5, 1.0),
    ((1.5, 8), (0, 22), (45, 55.5), (0, 0), (0, 0)),
)
# email: bob, eve, hal. reached 3, 2 (bob hal), 2, 1 (bob), 0, 0.
#   aw->cons: bob 2, hal 1 -> median 1.5, p75 1 + 0.75 = 1.75
#   cons->acq: bob 22, hal 0 -> median 11, p75 16.5; acq->service: bob 66
EMAIL = funnel_group(
    "email",
    (3, 2, 2, 1, 0, 0),
    (0.6667, 1.0, 0.5, 0.0, None),
    ((1.5, 1.75), (11, 16.5), (66, 66), None, None),
)
# web: ann, cid, gus. reached 3, 3, 2 (ann gus), 1 (ann), 1, 1.
#   aw->cons: ann 24, cid 1, gus 10 -> [1 10 24] median 10, p75 at 1.5: 10 + 0.5 * 14 = 17
#   cons->acq: ann 24, gus 0 -> median 12, p75 18; acq->service: ann 24; then ann 0, 0
WEB = funnel_group(
    "web",
    (3, 3, 2, 1, 1, 1),
    (1.0, 0.6667, 0.5, 1.0, 1.0),
    ((10, 17), (12, 18), (24, 24), (0, 0), (0, 0)),
)
# store: dee, straight from awareness to acquisition at her first touchpoint: 0 seconds.
STORE = funnel_group(
    "store",
    (1, 1, 1, 0, 0, 0),
    (1.0, 1.0, 0.0, None, None),
    ((0, 0), (0, 0), None, None, None),
)


def bucket(low: int, high: int | None, customers: int = 0) -> dict[str, Any]:
    return {"min": low, "max": high, "customers": customers}


# Buyers whose first purchase is in the period: ann (48), bob (34), dee (30), fay (50), gus (70),
# hal (91). Not cid or eve (never bought).
# Touchpoints strictly before it: ann 2, bob 3, dee 0, fay 1, gus 7, hal 1
#   -> sorted [0 1 1 2 3 7], median 1.5; buckets 0: dee, 1: fay hal, 2: ann, 3: bob, 5-9: gus.
# Days from first seen: ann 48 h -> 2, bob 24 h -> 1, dee 0, fay 170 h -> 7, gus 10 h -> 0,
# hal 1 h -> 0 -> sorted [0 0 0 1 2 7], median 0.5; buckets 0: 3, 1-6: 2, 7-13: 1.
# Sequences (repeats collapsed, last 5): ann web email; bob email web (web web collapsed);
# dee (none); fay email; gus web email web email web email -> email web email web email;
# hal email. So [email] twice, the rest once, ties by the sequence ([] first, prefixes first).
PATHS_EXPECTED: dict[str, Any] = {
    "object": "analytics_paths",
    "channel": None,
    "customers": 6,
    "touchpoints_before_purchase": {
        "median": 1.5,
        "buckets": [
            bucket(0, 0, 1),
            bucket(1, 1, 2),
            bucket(2, 2, 1),
            bucket(3, 3, 1),
            bucket(4, 4),
            bucket(5, 9, 1),
            bucket(10, 19),
            bucket(20, None),
        ],
    },
    "days_to_purchase": {
        "median": 0.5,
        "buckets": [
            bucket(0, 0, 3),
            bucket(1, 6, 2),
            bucket(7, 13, 1),
            bucket(14, 29),
            bucket(30, 59),
            bucket(60, 89),
            bucket(90, 179),
            bucket(180, None),
        ],
    },
    "top_sequences": [
        {"channels": ["email"], "customers": 2},
        {"channels": [], "customers": 1},
        {"channels": ["email", "web"], "customers": 1},
        {"channels": ["email", "web", "email", "web", "email"], "customers": 1},
        {"channels": ["web", "email"], "customers": 1},
    ],
}


def credit(purchases: float, **revenue: int) -> dict[str, Any]:
    return {"purchases": purchases, "revenue": revenue}


def row(key: str, value: str, first: Any, last: Any, linear: Any, position: Any) -> Any:
    return {
        key: value,
        "first_touch": first,
        "last_touch": last,
        "linear": linear,
        "position_based": position,
    }


# Purchases in the period (7): ann 10000 EUR, bob 5000 (b1) and 7000 (b2) EUR, dee 2000 EUR,
# fay 3000 USD, gus 6000 EUR, hal 1000 EUR: 31000 EUR and 3000 USD.
# Touches in the 30 days before each (purchases left out), oldest first:
#   ann: web/spring, email/summer                                        n = 2
#   b1:  email/summer, web, web                                          n = 3
#   b2:  email/summer, web, web, email/summer (bob's first purchase left out)  n = 4
#   dee: none: credited to her own channel store and campaign (none)    n = 0
#   fay: email (170 hours before: inside 30 days)                        n = 1
#   gus: web/spring, email, web, email, web, web, email                  n = 7
#   hal: email/summer                                                    n = 1
# Position-based weights: n = 2: .5 .5; n = 3: .4 .2 .4; n = 4: .4 .1 .1 .4;
# n = 7: .4, five times .04, .4.
#
# By channel
#   first:  web ann 10000 + gus 6000 = 16000 (2); email b1 5000 + b2 7000 + hal 1000 = 13000
#           and fay 3000 USD (4); store dee 2000 (1)
#   last:   email ann 10000 + b2 7000 + gus 6000 + hal 1000 = 24000, fay USD (5); web b1 5000
#           (1); store 2000 (1)
#   linear: email: ann 1/2 (5000), b1 1/3 (5000/3), b2 2/4 (3500), fay 1, gus 3/7 (18000/7),
#           hal 1 (1000): 3.761905 purchases, 13738.095 EUR, 3000 USD;
#           web: ann 1/2, b1 2/3 (10000/3), b2 2/4, gus 4/7 (24000/7): 2.238095, 15261.905 EUR;
#           store 1, 2000. Rounded down 13738 + 15261 + 2000 = 30999: the one unit left goes to
#           the largest remainder, web (.905): 15262.
#   position: email: ann .5 (5000), b1 .4 (2000), b2 .8 (5600), fay 1, gus .48 (2880), hal 1
#           (1000): 4.18, 16480 EUR, 3000 USD; web: ann .5, b1 .6 (3000), b2 .2 (1400), gus .52
#           (3120): 1.82, 12520 EUR; store 1, 2000.
BY_CHANNEL = [
    row(
        "channel",
        "email",
        credit(4.0, EUR=13000, USD=3000),
        credit(5.0, EUR=24000, USD=3000),
        credit(3.7619, EUR=13738, USD=3000),
        credit(4.18, EUR=16480, USD=3000),
    ),
    row(
        "channel",
        "store",
        credit(1.0, EUR=2000),
        credit(1.0, EUR=2000),
        credit(1.0, EUR=2000),
        credit(1.0, EUR=2000),
    ),
    row(
        "channel",
        "web",
        credit(2.0, EUR=16000),
        credit(1.0, EUR=5000),
        credit(2.2381, EUR=15262),
        credit(1.82, EUR=12520),
    ),
]
# By campaign (touches without one, and dee's purchase: "(none)")
#   first:  spring ann 10000 + gus 6000 (2); summer b1 5000 + b2 7000 + hal 1000 (3);
#           (none) dee 2000, fay 3000 USD (2)
#   last:   summer ann 10000 + b2 7000 + hal 1000 (3); (none) b1 5000 + dee 2000 + gus 6000,
#           fay USD (4); spring nothing (but a row, for its other credits)
#   linear: spring ann 1/2 (5000) + gus 1/7 (6000/7): 0.642857, 5857.143;
#           summer ann 1/2 (5000) + b1 1/3 (5000/3) + b2 2/4 (3500) + hal 1 (1000): 2.333333,
#           11166.667; (none) b1 2/3 (10000/3) + b2 2/4 (3500) + dee 1 (2000) + fay 1 + gus
#           6/7 (36000/7): 4.023810, 13976.190 EUR, 3000 USD. Rounded down 5857 + 11166 + 13976
#           = 30999: the unit left goes to summer (.667): 11167.
#   position: spring ann .5 (5000) + gus .4 (2400): 0.9, 7400; summer ann .5 (5000) + b1 .4
#           (2000) + b2 .8 (5600) + hal 1 (1000): 2.7, 13600; (none) b1 .6 (3000) + b2 .2
#           (1400) + dee 1 (2000) + fay 1 + gus .6 (3600): 3.4, 10000 EUR, 3000 USD.
BY_CAMPAIGN = [
    row(
        "utm_campaign",
        "(none)",
        credit(2.0, EUR=2000, USD=3000),
        credit(4.0, EUR=13000, USD=3000),
        credit(4.0238, EUR=13976, USD=3000),
        credit(3.4, EUR=10000, USD=3000),
    ),
    row(
        "utm_campaign",
        "spring",
        credit(2.0, EUR=16000),
        credit(0.0, EUR=0),
        credit(0.6429, EUR=5857),
        credit(0.9, EUR=7400),
    ),
    row(
        "utm_campaign",
        "summer",
        credit(3.0, EUR=13000),
        credit(3.0, EUR=18000),
        credit(2.3333, EUR=11167),
        credit(2.7, EUR=13600),
    ),
]

# Transitions in the period: ann aw->cons (24), cons->acq (48), acq->advocacy (72); bob aw->cons
# (12), cons->acq (34), acq->service (100); cid aw->cons (6); dee aw->acq (30); fay aw->acq
# (50); gus aw->acq (70); hal aw->acq (91): 11 transitions by 7 customers (eve never moved).
FLOW_LINKS = [
    {"from_stage": "awareness", "to_stage": "consideration", "transitions": 3, "customers": 3},
    {"from_stage": "awareness", "to_stage": "acquisition", "transitions": 4, "customers": 4},
    {"from_stage": "consideration", "to_stage": "acquisition", "transitions": 2, "customers": 2},
    {"from_stage": "acquisition", "to_stage": "service", "transitions": 1, "customers": 1},
    {"from_stage": "acquisition", "to_stage": "advocacy", "transitions": 1, "customers": 1},
]


# --- the figures --------------------------------------------------------------------------------


async def test_funnel(api: httpx.AsyncClient, shop_key: str) -> None:
    body = await get(api, shop_key, FUNNEL)
    assert body == {
        "object": "analytics_funnel",
        "from": PERIOD["from"],
        "to": PERIOD["to"],
        "channel": None,
        "total": TOTAL,
        # Most customers first, then by name.
        "by_channel": [EMAIL, WEB, STORE],
    }


async def test_funnel_of_one_acquisition_channel(api: httpx.AsyncClient, shop_key: str) -> None:
    body = await get(api, shop_key, FUNNEL, channel="email")
    assert body["channel"] == "email"
    assert body["by_channel"] == [EMAIL]
    assert body["total"] == {**EMAIL, "acquisition_channel": None}


async def test_funnel_cohort_is_who_was_first_seen_in_the_period(
    api: httpx.AsyncClient, shop_key: str
) -> None:
    # From hour 50: gus (60), hal (90) only. Both bought (acquisition).
    #   aw->cons: gus 10, hal 1 -> median 5.5, p75 1 + .75 * 9 = 7.75; cons->acq: 0, 0
    body = await get(api, shop_key, FUNNEL, **{"from": at(50)})
    assert body["total"] == funnel_group(
        None,
        (2, 2, 2, 0, 0, 0),
        (1.0, 1.0, 0.0, None, None),
        ((5.5, 7.75), (0, 0), None, None, None),
    )
    # `to` is exclusive: a period ending at hour 60 leaves gus out.
    body = await get(api, shop_key, FUNNEL, **{"from": at(50), "to": at(60)})
    assert body["total"]["customers"] == 0
    assert body["by_channel"] == []


async def test_paths(api: httpx.AsyncClient, shop_key: str) -> None:
    body = await get(api, shop_key, PATHS)
    assert body == {**PATHS_EXPECTED, "from": PERIOD["from"], "to": PERIOD["to"]}


async def test_paths_limit_and_channel(api: httpx.AsyncClient, shop_key: str) -> None:
    body = await get(api, shop_key, PATHS, limit=2)
    assert body["top_sequences"] == PATHS_EXPECTED["top_sequences"][:2]
    # Acquired on web: ann (2 touchpoints, 2 days, web email) and gus (7, 0 days).
    body = await get(api, shop_key, PATHS, channel="web")
    assert body["customers"] == 2
    assert body["touchpoints_before_purchase"]["median"] == 4.5
    assert body["days_to_purchase"]["median"] == 1.0
    assert body["top_sequences"] == [
        {"channels": ["email", "web", "email", "web", "email"], "customers": 1},
        {"channels": ["web", "email"], "customers": 1},
    ]


async def test_paths_count_only_the_first_purchase(api: httpx.AsyncClient, shop_key: str) -> None:
    # From hour 95: bob's second purchase (100) is not a first purchase; nobody else buys.
    body = await get(api, shop_key, PATHS, **{"from": at(95)})
    assert body["customers"] == 0
    assert body["touchpoints_before_purchase"]["median"] is None
    assert body["top_sequences"] == []


async def test_attribution(api: httpx.AsyncClient, shop_key: str) -> None:
    body = await get(api, shop_key, ATTRIBUTION)
    assert body == {
        "object": "analytics_attribution",
        "from": PERIOD["from"],
        "to": PERIOD["to"],
        "channel": None,
        "lookback_days": 30,
        "purchases": 7,
        "purchases_without_prior_touch": 1,
        "revenue": {"EUR": 31000, "USD": 3000},
        "by_channel": BY_CHANNEL,
        "by_utm_campaign": BY_CAMPAIGN,
    }
    # Every model's rows add up to the revenue, to the unit.
    for model in ("first_touch", "last_touch", "linear", "position_based"):
        for rows in (body["by_channel"], body["by_utm_campaign"]):
            assert sum(r[model]["revenue"].get("EUR", 0) for r in rows) == 31000
            assert sum(r[model]["revenue"].get("USD", 0) for r in rows) == 3000


async def test_attribution_look_back_window(api: httpx.AsyncClient, shop_key: str) -> None:
    # 7 days: fay's only touch (170 hours = 7.08 days before her purchase) falls out, so her
    # purchase is credited to its own channel, web, in every model. Everyone else's touches are
    # at most 90 hours (bob) before their purchase.
    body = await get(api, shop_key, ATTRIBUTION, lookback_days=7)
    assert body["lookback_days"] == 7
    assert body["purchases_without_prior_touch"] == 2
    email, store, web = body["by_channel"]
    assert email == row(
        "channel",
        "email",
        credit(3.0, EUR=13000),
        credit(4.0, EUR=24000),
        credit(2.7619, EUR=13738),
        credit(3.18, EUR=16480),
    )
    assert store == BY_CHANNEL[1]
    assert web == row(
        "channel",
        "web",
        credit(3.0, EUR=16000, USD=3000),
        credit(2.0, EUR=5000, USD=3000),
        credit(3.2381, EUR=15262, USD=3000),
        credit(2.82, EUR=12520, USD=3000),
    )
    # fay's purchase has no campaign either way.
    assert body["by_utm_campaign"] == BY_CAMPAIGN


async def test_attribution_of_one_acquisition_channel(
    api: httpx.AsyncClient, shop_key: str
) -> None:
    # Acquired on email: bob (b1, b2), fay, hal; eve never bought.
    body = await get(api, shop_key, ATTRIBUTION, channel="email")
    assert (body["purchases"], body["purchases_without_prior_touch"]) == (4, 0)
    assert body["revenue"] == {"EUR": 13000, "USD": 3000}
    # Linear: b1 email 1/3 (5000/3), web 2/3 (10000/3); b2 email 1/2, web 1/2 (3500 each);
    # fay email 1; hal email 1 (1000). email 2.833333, 6166.667 EUR; web 1.166667, 6833.333.
    # Rounded down 6166 + 6833 = 12999: the unit goes to email (.667).
    email, web = body["by_channel"]
    assert email["linear"] == credit(2.8333, EUR=6167, USD=3000)
    assert web["linear"] == credit(1.1667, EUR=6833)


async def test_a_purchase_without_touches_is_credited_to_its_own_channel_and_campaign(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    await seed(
        api,
        shop.secret_key,
        [tp("solo-1", "solo", 10, "purchase", "store", "flyer", amount=4200)],
    )
    body = await get(api, shop.secret_key, ATTRIBUTION)
    assert (body["purchases"], body["purchases_without_prior_touch"]) == (1, 1)
    whole = credit(1.0, EUR=4200)
    assert body["by_channel"] == [row("channel", "store", whole, whole, whole, whole)]
    assert body["by_utm_campaign"] == [row("utm_campaign", "flyer", whole, whole, whole, whole)]


async def test_attribution_window_edges_and_order(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    # One customer, a look-back of 1 day (24 hours), two purchases:
    #   hour  23.5 email_open  ads     x
    #   hour  24   page_view   web     -
    #   hour  26   purchase q  web               2000 EUR
    #   hour  30   email_click email   a     } the same instant: stored order decides
    #   hour  30   page_view   social  b     }
    #   hour  48   purchase p  web               1000 EUR
    #   hour  48   page_view   mobile_app z   (not before p: no touch of p)
    # q [2, 26): the ads touch and the web one, n = 2. p [24, 48): web (at exactly 24 hours
    # before, so in), email, social (the later stored of the two at hour 30, so last), n = 3;
    # q itself is a purchase, so no touch of p.
    # Linear: ads 1000, web 1000 + 333.33, email 333.33, social 333.33: 2999 whole units, the
    # one left goes to the first of the equal remainders by name (email; for campaigns,
    # "(none)"). Position: q 50/50; p web 40%, email 20%, social 40%.
    shop = await provision()
    await seed(
        api,
        shop.secret_key,
        [
            tp("ivy-1", "ivy", 23.5, "email_open", "ads", "x"),
            tp("ivy-2", "ivy", 24),
            tp("ivy-3", "ivy", 26, "purchase", amount=2000),
            tp("ivy-4", "ivy", 30, "email_click", "email", "a"),
            tp("ivy-5", "ivy", 30, channel="social", campaign="b"),
            tp("ivy-6", "ivy", 48, "purchase", amount=1000),
            tp("ivy-7", "ivy", 48, channel="mobile_app", campaign="z"),
        ],
    )
    body = await get(api, shop.secret_key, ATTRIBUTION, lookback_days=1)
    assert (body["purchases"], body["purchases_without_prior_touch"]) == (2, 0)
    assert body["revenue"] == {"EUR": 3000}
    none = credit(0.0, EUR=0)
    assert body["by_channel"] == [
        row(
            "channel",
            "ads",
            credit(1.0, EUR=2000),
            none,
            credit(0.5, EUR=1000),
            credit(0.5, EUR=1000),
        ),
        row("channel", "email", none, none, credit(0.3333, EUR=334), credit(0.2, EUR=200)),
        row(
            "channel",
            "social",
            none,
            credit(1.0, EUR=1000),
            credit(0.3333, EUR=333),
            credit(0.4, EUR=400),
        ),
        row(
            "channel",
            "web",
            credit(1.0, EUR=1000),
            credit(1.0, EUR=2000),
            credit(0.8333, EUR=1333),
            credit(0.9, EUR=1400),
        ),
    ]
    assert body["by_utm_campaign"] == [
        row(
            "utm_campaign",
            "(none)",
            credit(1.0, EUR=1000),
            credit(1.0, EUR=2000),
            credit(0.8333, EUR=1334),
            credit(0.9, EUR=1400),
        ),
        row("utm_campaign", "a", none, none, credit(0.3333, EUR=333), credit(0.2, EUR=200)),
        row(
            "utm_campaign",
            "b",
            none,
            credit(1.0, EUR=1000),
            credit(0.3333, EUR=333),
            credit(0.4, EUR=400),
        ),
        row(
            "utm_campaign",
            "x",
            credit(1.0, EUR=2000),
            none,
            credit(0.5, EUR=1000),
            credit(0.5, EUR=1000),
        ),
    ]


async def test_stage_flow(api: httpx.AsyncClient, shop_key: str) -> None:
    body = await get(api, shop_key, FLOW)
    assert body == {
        "object": "analytics_stage_flow",
        "from": PERIOD["from"],
        "to": PERIOD["to"],
        "channel": None,
        "cause": None,
        "transitions": 11,
        "customers": 7,
        "links": FLOW_LINKS,
    }
    everything = await get(api, shop_key, FLOW, cause="touchpoint")
    assert everything["links"] == FLOW_LINKS
    nothing = await get(api, shop_key, FLOW, cause="manual")
    assert (nothing["transitions"], nothing["customers"], nothing["links"]) == (0, 0, [])


async def test_stage_flow_period_and_channel(api: httpx.AsyncClient, shop_key: str) -> None:
    # [30, 70): dee aw->acq at 30 (from is inclusive), bob cons->acq 34, ann cons->acq 48, fay
    # aw->acq 50; gus's at 70 is out (to is exclusive).
    body = await get(api, shop_key, FLOW, **{"from": at(30), "to": at(70)})
    assert (body["transitions"], body["customers"]) == (4, 4)
    assert body["links"] == [
        {"from_stage": "awareness", "to_stage": "acquisition", "transitions": 2, "customers": 2},
        {
            "from_stage": "consideration",
            "to_stage": "acquisition",
            "transitions": 2,
            "customers": 2,
        },
    ]
    # Acquired on web: ann (aw->cons, cons->acq, acq->adv), cid (aw->cons), gus (aw->acq).
    body = await get(api, shop_key, FLOW, channel="web")
    assert (body["transitions"], body["customers"]) == (5, 3)
    assert body["links"] == [
        {"from_stage": "awareness", "to_stage": "consideration", "transitions": 2, "customers": 2},
        {"from_stage": "awareness", "to_stage": "acquisition", "transitions": 1, "customers": 1},
        {
            "from_stage": "consideration",
            "to_stage": "acquisition",
            "transitions": 1,
            "customers": 1,
        },
        {"from_stage": "acquisition", "to_stage": "advocacy", "transitions": 1, "customers": 1},
    ]
    both = await get(api, shop_key, FLOW, channel="web", cause="touchpoint")
    assert both["links"] == body["links"]
    assert (await get(api, shop_key, FLOW, channel="web", cause="drift"))["links"] == []


async def test_an_empty_shop_has_zeros(api: httpx.AsyncClient, provision: ProvisionFactory) -> None:
    shop = await provision()
    funnel = await get(api, shop.secret_key, FUNNEL)
    assert funnel["total"] == funnel_group(None, (0,) * 6, (None,) * 5, (None,) * 5)
    assert funnel["by_channel"] == []
    paths = await get(api, shop.secret_key, PATHS)
    assert paths["customers"] == 0
    assert all(b["customers"] == 0 for b in paths["days_to_purchase"]["buckets"])
    attribution = await get(api, shop.secret_key, ATTRIBUTION)
    assert (attribution["purchases"], attribution["revenue"], attribution["by_channel"]) == (
        0,
        {},
        [],
    )
    flow = await get(api, shop.secret_key, FLOW)
    assert (flow["transitions"], flow["links"]) == (0, [])


# --- two shops never mix ------------------------------------------------------------------------


async def test_two_shops_never_mix(
    api: httpx.AsyncClient, provision: ProvisionFactory, shop_key: str
) -> None:
    before = {path: await get(api, shop_key, path) for path in ENDPOINTS}
    # Another shop with the same customer ids and event ids, and other data: ann and bob buy at
    # once on ads, in another currency.
    other = await provision("Other shop")
    await seed(
        api,
        other.secret_key,
        [
            tp("ann-1", "ann", 1, channel="ads", campaign="autumn"),
            tp("ann-2", "ann", 2, "purchase", "ads", amount=99999, currency="GBP"),
            tp("bob-1", "bob", 3, "purchase", "ads", amount=11111, currency="GBP"),
        ],
    )
    after = {path: await get(api, shop_key, path) for path in ENDPOINTS}
    assert after == before
    assert before[FUNNEL]["total"] == TOTAL
    assert before[ATTRIBUTION]["revenue"] == {"EUR": 31000, "USD": 3000}

    # And the other shop sees only its own.
    funnel = await get(api, other.secret_key, FUNNEL)
    assert funnel["total"]["reached"] == {
        "awareness": 2,
        "consideration": 2,
        "acquisition": 2,
        "service": 0,
        "loyalty": 0,
        "advocacy": 0,
    }
    assert [g["acquisition_channel"] for g in funnel["by_channel"]] == ["ads"]
    attribution = await get(api, other.secret_key, ATTRIBUTION)
    assert attribution["revenue"] == {"GBP": 111110}
    assert attribution["by_channel"] == [
        row(
            "channel",
            "ads",
            credit(2.0, GBP=111110),
            credit(2.0, GBP=111110),
            credit(2.0, GBP=111110),
            credit(2.0, GBP=111110),
        )
    ]
    assert [r["utm_campaign"] for r in attribution["by_utm_campaign"]] == ["(none)", "autumn"]
    paths = await get(api, other.secret_key, PATHS)
    assert paths["top_sequences"] == [
        {"channels": [], "customers": 1},
        {"channels": ["ads"], "customers": 1},
    ]
    flow = await get(api, other.secret_key, FLOW)
    assert flow["links"] == [
        {"from_stage": "awareness", "to_stage": "acquisition", "transitions": 2, "customers": 2}
    ]


# --- auth and validation ------------------------------------------------------------------------


async def restricted_key(api: httpx.AsyncClient, secret: str, *scopes: str) -> str:
    response = await api.post(
        "/v1/api-keys",
        json={"kind": "restricted", "scopes": list(scopes)},
        headers=bearer(secret),
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_analytics_need_the_analytics_read_scope(
    api: httpx.AsyncClient, provision: ProvisionFactory, path: str
) -> None:
    shop = await provision()
    anonymous = await api.get(path)
    assert anonymous.status_code == 401
    assert anonymous.json()["type"] == "/problems/unauthenticated"

    without = await restricted_key(api, shop.secret_key, "customers:read", "touchpoints:write")
    refused = await api.get(path, headers=bearer(without))
    assert refused.status_code == 403
    assert refused.json()["type"] == "/problems/insufficient-scope"
    assert "analytics:read" in refused.json()["detail"]

    reader = await restricted_key(api, shop.secret_key, "analytics:read")
    allowed = await api.get(path, headers=bearer(reader))
    assert allowed.status_code == 200, allowed.text


async def test_the_period_defaults_to_the_last_90_days(
    api: httpx.AsyncClient, provision: ProvisionFactory
) -> None:
    shop = await provision()
    response = await api.get(FUNNEL, headers=bearer(shop.secret_key))
    body = response.json()
    start, end = (body["from"], body["to"])
    span = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    assert span == timedelta(days=90)
    assert abs(datetime.fromisoformat(end) - datetime.now(UTC)) < timedelta(minutes=1)
    # Only `to`: `from` is 90 days before it. Offsets are normalised to UTC.
    response = await api.get(
        FUNNEL, params={"to": "2025-03-31T02:00:00+02:00"}, headers=bearer(shop.secret_key)
    )
    assert (response.json()["from"], response.json()["to"]) == (
        "2024-12-31T00:00:00Z",
        "2025-03-31T00:00:00Z",
    )


@pytest.mark.parametrize(
    ("params", "paths"),
    [
        ({"from": "yesterday"}, ["query.from"]),
        ({"from": "2025-01-01"}, ["query.from"]),
        ({"to": "2025-01-01T00:00:00"}, ["query.to"]),
        ({"from": "soon", "to": "later"}, ["query.from", "query.to"]),
        ({"from": "2025-02-01T00:00:00Z", "to": "2025-02-01T00:00:00Z"}, ["query.to"]),
        ({"from": "2025-02-01T00:00:00Z", "to": "2025-01-01T00:00:00Z"}, ["query.to"]),
        ({"from": "2023-01-01T00:00:00Z", "to": "2025-01-01T00:00:00Z"}, ["query.from"]),
        ({"channel": "pigeon"}, ["query.channel"]),
    ],
)
@pytest.mark.parametrize("path", ENDPOINTS)
async def test_bad_filters_are_422s_naming_the_parameter(
    api: httpx.AsyncClient,
    provision: ProvisionFactory,
    path: str,
    params: dict[str, str],
    paths: list[str],
) -> None:
    shop = await provision()
    response = await api.get(path, params=params, headers=bearer(shop.secret_key))
    assert response.status_code == 422, response.text
    assert response.json()["type"] == "/problems/validation"
    assert [error["path"] for error in response.json()["errors"]] == paths


@pytest.mark.parametrize(
    ("path", "params", "name"),
    [
        (PATHS, {"limit": "0"}, "limit"),
        (PATHS, {"limit": "51"}, "limit"),
        (ATTRIBUTION, {"lookback_days": "0"}, "lookback_days"),
        (ATTRIBUTION, {"lookback_days": "366"}, "lookback_days"),
        (FLOW, {"cause": "magic"}, "cause"),
    ],
)
async def test_endpoint_parameters_are_validated(
    api: httpx.AsyncClient,
    provision: ProvisionFactory,
    path: str,
    params: dict[str, str],
    name: str,
) -> None:
    shop = await provision()
    response = await api.get(path, params=params, headers=bearer(shop.secret_key))
    assert response.status_code == 422, response.text
    assert [error["path"] for error in response.json()["errors"]] == [f"query.{name}"]


def test_the_spec_documents_the_definitions(analytics_app: Litestar) -> None:
    spec = analytics_app.openapi_schema.to_schema()
    operations = {path: spec["paths"][path]["get"] for path in ENDPOINTS}
    assert [op["operationId"] for op in operations.values()] == [
        "getFunnelAnalytics",
        "getPathAnalytics",
        "getAttributionAnalytics",
        "getStageFlowAnalytics",
    ]
    for operation in operations.values():
        assert {"from", "to", "channel"} <= {p["name"] for p in operation["parameters"]}
        assert "acquired on that channel" in operation["description"]
        assert {"401", "403", "422"} <= set(operation["responses"])
    assert "largest remainders" in operations[ATTRIBUTION]["description"]
    funnel = spec["components"]["schemas"]["Funnel"]
    assert "from" in funnel["properties"]
