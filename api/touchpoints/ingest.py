"""Ingest: validate each touchpoint, resolve who it is about, store it once, update the profile.

A batch is never all-or-nothing: each item ends ``accepted``, ``duplicate`` or ``rejected`` (with
the field path and reason). Everything one batch writes (touchpoints, new profiles and ids,
aggregates) commits in one transaction, so a failure midway leaves no half write.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

import asyncpg
import msgspec

from api.billing.usage import counting
from api.db import TenantConn
from api.errors import field_error
from api.journey import stages
from api.journey.stages import PROFILE_COLUMNS
from api.loyalty import earning
from api.offers import triggers as offer_triggers
from api.touchpoints import identity
from api.touchpoints.schemas import (
    MAX_ITEM_BYTES,
    ItemError,
    ItemResult,
    TouchpointIn,
    rule_violations,
)

FUTURE_LIMIT = timedelta(hours=24)
_decoder = msgspec.json.Decoder(TouchpointIn)
_encode = msgspec.json.Encoder().encode


@dataclass
class Candidate:
    """A touchpoint that passed validation, with its corrected time."""

    index: int
    item: TouchpointIn
    occurred_at: datetime
    ref: int = 0


@dataclass
class Validated:
    candidates: list[Candidate] = field(default_factory=list)
    results: dict[int, ItemResult] = field(default_factory=dict)


def decode_item(index: int, raw: bytes | msgspec.Raw) -> TouchpointIn | ItemResult:
    """Decode one item on its own, so one bad item does not sink its batch."""
    if len(raw) > MAX_ITEM_BYTES:
        return _rejected(index, "$", f"a touchpoint is at most {MAX_ITEM_BYTES // 1024} KB")
    try:
        item = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        error = field_error(exc)
        return _rejected(index, error.path, error.message)
    except msgspec.DecodeError as exc:
        return _rejected(index, "$", f"not valid JSON: {exc}")
    errors = rule_violations(item)
    if errors:
        return ItemResult(index=index, status="rejected", id=item.id, errors=errors)
    return item


def corrected_time(item: TouchpointIn, received_at: datetime) -> datetime | ItemError:
    """``occurred_at`` on our clock: shifted by the client's skew when ``sent_at`` tells it."""
    occurred_at = item.occurred_at
    if item.sent_at is not None:
        if item.sent_at < occurred_at:
            return ItemError("$.sent_at", "sent_at is before occurred_at")
        occurred_at = received_at - (item.sent_at - item.occurred_at)
    if occurred_at > received_at + FUTURE_LIMIT:
        return ItemError("$.occurred_at", "more than 24 hours in the future")
    return occurred_at


def validate(items: list[TouchpointIn | ItemResult], received_at: datetime) -> Validated:
    """Time rules and in-batch duplicates, on top of each item's own validation."""
    validated = Validated()
    seen: set[str] = set()
    for index, item in enumerate(items):
        if isinstance(item, ItemResult):
            validated.results[index] = item
            continue
        occurred_at = corrected_time(item, received_at)
        if isinstance(occurred_at, ItemError):
            validated.results[index] = ItemResult(
                index=index, status="rejected", id=item.id, errors=[occurred_at]
            )
        elif item.id in seen:
            validated.results[index] = ItemResult(index=index, status="duplicate", id=item.id)
        else:
            seen.add(item.id)
            validated.candidates.append(Candidate(index, item, occurred_at))
    return validated


def suppression_hash(kind: str, value: str) -> bytes:
    return hashlib.sha256(f"{kind}:{value}".encode()).digest()


def ids_of(item: TouchpointIn) -> list[identity.IdKey]:
    ids = []
    if item.customer_id is not None:
        ids.append(("customer_id", item.customer_id))
    if item.anonymous_id is not None:
        ids.append(("anonymous_id", item.anonymous_id))
    return ids


