"""A shop's journey rules as configuration: read, replace, list, restore and preview.

Every change stores a new row of ``journey_rule_versions`` (the highest version is in force; none
means the built-in defaults, version 0), so nothing is ever overwritten and any earlier version,
the defaults included, can be restored. Saving rules does not touch the customers: each profile
keeps its stage until its next touchpoint, when the rules in force move it (forward only). The
preview runs a proposed rule set over every profile in one read-only query instead.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import asyncpg
import msgspec

from api.db import TenantConn
from api.errors import FieldError, Problem, exact_field
from api.journey.rules import (
    DEFAULT_RULES,
    MAX_DEPTH,
    RuleSet,
    drift_sql,
    forward_stage_sql,
    parse_rules,
    rules_json,
)
from api.pagination import Page, page_of

#: Rule sets are small; this bounds what a request can make us decode and compile to SQL.
MAX_RULES_BYTES = 64 * 1024
#: Versions are a PostgreSQL ``integer``.
MAX_VERSION = 2**31 - 1


class JourneyConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The rules in force. ``version`` 0 is the built-in defaults, never saved."""

    object: Literal["journey_rules"] = "journey_rules"
    version: int
    #: True while the rules in force equal the built-in defaults (version 0, or a version that
    #: restored or restated them).
    is_default: bool
    rules: RuleSet
    created_at: datetime | None
    #: The credential that saved this version (``key:<uuid>`` or ``client:<id>``).
    created_by: str | None
    #: The version this one restored, if it was made by a restore (0: the defaults).
    restored_from: int | None


