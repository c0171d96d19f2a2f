"""``POST /_bench/echo``: decode a touchpoint batch exactly as ingest does, and send it back.

Only served with ``SJAAK_BENCH_ECHO=true``: ``make bench`` compares ingest with it to measure the
framework's ceiling on the same server in the same run.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import MediaType, Request, Response, post

from api.touchpoints import ingest
from api.touchpoints.routes import read_body
from api.touchpoints.schemas import MAX_BATCH_BYTES, ItemResult

_encode = msgspec.json.Encoder().encode


class _Envelope(msgspec.Struct):
    touchpoints: list[msgspec.Raw]


_decoder = msgspec.json.Decoder(_Envelope)


@post("/_bench/echo", opt={"public": True}, include_in_schema=False, status_code=200)
async def echo(request: Request[Any, Any, Any]) -> Response[bytes]:
    body = await read_body(request, MAX_BATCH_BYTES)
    batch = _decoder.decode(body)
    items = [ingest.decode_item(i, raw) for i, raw in enumerate(batch.touchpoints)]
    valid = [item for item in items if not isinstance(item, ItemResult)]
    return Response(_encode({"touchpoints": valid}), media_type=MediaType.JSON)
