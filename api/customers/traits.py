"""Changing a customer's traits: ``set`` overwrites, ``set_once`` only fills what is absent.

Every trait written gets ``trait_times[key] = now()``. Ingest compares an event's (corrected) time
with ``trait_times`` so that a late event never overwrites a newer value; a value set here is
therefore newer than anything that happened before this request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from api.customers.profiles import MAX_MERGE_HOPS, customer_by_ref, not_found, resolve_customer_ref
from api.customers.schemas import Customer, TraitsUpdate
from api.db import TenantConn
from api.errors import FieldError, Problem

TRAIT_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_TRAITS_PER_REQUEST = 100
#: The JSON size of ``set`` plus ``set_once``.
MAX_TRAITS_BYTES = 16 * 1024
#: Traits that are also columns of the profile, with their longest value.
COLUMN_TRAITS = {"email": 320, "name": 255}

_encode = msgspec.json.Encoder().encode


class TraitWrites(msgspec.Struct, frozen=True, kw_only=True):
    """A validated update: the two maps, with disjoint keys."""

    set_: dict[str, Any]
    set_once: dict[str, Any]


class TraitChange(msgspec.Struct, frozen=True, kw_only=True):
    """A profile's traits after an update, and which keys the update actually wrote."""

    traits: dict[str, Any]
    trait_times: dict[str, Any]
    written: dict[str, Any]


def trait_path(field: str, key: str) -> str:
    """The JSON path of one trait; a key that is not a valid name is quoted in brackets."""
    if TRAIT_KEY.fullmatch(key):
        return f"$.{field}.{key}"
    return f"$.{field}[{json.dumps(key)}]"


def _invalid(errors: list[FieldError]) -> Problem:
    return Problem("validation", f"{len(errors)} field(s) failed validation.", errors=errors)


def validated_writes(body: TraitsUpdate) -> TraitWrites:
    """The update if it is acceptable; otherwise a 422 problem naming every failing trait."""
    set_ = body.set_ or {}
    set_once = body.set_once or {}
    count = len(set_) + len(set_once)
    if count == 0:
        raise _invalid([FieldError("$", "give at least one trait in `set` or `set_once`")])
    if count > MAX_TRAITS_PER_REQUEST:
        raise _invalid(
            [FieldError("$", f"at most {MAX_TRAITS_PER_REQUEST} traits per request, not {count}")]
        )
    size = len(_encode(set_)) + len(_encode(set_once))
    if size > MAX_TRAITS_BYTES:
        raise _invalid(
            [
                FieldError(
                    "$", f"traits may take at most {MAX_TRAITS_BYTES} bytes of JSON, not {size}"
                )
            ]
        )
    errors: list[FieldError] = []
    for field, traits in (("set", set_), ("set_once", set_once)):
        for key, value in traits.items():
            message = _trait_error(key, value)
            if message:
                errors.append(FieldError(trait_path(field, key), message))
    for key in sorted(set_.keys() & set_once.keys()):
        errors.append(
            FieldError(trait_path("set_once", key), "also in `set`: a trait is set or set once")
        )
    if errors:
        raise _invalid(errors)
    return TraitWrites(set_=set_, set_once=set_once)


def _trait_error(key: str, value: Any) -> str | None:
    if not TRAIT_KEY.fullmatch(key):
        return (
            "a trait name is a lower-case letter followed by at most 63 lower-case letters, "
            "digits or underscores"
        )
    if isinstance(value, list):
        return "a trait is a JSON scalar or object, not an array"
    longest = COLUMN_TRAITS.get(key)
    if longest is None or value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= longest:
        return f"`{key}` is a string of 1 to {longest} characters, or null"
    return None


def apply_writes(
    traits: Mapping[str, Any],
    trait_times: Mapping[str, Any],
    writes: TraitWrites,
    now: datetime,
) -> TraitChange:
    """``set`` overwrites; ``set_once`` writes only keys the profile does not have (a trait that is
    present with the value null counts as present). Every written key is stamped ``now``."""
    written = dict(writes.set_)
    written.update((k, v) for k, v in writes.set_once.items() if k not in traits)
    return TraitChange(
        traits={**traits, **written},
        trait_times={**trait_times, **dict.fromkeys(written, now)},
        written=written,
    )


# The profile row, locked so ingest and other updates wait; ``now()`` is the transaction's time.
LOCK_PROFILE_SQL = """
SELECT c.id, c.merged_into, c.traits, c.trait_times, now() AS now
FROM customers AS c
WHERE c.id = $1
FOR UPDATE"""

UPDATE_TRAITS_SQL = """
UPDATE customers
SET traits = $2,
    trait_times = $3,
    email = CASE WHEN $4::boolean THEN $5::text ELSE email END,
    name = CASE WHEN $6::boolean THEN $7::text ELSE name END,
    updated_at = now()
WHERE id = $1"""


async def update_traits(conn: TenantConn, customer_id: str, writes: TraitWrites) -> Customer:
    """Apply ``writes`` to the profile ``customer_id`` leads to and return it; a 404 problem if
    the shop has no such customer (an update never creates one)."""
    profile = await _locked_survivor(conn, customer_id)
    ref: int = profile["id"]
    change = apply_writes(profile["traits"], profile["trait_times"], writes, profile["now"])
    if change.written:
        await conn.execute(
            UPDATE_TRAITS_SQL,
            ref,
            change.traits,
            change.trait_times,
            "email" in change.written,
            change.written.get("email"),
            "name" in change.written,
            change.written.get("name"),
        )
    return await customer_by_ref(conn, ref, customer_id)


async def _locked_survivor(conn: TenantConn, customer_id: str) -> asyncpg.Record:
    """The profile ``customer_id`` leads to, locked for the rest of the transaction."""
    for _ in range(MAX_MERGE_HOPS):
        ref = await resolve_customer_ref(conn, customer_id)
        if ref is None:
            break
        profile = await conn.fetchrow(LOCK_PROFILE_SQL, ref)
        # Not merged: ours until the transaction ends. Merged by a transaction that committed
        # between the two statements: resolve again, to its survivor.
        if profile is not None and profile["merged_into"] is None:
            return profile
    raise not_found(customer_id)
