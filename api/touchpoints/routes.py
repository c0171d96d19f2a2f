"""``POST /v1/touchpoints`` and ``POST /v1/touchpoints/batch``: the hot path of the product."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, post
from litestar.datastructures import State

from api.auth.guards import principal_of
from api.billing.usage import admit_ingest
from api.db import TenantConn
from api.errors import FieldError, Problem, field_error, problem_responses
from api.idempotency import idempotent_json
from api.touchpoints import ingest
from api.touchpoints.schemas import (
    MAX_BATCH_BYTES,
    MAX_BATCH_ITEMS,
    MAX_ITEM_BYTES,
    BatchResult,
    ItemResult,
    SingleResult,
    TouchpointIn,
)

INGEST = {"scopes": ("touchpoints:write",), "publishable": True}


class BatchIn(msgspec.Struct, forbid_unknown_fields=True):
    touchpoints: list[msgspec.Raw]


class BatchBody(msgspec.Struct):
    """The documented shape of a batch (each item is validated on its own)."""

    touchpoints: Annotated[list[TouchpointIn], msgspec.Meta(max_length=MAX_BATCH_ITEMS)]


_batch_decoder = msgspec.json.Decoder(BatchIn)
_encode = msgspec.json.Encoder().encode


async def read_body(request: Request[Any, Any, Any], limit: int) -> bytes:
    """The raw body, refused with 413 (naming the limit) before or after reading it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = await request.body()
    if len(body) > limit:
        raise _too_large(len(body), limit)
    return body


def _too_large(size: int, limit: int) -> Problem:
    return Problem(
        "payload-too-large",
        f"The body is {size:,} bytes; the limit is {limit:,} bytes ({limit // 1024} KB).",
    )


@post(
    "/v1/touchpoints",
    opt={**INGEST, "request_body": TouchpointIn},
    tags=["touchpoints"],
    operation_id="recordTouchpoint",
    summary="Record a touchpoint",
    status_code=201,
    request_max_body_size=MAX_ITEM_BYTES * 2,
    responses=problem_responses(400, 401, 402, 403, 413, 422, 429),
)
async def record_touchpoint(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    """Record one touchpoint. Re-sending the same ``id`` stores nothing and answers 200 with
    ``status: duplicate``; a new one answers 201 with ``status: accepted``."""
    principal = principal_of(request)
    usage = await admit_ingest(state, principal.tenant, datetime.now(UTC))
    body = await read_body(request, MAX_ITEM_BYTES)
    item = ingest.decode_item(0, body)
    if isinstance(item, ItemResult):
        raise _item_problem(item)
    received_at = datetime.now(UTC)

    accepted = 0

    async def work(conn: TenantConn) -> tuple[int, bytes]:
        nonlocal accepted
        [result] = await ingest.record(
            conn,
            [item],
            received_at,
            principal.tenant.schema,
            usage_period=usage.period if usage else None,
        )
        if result.status == "rejected":
            raise _item_problem(result)
        accepted = int(result.status == "accepted")
        occurred_at = ingest.corrected_time(item, received_at)
        assert isinstance(occurred_at, datetime)
        single = SingleResult(
            object="touchpoint",
            id=item.id,
            status="accepted" if result.status == "accepted" else "duplicate",
            received_at=received_at,
            occurred_at=occurred_at,
        )
        return (201 if result.status == "accepted" else 200), _encode(single)

    response = await idempotent_json(
        request,
        state.db,
        principal.tenant,
        "POST /v1/touchpoints",
        body,
        work,
        generic_plans=True,
    )
    if usage is not None:
        await usage.settle(accepted)
    return response


def _item_problem(result: ItemResult) -> Problem:
    errors = [FieldError(e.path, e.message) for e in result.errors or []]
    return Problem("validation", f"{len(errors)} field(s) failed validation.", errors=errors)


@post(
    "/v1/touchpoints/batch",
    opt={**INGEST, "request_body": BatchBody},
    tags=["touchpoints"],
    operation_id="recordTouchpointBatch",
    summary="Record up to 1,000 touchpoints",
    status_code=200,
    request_max_body_size=MAX_BATCH_BYTES * 2,
    responses=problem_responses(400, 401, 402, 403, 413, 422, 429),
)
async def record_batch(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    """Record up to 1,000 touchpoints (1 MB; each at most 32 KB). Never all-or-nothing and never
    silent: ``results`` has one entry per item, in order, ``accepted``, ``duplicate`` (its ``id``
    was stored before, in this batch or earlier) or ``rejected`` with each failing field's path."""
    principal = principal_of(request)
    usage = await admit_ingest(state, principal.tenant, datetime.now(UTC))
    body = await read_body(request, MAX_BATCH_BYTES)
    try:
        batch = _batch_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise Problem(
            "validation", "The batch envelope is invalid.", errors=[field_error(exc)]
        ) from exc
    except msgspec.DecodeError as exc:
        raise Problem("malformed-body", f"The request body is not valid JSON: {exc}") from exc
    if len(batch.touchpoints) > MAX_BATCH_ITEMS:
        raise Problem(
            "payload-too-large",
            f"The batch has {len(batch.touchpoints):,} touchpoints; the limit is "
            f"{MAX_BATCH_ITEMS:,} per request.",
        )
    items = [ingest.decode_item(i, raw) for i, raw in enumerate(batch.touchpoints)]
    received_at = datetime.now(UTC)

    accepted = 0

    async def work(conn: TenantConn) -> tuple[int, bytes]:
        nonlocal accepted
        results = await ingest.record(
            conn,
            items,
            received_at,
            principal.tenant.schema,
            usage_period=usage.period if usage else None,
        )
        counts = Counter(result.status for result in results)
        accepted = counts["accepted"]
        return 200, _encode(
            BatchResult(
                object="touchpoint_batch",
                accepted=counts["accepted"],
                duplicate=counts["duplicate"],
                rejected=counts["rejected"],
                results=results,
            )
        )

    response = await idempotent_json(
        request,
        state.db,
        principal.tenant,
        "POST /v1/touchpoints/batch",
        body,
        work,
        generic_plans=True,
    )
    if usage is not None:
        await usage.settle(accepted)
    return response


touchpoint_routes = [record_touchpoint, record_batch]