class JourneyRuleVersion(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["journey_rule_version"] = "journey_rule_version"
    version: int
    created_at: datetime
    created_by: str
    restored_from: int | None
    rules: RuleSet


class StageCounts(msgspec.Struct, frozen=True, kw_only=True):
    """Customers per stage; every stage and drift state is present, 0 when empty."""

    awareness: int = 0
    consideration: int = 0
    acquisition: int = 0
    service: int = 0
    loyalty: int = 0
    advocacy: int = 0
    at_risk: int = 0
    lapsed: int = 0


class JourneyPreview(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["journey_preview"] = "journey_preview"
    #: The shop's profiles (known and anonymous; those absorbed by a merge are not counted).
    customers: int
    #: Where the proposed rules put each profile, evaluated afresh from its aggregates.
    stages: StageCounts
    #: Where the profiles are now (their stored stage).
    current: StageCounts


STAGE_KEYS: tuple[str, ...] = tuple(StageCounts.__struct_fields__)


# --- validation ---------------------------------------------------------------------------------


def validated_rules(body: bytes) -> RuleSet:
    """A rule set from a request body, or a 422 naming every failing path.

    :func:`parse_rules` does the validation; this adds two things: an unknown or missing field
    is reported at its own path (``$.stages.loyalty.ordres``: unknown field), and a body nested
    deeper than any valid rule set is a 422 rather than an exhausted interpreter stack (500).
    """
    try:
        return parse_rules(body)
    except RecursionError as exc:
        raise Problem(
            "validation",
            "The rule set is nested far too deeply.",
            errors=[FieldError("$", f"conditions nest at most {MAX_DEPTH} levels")],
        ) from exc
    except Problem as problem:
        if problem.errors:
            problem.errors = [exact_field(error) for error in problem.errors]
        raise


# --- reading and writing versions ---------------------------------------------------------------


async def get_config(conn: TenantConn) -> JourneyConfig:
    row = await conn.fetchrow(
        "SELECT version, rules, created_at, created_by, restored_from"
        " FROM journey_rule_versions ORDER BY version DESC LIMIT 1"
    )
    if row is None:
        return _config(0, DEFAULT_RULES, None, None, None)
    return _config(
        row["version"],
        msgspec.convert(row["rules"], RuleSet),
        row["created_at"],
        row["created_by"],
        row["restored_from"],
    )


def _config(
    version: int,
    rules: RuleSet,
    created_at: datetime | None,
    created_by: str | None,
    restored_from: int | None,
) -> JourneyConfig:
    return JourneyConfig(
        version=version,
        is_default=rules == DEFAULT_RULES,
        rules=rules,
        created_at=created_at,
        created_by=created_by,
        restored_from=restored_from,
    )


async def save_rules(
    conn: TenantConn, rules: RuleSet, created_by: str, *, restored_from: int | None = None
) -> JourneyConfig:
    """Store ``rules`` as the next version, which is then in force."""
    # Writers queue here so two saves cannot both take max + 1; readers are not blocked.
    await conn.execute("LOCK TABLE journey_rule_versions IN EXCLUSIVE MODE")
    row = await conn.fetchrow(
        "INSERT INTO journey_rule_versions (version, rules, created_by, restored_from)"
        " SELECT coalesce(max(version), 0) + 1, $1, $2, $3 FROM journey_rule_versions"
        " RETURNING version, created_at",
        rules_json(rules),
        created_by,
        restored_from,
    )
    assert row is not None
    return _config(row["version"], rules, row["created_at"], created_by, restored_from)


async def restore_version(conn: TenantConn, version: int, created_by: str) -> JourneyConfig:
    """A new version with the rules of ``version`` (0: the built-in defaults)."""
    if version == 0:
        rules = DEFAULT_RULES
    else:
        stored = None
        if 0 < version <= MAX_VERSION:
            stored = await conn.fetchval(
                "SELECT rules FROM journey_rule_versions WHERE version = $1", version
            )
        if stored is None:
            raise Problem("not-found", f"No journey rules version {version}.")
        # Validated again: what was valid when saved must still be valid to be put in force.
        rules = validated_rules(msgspec.json.encode(stored))
    return await save_rules(conn, rules, created_by, restored_from=version)


async def list_versions(
    conn: TenantConn, *, limit: int, starting_after: int | None
) -> Page[JourneyRuleVersion]:
    rows = await conn.fetch(
        "SELECT version, rules, created_at, created_by, restored_from FROM journey_rule_versions"
        " WHERE $1::integer IS NULL OR version < $1 ORDER BY version DESC LIMIT $2",
        starting_after,
        limit + 1,
    )
    return page_of([_version(row) for row in rows], limit)


def _version(row: asyncpg.Record) -> JourneyRuleVersion:
    return JourneyRuleVersion(
        version=row["version"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        restored_from=row["restored_from"],
        rules=msgspec.convert(row["rules"], RuleSet),
    )


# --- preview ------------------------------------------------------------------------------------


def preview_sql(rules: RuleSet) -> str:
    """One pass over the profiles: (proposed stage, stored stage, how many)."""
    return (
        f"SELECT coalesce({drift_sql(rules)}, {forward_stage_sql(rules)}) AS proposed,"
        " c.stage AS current, count(*) AS customers"
        " FROM customers c WHERE c.merged_into IS NULL GROUP BY 1, 2"
    )


async def preview(conn: TenantConn, rules: RuleSet) -> JourneyPreview:
    """How many profiles ``rules`` would put in each stage, next to where they are now.

    Each profile is evaluated afresh from its aggregates (drift first, then the highest stage
    whose condition holds), as if the rules had always been in force. The transaction is read
    only: a preview cannot write, whatever the rules compile to.
    """
    await conn.execute("SET TRANSACTION READ ONLY")
    proposed = dict.fromkeys(STAGE_KEYS, 0)
    current = dict.fromkeys(STAGE_KEYS, 0)
    total = 0
    for row in await conn.fetch(preview_sql(rules)):
        count = int(row["customers"])
        total += count
        proposed[row["proposed"]] += count
        if row["current"] in current:
            current[row["current"]] += count
    return JourneyPreview(
        customers=total,
        stages=StageCounts(**{key: proposed[key] for key in STAGE_KEYS}),
        current=StageCounts(**current),
    )
