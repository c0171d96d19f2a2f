"""Customer value: RFM scores and segments, computed per shop (``DOMAIN.md``, "Customer value").

What is scored
    Every unmerged profile (known or anonymous) with at least one purchase ever; every other
    profile has no scores (``rfm`` is ``null`` on the profile). Three numbers per buyer, as of a
    UTC day (``as_of``, today for real runs):

    - *recency*: whole UTC days from the last purchase (``customers.last_purchase_at``, any
      currency) to ``as_of``; a purchase dated ahead of ``as_of`` counts as 0 days.
    - *frequency*: purchase touchpoints that occurred in the window, in any currency.
    - *monetary*: purchases minus refunds that occurred in the window, in the shop's RFM currency
      only (other currencies are not converted), in minor units, floored at 0.

    The window is the last ``window_days`` UTC days, ``as_of`` included (``window_days`` 1 is
    ``as_of`` alone), per the shop's settings (default 365 days). The currency is the configured
    one, else the currency with the most revenue over the shop's profiles at the time of the run,
    else EUR.

How scores are made
    Each number is ranked within the shop with ``ntile(5)`` (5 the best: fewest days, most
    orders, highest spend). Ties share a score, the one ``ntile`` gives the first of them, so two
    customers with the same value never get different scores (with many one-time buyers they all
    get frequency 1, not 1 to 3 by id). Scores are relative: a new buyer can move the quintile
    boundaries for everyone. With fewer than five buyers the scores cannot reach 5 (``ntile``
    gives 1 to n).

    The segment comes from recency and frequency alone, by :data:`SEGMENT_RULES` (the common RFM
    grid; monetary is scored and reported but does not decide the segment). The whole
    computation (scores, segment, the customers it writes, the segment sizes and the movement
    since the previous run) is ONE statement over one snapshot.

What is incremental
    - A run is skipped, and the previous one stays in force, when nothing it depends on changed:
      the same ``as_of`` day (any day while the shop has no buyers), the same settings, no
      purchase or refund received since shortly before the previous run (:data:`SETTLE` covers
      ingest transactions still committing as it ran), the same number of scored profiles
      (merges and erasures lower it) and no buyer without scores (first purchases, merges that
      make a buyer). The check reads three small indexes.
    - A run writes only the profiles whose scores change (quintiles are stable from day to day
      for most customers), so ``customers.rfm_computed_at`` is when a customer's scores last
      changed, and the latest run says when they were confirmed.
    - Not incremental: when anything changed, every buyer is ranked again, because quintiles
      are relative to the whole shop; the purchases in the window are read from a covering
      partial index, not from the touchpoints themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, Literal

import asyncpg
import msgspec

from api.customers.schemas import RfmSegment
from api.db import Database, Tenant, TenantConn
from api.errors import Problem, exact_field, field_error
from api.tenants.fanout import in_every_shop

DEFAULT_WINDOW_DAYS = 365
MAX_WINDOW_DAYS = 3650
#: The currency when none is configured and the shop has no revenue yet.
DEFAULT_CURRENCY = "EUR"
#: Purchases received this long before a run may still have been committing while it ran; the
#: change check counts them again rather than trust the run saw them.
SETTLE = timedelta(minutes=5)
#: A computation ranks every buyer of the shop: more than a request's usual statement timeout.
RECOMPUTE_TIMEOUT_MS = 120_000
#: How long a request waits for a computation already running in the shop before a 409.
REQUEST_LOCK_WAIT_MS = 5_000

Trigger = Literal["schedule", "request"]
_FOUR_PLACES = Decimal("0.0001")


# --- segments -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentRule:
    """Recency and frequency scores in these inclusive ranges make ``segment``."""

    segment: RfmSegment
    recency: tuple[int, int]
    frequency: tuple[int, int]

    def matches(self, recency: int, frequency: int) -> bool:
        return (
            self.recency[0] <= recency <= self.recency[1]
            and self.frequency[0] <= frequency <= self.frequency[1]
        )


#: The segment of an (R, F) pair: the FIRST rule that matches. Every pair matches at least one
#: rule; only (1, 1) matches two (``lost`` before ``hibernating``). The grid (R down, F across):
#:
#: ====  ===========  ===========  ===========  =========  =========
#: R\\F  1            2            3            4          5
#: ====  ===========  ===========  ===========  =========  =========
#: 5     new          pot. loyal   pot. loyal   champions  champions
#: 4     promising    pot. loyal   pot. loyal   loyal      loyal
#: 3     need att.    need att.    need att.    loyal      loyal
#: 2     hibernating  hibernating  at risk      at risk    at risk
#: 1     lost         hibernating  at risk      at risk    at risk
#: ====  ===========  ===========  ===========  =========  =========
#:
#: This is the widely used R x F grid; its "about to sleep" (R 3, F 1-2) is folded into "need
#: attention" and its "can't lose them" (R 1-2, F 5) into "at risk", to keep the segments of
#: DOMAIN.md.
SEGMENT_RULES: tuple[SegmentRule, ...] = (
    SegmentRule("champions", recency=(5, 5), frequency=(4, 5)),
    SegmentRule("loyal", recency=(3, 4), frequency=(4, 5)),
    SegmentRule("potential_loyalists", recency=(4, 5), frequency=(2, 3)),
    SegmentRule("new", recency=(5, 5), frequency=(1, 1)),
    SegmentRule("promising", recency=(4, 4), frequency=(1, 1)),
    SegmentRule("need_attention", recency=(3, 3), frequency=(1, 3)),
    SegmentRule("at_risk", recency=(1, 2), frequency=(3, 5)),
    SegmentRule("lost", recency=(1, 1), frequency=(1, 1)),
    SegmentRule("hibernating", recency=(1, 2), frequency=(1, 2)),
)

#: The segments in report order, best first (as in DOMAIN.md).
SEGMENTS: tuple[RfmSegment, ...] = (
    "champions",
    "loyal",
    "potential_loyalists",
    "new",
    "promising",
    "need_attention",
    "at_risk",
    "hibernating",
    "lost",
)


def segment_for(recency: int, frequency: int) -> RfmSegment:
    """The segment of a recency and a frequency score (each 1 to 5)."""
    for rule in SEGMENT_RULES:
        if rule.matches(recency, frequency):
            return rule.segment
    raise ValueError(f"no RFM segment for recency {recency}, frequency {frequency}")


def segment_sql(recency: str, frequency: str) -> str:
    """:data:`SEGMENT_RULES` as a SQL ``CASE`` over two integer expressions."""
    branches = " ".join(
        f"WHEN {recency} BETWEEN {rule.recency[0]:d} AND {rule.recency[1]:d}"
        f" AND {frequency} BETWEEN {rule.frequency[0]:d} AND {rule.frequency[1]:d}"
        f" THEN '{rule.segment}'"
        for rule in SEGMENT_RULES
    )
    return f"CASE {branches} END"


# --- settings -----------------------------------------------------------------------------------

Currency = Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$", description="ISO 4217, e.g. EUR")]
WindowDays = Annotated[
    int,
    msgspec.Meta(
        ge=1, le=MAX_WINDOW_DAYS, description="Days of purchases counted, today included."
    ),
]


class RfmSettingsIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The shop's RFM settings, replaced whole: an absent field takes its default."""

    #: Frequency and monetary count the purchases of the last ``window_days`` UTC days.
    window_days: WindowDays = DEFAULT_WINDOW_DAYS
    #: The currency of monetary; ``null``: the currency with the most revenue in the shop at
    #: each computation (EUR while there is none).
    currency: Currency | None = None