async def record(
    conn: TenantConn,
    items: list[TouchpointIn | ItemResult],
    received_at: datetime,
    schema: str,
    *,
    usage_period: date | None = None,
) -> list[ItemResult]:
    """Store a batch of ``schema``'s shop; returns one result per item, in order. With
    ``usage_period``, the touchpoints stored are counted into that month's usage (billing), in
    the same statement that stores them."""
    validated = validate(items, received_at)
    if validated.candidates:
        all_ids = {key for c in validated.candidates for key in ids_of(c.item)}
        resolved = await identity.resolve(
            conn, all_ids, (suppression_hash(kind, value) for kind, value in all_ids)
        )
        candidates = _drop_suppressed(validated, resolved.suppressed)
        if candidates:
            await _assign_profiles(conn, candidates, resolved, all_ids)
            inserted = await _insert(conn, candidates, received_at, usage_period)
            stored = [c for c in candidates if c.item.id in inserted]
            # Points first: a tier reached now is on the profile when the stage is evaluated.
            settled = [earning.Stored(c.ref, c.item, c.occurred_at) for c in stored]
            await earning.on_ingest(conn, schema, settled, received_at)
            profiles = await _update_profiles(conn, stored)
            _, rules = await stages.current_rules(conn, schema)
            await stages.advance_stages(conn, rules, profiles, _latest_events(stored), received_at)
            await offer_triggers.on_ingest(conn, schema, settled, received_at)
            for candidate in candidates:
                validated.results[candidate.index] = ItemResult(
                    index=candidate.index,
                    status="accepted" if candidate.item.id in inserted else "duplicate",
                    id=candidate.item.id,
                )
    return [validated.results[index] for index in range(len(items))]


def _latest_events(stored: list[Candidate]) -> dict[int, tuple[str, datetime]]:
    """Per profile, the newest touchpoint of the batch: the one a stage move is put down to."""
    latest: dict[int, tuple[str, datetime]] = {}
    for c in stored:
        if c.ref not in latest or c.occurred_at >= latest[c.ref][1]:
            latest[c.ref] = (c.item.id, c.occurred_at)
    return latest


def _drop_suppressed(validated: Validated, suppressed: set[bytes]) -> list[Candidate]:
    """Events about an erased person are refused, so erasure cannot be undone by a resend."""
    if not suppressed:
        return validated.candidates
    kept = []
    for candidate in validated.candidates:
        named = [
            f"$.{kind}"
            for kind, value in ids_of(candidate.item)
            if suppression_hash(kind, value) in suppressed
        ]
        if named:
            validated.results[candidate.index] = ItemResult(
                index=candidate.index,
                status="rejected",
                id=candidate.item.id,
                errors=[ItemError(named[0], "this person was erased at the shop's request")],
            )
        else:
            kept.append(candidate)
    return kept


async def _assign_profiles(
    conn: TenantConn,
    candidates: list[Candidate],
    resolved: identity.ProfileIds,
    all_ids: set[identity.IdKey],
) -> None:
    """Set ``ref`` on every candidate, creating and joining profiles as the ids require."""
    changing = _ids_needing_changes(candidates, resolved)
    if changing:
        # Someone new or newly linked: serialise with concurrent writers of those ids only, then
        # read again under the lock (a merge racing the rest is caught in _update_profiles).
        await identity.lock_ids(conn, changing)
        resolved = await identity.resolve(conn, all_ids)
        await _create_and_link(conn, candidates, resolved)
    for candidate in candidates:
        candidate.ref = _ref_for(candidate.item, resolved)


def _ids_needing_changes(
    candidates: list[Candidate], resolved: identity.ProfileIds
) -> set[identity.IdKey]:
    """The ids of items that create a profile or tie an anonymous profile to a customer."""
    changing: set[identity.IdKey] = set()
    for candidate in candidates:
        item = candidate.item
        customer = resolved.refs.get(("customer_id", item.customer_id or ""))
        anonymous = resolved.refs.get(("anonymous_id", item.anonymous_id or ""))
        if (
            (item.customer_id is not None and customer is None)
            or (item.anonymous_id is not None and anonymous is None)
            or (customer is not None and anonymous not in (None, customer, *resolved.known))
        ):
            changing.update(ids_of(item))
    return changing