class RfmSettings(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["rfm_settings"] = "rfm_settings"
    window_days: int
    #: The configured currency; ``null``: chosen at each computation (see ``currency`` of the
    #: report for the one the latest computation used).
    currency: str | None
    #: True while the shop has never saved settings.
    is_default: bool
    updated_at: datetime | None
    #: The credential that saved them (``key:<uuid>`` or ``client:<id>``).
    updated_by: str | None


_settings_decoder = msgspec.json.Decoder(RfmSettingsIn)


def parse_settings(body: bytes) -> RfmSettingsIn:
    """Settings from a request body, or a 422 naming the failing field by its JSON path (an
    unknown field at its own path: ``$.windw_days``), or a 400 for a body that is not JSON."""
    try:
        return _settings_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise Problem(
            "validation",
            "The RFM settings failed validation.",
            errors=[exact_field(field_error(exc))],
        ) from exc
    except msgspec.DecodeError as exc:
        raise Problem("malformed-body", f"The request body is not valid JSON: {exc}") from exc


async def get_settings(conn: TenantConn) -> RfmSettings:
    row = await conn.fetchrow(
        "SELECT window_days, currency, updated_at, updated_by FROM rfm_settings"
    )
    if row is None:
        return RfmSettings(
            window_days=DEFAULT_WINDOW_DAYS,
            currency=None,
            is_default=True,
            updated_at=None,
            updated_by=None,
        )
    return RfmSettings(
        window_days=row["window_days"],
        currency=row["currency"],
        is_default=False,
        updated_at=row["updated_at"],
        updated_by=row["updated_by"],
    )


async def save_settings(conn: TenantConn, settings: RfmSettingsIn, updated_by: str) -> RfmSettings:
    """Replace the settings. Nobody is rescored at once: the next computation (scheduled or on
    demand) sees the change and recomputes."""
    row = await conn.fetchrow(
        "INSERT INTO rfm_settings (window_days, currency, updated_by) VALUES ($1, $2, $3)"
        " ON CONFLICT (singleton) DO UPDATE SET window_days = EXCLUDED.window_days,"
        " currency = EXCLUDED.currency, updated_by = EXCLUDED.updated_by, updated_at = now()"
        " RETURNING updated_at",
        settings.window_days,
        settings.currency,
        updated_by,
    )
    assert row is not None
    return RfmSettings(
        window_days=settings.window_days,
        currency=settings.currency,
        is_default=False,
        updated_at=row["updated_at"],
        updated_by=updated_by,
    )


# --- the report ---------------------------------------------------------------------------------


class SegmentSummary(msgspec.Struct, frozen=True, kw_only=True):
    segment: RfmSegment
    customers: int
    #: ``customers`` over all scored customers (0 to 1, four decimals).
    share: float
    #: Purchases minus refunds in the window, in the report's currency, minor units.
    revenue: int
    #: ``revenue`` over the revenue of all segments (0 to 1, four decimals).
    revenue_share: float


class SegmentMove(msgspec.Struct, frozen=True, kw_only=True):
    """How many customers went from one segment to another since the previous computation.
    ``from`` is ``null`` for customers scored for the first time, ``to`` for customers no
    longer scored (merged into another profile); ``from == to`` counts those who stayed."""

    from_: RfmSegment | None = msgspec.field(name="from")
    to: RfmSegment | None
    customers: int


class RfmReport(msgspec.Struct, frozen=True, kw_only=True):
    """The latest computation. Before the first one, ``computed_at`` and ``as_of`` are
    ``null``, every segment is empty and ``currency`` is the configured one (or ``null``)."""

    object: Literal["rfm_report"] = "rfm_report"
    computed_at: datetime | None
    #: The UTC day the scores are as of: recency counts days to it, the window ends with it.
    as_of: date | None
    window_days: int
    currency: str | None
    #: Customers scored: unmerged profiles with at least one purchase.
    customers: int
    #: Every segment, best first, empty ones included.
    segments: list[SegmentSummary]
    #: Moves since the previous computation (stays included), by ``from`` then ``to``.
    movement: list[SegmentMove]


_RUN_COLUMNS = (
    "id, computed_at, as_of, window_days, currency, currency_setting, customers, segments,"
    " movement, changed, orders_recent, trigger"
)


def report_of(run: asyncpg.Record) -> RfmReport:
    stored: dict[str, dict[str, int]] = run["segments"]
    total = int(run["customers"])
    revenue_total = sum(int(s.get("revenue", 0)) for s in stored.values())
    segments = []
    for segment in SEGMENTS:
        found = stored.get(segment, {})
        customers, revenue = int(found.get("customers", 0)), int(found.get("revenue", 0))
        segments.append(
            SegmentSummary(
                segment=segment,
                customers=customers,
                share=_share(customers, total),
                revenue=revenue,
                revenue_share=_share(revenue, revenue_total),
            )
        )
    order = {segment: i for i, segment in enumerate(SEGMENTS)}
    moves: dict[str, dict[str, int]] = run["movement"]
    movement = [
        SegmentMove(from_=_segment(source), to=_segment(target), customers=int(count))
        for source, targets in moves.items()
        for target, count in targets.items()
    ]
    movement.sort(
        key=lambda m: (
            -1 if m.from_ is None else order[m.from_],
            len(order) if m.to is None else order[m.to],
        )
    )
    return RfmReport(
        computed_at=run["computed_at"],
        as_of=run["as_of"],
        window_days=run["window_days"],
        currency=run["currency"],
        customers=total,
        segments=segments,
        movement=movement,
    )


def _share(part: int, whole: int) -> float:
    """``part / whole`` exactly, rounded half up to four decimals; 0 when ``whole`` is 0."""
    if whole <= 0:
        return 0.0
    return float((Decimal(part) / Decimal(whole)).quantize(_FOUR_PLACES, ROUND_HALF_UP))


_BY_NAME: dict[str, RfmSegment] = {segment: segment for segment in SEGMENTS}


def _segment(stored: str) -> RfmSegment | None:
    """Runs store "no segment" as "" (a JSON object key cannot be null)."""
    return None if stored == "" else _BY_NAME[stored]


def empty_report(settings: RfmSettings) -> RfmReport:
    return RfmReport(
        computed_at=None,
        as_of=None,
        window_days=settings.window_days,
        currency=settings.currency,
        customers=0,
        segments=[
            SegmentSummary(segment=s, customers=0, share=0.0, revenue=0, revenue_share=0.0)
            for s in SEGMENTS
        ],
        movement=[],
    )


async def latest_run(conn: TenantConn) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {_RUN_COLUMNS} FROM rfm_runs ORDER BY id DESC LIMIT 1"
    )
    return row