def _ref_for(item: TouchpointIn, resolved: identity.ProfileIds) -> int:
    # The known customer wins: an anonymous id tied to another known customer is not merged.
    if item.customer_id is not None:
        return resolved.refs[("customer_id", item.customer_id)]
    return resolved.refs[("anonymous_id", item.anonymous_id or "")]


async def _create_and_link(
    conn: TenantConn, candidates: list[Candidate], resolved: identity.ProfileIds
) -> None:
    """Walk the batch in order, so a later item sees the people an earlier one introduced.

    Profiles new in this batch are only written at the end, so a visitor who signs up within
    the batch costs no extra round trip; only a profile that already existed is updated or
    absorbed in place.
    """
    refs, known = resolved.refs, resolved.known
    new_profiles: dict[int, str | None] = {}  # ref -> customer_id, written at the end
    new_ids: list[tuple[str, str, int]] = []
    spare_refs: list[int] = []

    async def next_ref() -> int:
        if not spare_refs:
            # At most one new profile per unknown id: take them all in one round trip.
            unknown = {key for c in candidates for key in ids_of(c.item)} - refs.keys()
            spare_refs.extend(await identity.new_profile_refs(conn, max(1, len(unknown))))
        return spare_refs.pop()

    for candidate in candidates:
        item = candidate.item
        customer_key = ("customer_id", item.customer_id or "")
        anonymous_key = ("anonymous_id", item.anonymous_id or "")
        customer = refs.get(customer_key) if item.customer_id is not None else None
        anonymous = refs.get(anonymous_key) if item.anonymous_id is not None else None
        if item.customer_id is not None and customer is None:
            if anonymous is not None and anonymous not in known:
                # The anonymous visitor turns out to be this customer.
                if anonymous in new_profiles:
                    new_profiles[anonymous] = item.customer_id
                    new_ids.append(("customer_id", item.customer_id, anonymous))
                else:
                    await identity.make_known(conn, anonymous, item.customer_id)
                customer = anonymous
            else:
                customer = await next_ref()
                new_profiles[customer] = item.customer_id
                new_ids.append(("customer_id", item.customer_id, customer))
            refs[customer_key] = customer
            known.add(customer)
        if item.anonymous_id is not None:
            if anonymous is None:
                anonymous = customer if customer is not None else await next_ref()
                if customer is None:
                    new_profiles[anonymous] = None
                new_ids.append(("anonymous_id", item.anonymous_id, anonymous))
                refs[anonymous_key] = anonymous
            elif customer is not None and anonymous != customer and anonymous not in known:
                await _absorb(conn, anonymous, customer, new_profiles, new_ids)
                for key, ref in refs.items():
                    if ref == anonymous:
                        refs[key] = customer
    await identity.create_profiles(conn, list(new_profiles.items()))
    await identity.add_identities(conn, new_ids)


async def _absorb(
    conn: TenantConn,
    anonymous: int,
    customer: int,
    new_profiles: dict[int, str | None],
    new_ids: list[tuple[str, str, int]],
) -> None:
    """Join an anonymous profile to a customer; in memory when both are new in this batch."""
    if anonymous in new_profiles and customer in new_profiles:
        del new_profiles[anonymous]
        new_ids[:] = [(k, v, customer if r == anonymous else r) for k, v, r in new_ids]
        return
    # One of them is in the database already: write what is pending, then absorb there.
    await identity.create_profiles(conn, list(new_profiles.items()))
    await identity.add_identities(conn, new_ids)
    new_profiles.clear()
    new_ids.clear()
    await identity.absorb(conn, anonymous, customer)