async def get_report(conn: TenantConn) -> RfmReport:
    """The latest computation's report, or the empty report before the first one."""
    run = await latest_run(conn)
    if run is None:
        return empty_report(await get_settings(conn))
    return report_of(run)


# --- computing ----------------------------------------------------------------------------------

# The currency with the most revenue over the shop's profiles (revenue is net of refunds).
_TOP_CURRENCY_SQL = """
SELECT r.key FROM customers AS c CROSS JOIN LATERAL jsonb_each_text(c.revenue) AS r
WHERE c.merged_into IS NULL AND c.revenue <> '{}'
GROUP BY r.key HAVING sum(r.value::bigint) > 0
ORDER BY sum(r.value::bigint) DESC, r.key LIMIT 1"""

# What a run depends on, besides the day and the settings: $1 the previous run's computed_at.
_CHANGE_CHECK_SQL = """
SELECT
    (SELECT count(*) FROM touchpoints AS t
     WHERE t.type IN ('purchase', 'refund') AND t.received_at > $1::timestamptz - $2::interval)
        AS orders_recent,
    (SELECT count(*) FROM customers AS c
     WHERE c.merged_into IS NULL AND c.rfm_segment IS NOT NULL) AS scored,
    EXISTS (SELECT 1 FROM customers AS c
            WHERE c.merged_into IS NULL AND c.last_purchase_at IS NOT NULL
              AND c.rfm_segment IS NULL) AS unscored"""

# The computation, one statement over one snapshot. $1 as_of (date), $2 window start, $3 currency,
# $4 window_days, $5 the configured currency (or NULL), $6 trigger, $7 SETTLE.
# - buyers/orders/metrics: the three numbers per buyer (orders from the covering partial index);
# - tiles/scored: ntile(5) per number, then ties share the lowest tile of their value;
# - targets: every buyer with its new scores, and every profile that has scores but is no longer
#   a buyer (merged away) with none; locked/written: the rows whose scores change, locked in id
#   order (as ingest and the drift job lock them), then written;
# - the run row: segment sizes and revenue, movement from the stored (previous) segments, and the
#   purchases/refunds received lately that this snapshot saw (for the next change check).
_RECOMPUTE_SQL = """
WITH buyers AS (
    SELECT c.id, c.rfm_segment AS old_segment,
        greatest($1::date - (c.last_purchase_at AT TIME ZONE 'UTC')::date, 0) AS days
    FROM customers AS c
    WHERE c.merged_into IS NULL AND c.last_purchase_at IS NOT NULL
),
orders AS (
    SELECT t.customer_ref AS id,
        count(*) FILTER (WHERE t.type = 'purchase') AS orders,
        coalesce(sum(CASE WHEN t.type = 'purchase' THEN t.amount ELSE -t.amount END)
            FILTER (WHERE t.currency = $3::text), 0) AS spend
    FROM touchpoints AS t
    WHERE t.type IN ('purchase', 'refund') AND t.occurred_at >= $2::timestamptz
    GROUP BY t.customer_ref
),
metrics AS (
    SELECT b.id, b.old_segment, b.days, coalesce(o.orders, 0) AS orders,
        greatest(coalesce(o.spend, 0), 0) AS spend
    FROM buyers AS b LEFT JOIN orders AS o ON o.id = b.id
),
tiles AS (
    SELECT m.*,
        ntile(5) OVER (ORDER BY m.days DESC, m.id) AS r_tile,
        ntile(5) OVER (ORDER BY m.orders, m.id) AS f_tile,
        ntile(5) OVER (ORDER BY m.spend, m.id) AS m_tile
    FROM metrics AS m
),
scored AS (
    SELECT t.id, t.old_segment, t.spend,
        min(t.r_tile) OVER (PARTITION BY t.days)::smallint AS r,
        min(t.f_tile) OVER (PARTITION BY t.orders)::smallint AS f,
        min(t.m_tile) OVER (PARTITION BY t.spend)::smallint AS m
    FROM tiles AS t
),
segmented AS (
    SELECT s.*, {segment} AS segment FROM scored AS s
),
targets AS (
    SELECT s.id, s.old_segment, s.r, s.f, s.m, s.segment FROM segmented AS s
    UNION ALL
    SELECT c.id, c.rfm_segment, NULL::smallint, NULL::smallint, NULL::smallint, NULL::text
    FROM customers AS c
    WHERE c.rfm_segment IS NOT NULL AND (c.merged_into IS NOT NULL OR c.last_purchase_at IS NULL)
),
locked AS (
    SELECT c.id, t.r, t.f, t.m, t.segment
    FROM customers AS c JOIN targets AS t ON t.id = c.id
    WHERE (c.rfm_recency, c.rfm_frequency, c.rfm_monetary, c.rfm_segment)
        IS DISTINCT FROM (t.r, t.f, t.m, t.segment)
    ORDER BY c.id
    FOR UPDATE OF c
),
written AS (
    UPDATE customers AS c
    SET rfm_recency = l.r, rfm_frequency = l.f, rfm_monetary = l.m, rfm_segment = l.segment,
        rfm_computed_at = CASE WHEN l.segment IS NULL THEN NULL ELSE now() END
    FROM locked AS l
    WHERE c.id = l.id
    RETURNING c.id
),
sizes AS (
    SELECT s.segment, count(*) AS customers, sum(s.spend) AS revenue
    FROM segmented AS s GROUP BY s.segment
),
moves AS (
    SELECT coalesce(t.old_segment, '') AS source, coalesce(t.segment, '') AS target,
        count(*) AS customers
    FROM targets AS t GROUP BY 1, 2
)
INSERT INTO rfm_runs (as_of, window_days, currency, currency_setting, customers, segments,
    movement, changed, orders_recent, trigger)
SELECT $1::date, $4::integer, $3::text, $5::text,
    (SELECT count(*) FROM segmented),
    coalesce((SELECT jsonb_object_agg(z.segment,
            jsonb_build_object('customers', z.customers, 'revenue', z.revenue))
        FROM sizes AS z), '{{}}'),
    coalesce((SELECT jsonb_object_agg(x.source, x.targets) FROM (
        SELECT v.source, jsonb_object_agg(v.target, v.customers) AS targets
        FROM moves AS v GROUP BY v.source) AS x), '{{}}'),
    (SELECT count(*) FROM written),
    (SELECT count(*) FROM touchpoints AS t
     WHERE t.type IN ('purchase', 'refund') AND t.received_at > now() - $7::interval),
    $6::text
RETURNING {columns}""".format(segment=segment_sql("s.r", "s.f"), columns=_RUN_COLUMNS)