_INSERT_SQL = """
INSERT INTO touchpoints (event_id, customer_ref, type, channel, customer_id, anonymous_id,
    occurred_at, sent_at, received_at, email, order_id, amount, currency, order_details,
    properties, context)
SELECT e, r, t, ch, cu, an, o, s, $16, em, oi, am, cur, od::jsonb, p::jsonb, cx::jsonb
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[], $11::bigint[],
    $12::text[], $13::text[], $14::text[], $15::text[])
    AS u(e, r, t, ch, cu, an, o, s, em, oi, am, cur, od, p, cx)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""
#: The same, also counting the rows it stores into the month given as ``$17``.
_INSERT_COUNTED_SQL = counting(_INSERT_SQL, 17)


async def _insert(
    conn: TenantConn, candidates: list[Candidate], received_at: datetime, usage_period: date | None
) -> set[str]:
    """Insert in one statement; an id stored before comes back as not inserted (duplicate)."""
    columns: dict[str, list[object]] = defaultdict(list)
    for c in candidates:
        item = c.item
        order = item.order
        columns["event_id"].append(item.id)
        columns["customer_ref"].append(c.ref)
        columns["type"].append(item.type)
        columns["channel"].append(item.channel)
        columns["customer_id"].append(item.customer_id)
        columns["anonymous_id"].append(item.anonymous_id)
        columns["occurred_at"].append(c.occurred_at)
        columns["sent_at"].append(item.sent_at)
        columns["email"].append(item.email)
        columns["order_id"].append(order.order_id if order else None)
        columns["amount"].append(order.amount if order else None)
        columns["currency"].append(order.currency if order else None)
        columns["order_details"].append(_order_details(item))
        columns["properties"].append(_encode(item.properties).decode())
        columns["context"].append(_encode(item.context).decode() if item.context else "{}")
    counted = () if usage_period is None else (usage_period,)
    rows = await conn.fetch(
        _INSERT_SQL if usage_period is None else _INSERT_COUNTED_SQL,
        *(
            columns[name]
            for name in (
                "event_id",
                "customer_ref",
                "type",
                "channel",
                "customer_id",
                "anonymous_id",
                "occurred_at",
                "sent_at",
                "email",
                "order_id",
                "amount",
                "currency",
                "order_details",
                "properties",
                "context",
            )
        ),
        received_at,
        *counted,
    )
    return {r["event_id"] for r in rows}


def _order_details(item: TouchpointIn) -> str | None:
    if item.order is None:
        return None
    details = msgspec.structs.asdict(item.order)
    for key in ("order_id", "amount", "currency"):
        details.pop(key)
    return _encode(details).decode()


@dataclass
class ProfileDelta:
    first_seen: datetime
    last_seen: datetime
    count: int = 0
    types: Counter[str] = field(default_factory=Counter)
    channels: Counter[str] = field(default_factory=Counter)
    orders: int = 0
    revenue: Counter[str] = field(default_factory=Counter)
    last_purchase: datetime | None = None
    email: str | None = None
    email_at: datetime | None = None


async def _update_profiles(conn: TenantConn, stored: list[Candidate]) -> list[asyncpg.Record]:
    """Fold the stored touchpoints into their profiles' aggregates, in one statement; returns
    the live profiles as they are now (what stage evaluation needs)."""
    deltas: dict[int, ProfileDelta] = {}
    for c in stored:
        delta = deltas.get(c.ref)
        if delta is None:
            delta = deltas[c.ref] = ProfileDelta(c.occurred_at, c.occurred_at)
        delta.first_seen = min(delta.first_seen, c.occurred_at)
        delta.last_seen = max(delta.last_seen, c.occurred_at)
        delta.count += 1
        delta.types[c.item.type] += 1
        delta.channels[c.item.channel] += 1
        order = c.item.order
        if order is not None and c.item.type == "purchase":
            delta.orders += 1
            delta.revenue[order.currency] += order.amount
            if delta.last_purchase is None or c.occurred_at > delta.last_purchase:
                delta.last_purchase = c.occurred_at
        elif order is not None and c.item.type == "refund":
            delta.revenue[order.currency] -= order.amount
        if c.item.email and (delta.email_at is None or c.occurred_at >= delta.email_at):
            delta.email, delta.email_at = c.item.email, c.occurred_at
    if not deltas:
        return []
    # Sorted, so two batches about the same people lock their rows in the same order.
    refs = sorted(deltas)
    values = [deltas[ref] for ref in refs]
    merged = await conn.fetch(
        f"""
        UPDATE customers c SET
            first_seen_at = least(c.first_seen_at, u.first_seen),
            last_seen_at = greatest(c.last_seen_at, u.last_seen),
            touchpoint_count = c.touchpoint_count + u.n,
            counts_by_type = add_counts(c.counts_by_type, u.types::jsonb),
            counts_by_channel = add_counts(c.counts_by_channel, u.channels::jsonb),
            order_count = c.order_count + u.orders,
            revenue = add_counts(c.revenue, u.revenue::jsonb),
            last_purchase_at = greatest(c.last_purchase_at, u.last_purchase),
            -- A late event never overwrites a newer trait.
            email = CASE WHEN u.email IS NOT NULL AND (c.trait_times->>'email' IS NULL
                    OR (c.trait_times->>'email')::timestamptz <= u.email_at)
                THEN u.email ELSE c.email END,
            trait_times = CASE WHEN u.email IS NOT NULL AND (c.trait_times->>'email' IS NULL
                    OR (c.trait_times->>'email')::timestamptz <= u.email_at)
                THEN c.trait_times || jsonb_build_object('email', u.email_at)
                ELSE c.trait_times END,
            updated_at = now()
        FROM unnest($1::bigint[], $2::timestamptz[], $3::timestamptz[], $4::bigint[],
            $5::text[], $6::text[], $7::int[], $8::text[], $9::timestamptz[], $10::text[],
            $11::timestamptz[])
            AS u(id, first_seen, last_seen, n, types, channels, orders, revenue, last_purchase,
                email, email_at)
        WHERE c.id = u.id
        RETURNING {PROFILE_COLUMNS}
        """,
        refs,
        [d.first_seen for d in values],
        [d.last_seen for d in values],
        [d.count for d in values],
        [_encode(d.types).decode() for d in values],
        [_encode(d.channels).decode() for d in values],
        [d.orders for d in values],
        [_encode(d.revenue).decode() for d in values],
        [d.last_purchase for d in values],
        [d.email for d in values],
        [d.email_at for d in values],
    )
    live = [r for r in merged if r["merged_into"] is None]
    survivors = {r["id"]: r["merged_into"] for r in merged if r["merged_into"] is not None}
    if survivors:
        live += await _follow_merges(conn, stored, survivors)
    return live


async def _follow_merges(
    conn: TenantConn, stored: list[Candidate], survivors: dict[int, int]
) -> list[asyncpg.Record]:
    """A profile this batch read was absorbed by a merge that committed meanwhile: move this
    batch's touchpoints and counts to the survivor. (The absorb moved everything committed
    before it; these rows were not yet.)"""
    moved = [c for c in stored if c.ref in survivors]
    for candidate in moved:
        candidate.ref = survivors[candidate.ref]
    await conn.execute(
        "UPDATE touchpoints SET customer_ref = u.ref"
        " FROM unnest($1::text[], $2::bigint[]) AS u(event_id, ref)"
        " WHERE touchpoints.event_id = u.event_id",
        [c.item.id for c in moved],
        [c.ref for c in moved],
    )
    await conn.execute(
        "UPDATE customers SET touchpoint_count = 0, counts_by_type = '{}',"
        " counts_by_channel = '{}', order_count = 0, revenue = '{}' WHERE id = ANY($1::bigint[])",
        list(survivors),
    )
    return await _update_profiles(conn, moved)


def _rejected(index: int, path: str, message: str) -> ItemResult:
    return ItemResult(index=index, status="rejected", errors=[ItemError(path, message)])