@dataclass(frozen=True)
class Recomputed:
    report: RfmReport
    #: Profiles whose scores the run wrote (0 when skipped).
    changed: int
    #: True when nothing had changed: the previous run stays in force, no new run is recorded.
    skipped: bool


def window_start(as_of: date, window_days: int) -> datetime:
    """The first instant of the window: midnight UTC, ``window_days - 1`` days before ``as_of``."""
    return datetime.combine(as_of - timedelta(days=window_days - 1), time(0), UTC)


async def recompute(
    conn: TenantConn,
    *,
    as_of: date | None = None,
    trigger: Trigger = "request",
    force: bool = False,
) -> Recomputed:
    """Score the shop's buyers as of ``as_of`` (default: today, UTC) and record the run, unless
    nothing changed since the previous run (then that run's report, ``skipped``). ``force``
    recomputes regardless. Concurrent runs in one shop queue on the runs table; the second then
    finds nothing changed. A request that waited :data:`REQUEST_LOCK_WAIT_MS` for a running
    computation gets a 409 problem (``Retry-After``)."""
    # A request waits a little for a running computation, then is told to retry; the worker waits
    # as long as a computation may take.
    lock_wait = REQUEST_LOCK_WAIT_MS if trigger == "request" else 0
    await conn.execute(
        f"SET LOCAL statement_timeout = {RECOMPUTE_TIMEOUT_MS:d};"
        f" SET LOCAL lock_timeout = {lock_wait:d}"
    )
    try:
        await conn.execute("LOCK TABLE rfm_runs IN EXCLUSIVE MODE")
    except asyncpg.LockNotAvailableError as exc:
        raise Problem(
            "conflict",
            "An RFM computation is already running for this shop; retry in a minute.",
            headers={"Retry-After": "60"},
        ) from exc
    await conn.execute("SET LOCAL lock_timeout = 0")
    settings = await get_settings(conn)
    if as_of is None:
        today: date = await conn.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")
        as_of = today
    previous = await latest_run(conn)
    if not force and previous is not None and await _unchanged(conn, previous, settings, as_of):
        return Recomputed(report_of(previous), changed=0, skipped=True)
    currency = settings.currency or await conn.fetchval(_TOP_CURRENCY_SQL) or DEFAULT_CURRENCY
    run = await conn.fetchrow(
        _RECOMPUTE_SQL,
        as_of,
        window_start(as_of, settings.window_days),
        currency,
        settings.window_days,
        settings.currency,
        trigger,
        SETTLE,
    )
    assert run is not None
    return Recomputed(report_of(run), changed=int(run["changed"]), skipped=False)


async def _unchanged(
    conn: TenantConn, previous: asyncpg.Record, settings: RfmSettings, as_of: date
) -> bool:
    if (previous["window_days"], previous["currency_setting"]) != (
        settings.window_days,
        settings.currency,
    ):
        return False
    # A new day moves recency and the window, which matters only to a shop with buyers.
    if previous["as_of"] != as_of and previous["customers"] > 0:
        return False
    check = await conn.fetchrow(_CHANGE_CHECK_SQL, previous["computed_at"], SETTLE)
    assert check is not None
    return bool(
        check["orders_recent"] == previous["orders_recent"]
        and check["scored"] == previous["customers"]
        and not check["unscored"]
    )


async def recompute_rfm_all_shops(db: Database) -> int:
    """The worker's chore: :func:`recompute` in every active shop (a shop where nothing changed
    is skipped cheaply); returns the profiles whose scores changed."""

    async def work(conn: TenantConn, _: Tenant) -> int:
        return (await recompute(conn, trigger="schedule")).changed

    return await in_every_shop(db, "rfm-recompute", work)
