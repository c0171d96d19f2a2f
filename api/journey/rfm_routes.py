"""RFM over HTTP: the report (``GET /v1/analytics/rfm``, ``analytics:read``), a computation on
demand (``POST /v1/analytics/rfm/recompute``, ``config:write``) and the shop's RFM settings
(``GET``/``PUT /v1/config/rfm``: reading needs ``analytics:read``, replacing ``config:write``)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post, put
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec

from api.auth.guards import principal_of
from api.db import TenantConn, in_tenant
from api.errors import problem_responses
from api.idempotency import idempotent_json
from api.journey import rfm
from api.journey.rfm import RfmReport, RfmSettings, RfmSettingsIn
from api.touchpoints.routes import read_body

READ = {"scopes": ("analytics:read",)}
WRITE = {"scopes": ("config:write",)}
REPORT_PATH = "/v1/analytics/rfm"
CONFIG_PATH = "/v1/config/rfm"
#: The settings are two small fields; this is generous.
MAX_SETTINGS_BYTES = 4096

_encode = msgspec.json.Encoder().encode


class RfmController(Controller):
    path = REPORT_PATH
    tags = ["analytics"]

    @get(
        "/",
        operation_id="getRfmReport",
        summary="Get the RFM report",
        opt=READ,
        responses=problem_responses(401, 403, 429),
    )
    async def get_report(self, state: State, request: Request[Any, Any, Any]) -> RfmReport:
        """The shop's customers by RFM segment, from the latest computation: how many are in each
        segment and their share, the revenue of each segment in the window and its share, and
        how customers moved between segments since the computation before it.

        Recency, frequency and monetary are each scored 1 to 5 by quintile within the shop
        (5 the best: most recent purchase, most orders and highest spend in the window); the
        segment follows from recency and frequency. Only customers with a purchase are scored.
        Computations run on a schedule and on demand; before the first one the report is empty,
        with `computed_at` null (never a 404)."""
        return await in_tenant(state.db, principal_of(request).tenant, rfm.get_report)

    @post(
        "/recompute",
        operation_id="recomputeRfm",
        summary="Recompute RFM scores now",
        status_code=200,
        opt=WRITE,
        responses={
            200: ResponseSpec(
                data_container=RfmReport,
                description="The report after the computation.",
                generate_examples=False,
            ),
            **problem_responses(401, 403, 409, 422, 429),
        },
    )
    async def recompute(self, state: State, request: Request[Any, Any, Any]) -> Response[bytes]:
        """Score every customer now and answer with the new report. When nothing changed since
        the latest computation (same day, same settings, no purchase, refund, merge or erasure
        since), that computation stays in force and is answered again (same `computed_at`),
        so the movement keeps comparing real changes. A computation already running for the
        shop is waited for a few seconds, then answered with a 409 and `Retry-After`. In a large
        shop a computation can take a while. No body is read. Send an `Idempotency-Key` to
        retry safely."""
        principal = principal_of(request)

        async def work(conn: TenantConn) -> tuple[int, bytes]:
            done = await rfm.recompute(conn, trigger="request")
            return 200, _encode(done.report)

        return await idempotent_json(
            request, state.db, principal.tenant, f"POST {REPORT_PATH}/recompute", b"", work
        )


class RfmConfigController(Controller):
    path = CONFIG_PATH
    tags = ["analytics"]

    @get(
        "/",
        operation_id="getRfmSettings",
        summary="Get the RFM settings",
        opt=READ,
        responses=problem_responses(401, 403, 429),
    )
    async def get_settings(self, state: State, request: Request[Any, Any, Any]) -> RfmSettings:
        """The window of frequency and monetary (`window_days`, default 365) and the currency of
        monetary (`currency`; `null`, the default: the currency with the most revenue in the
        shop at each computation, EUR while there is none)."""
        return await in_tenant(state.db, principal_of(request).tenant, rfm.get_settings)

    @put(
        "/",
        operation_id="replaceRfmSettings",
        summary="Replace the RFM settings",
        opt={**WRITE, "request_body": RfmSettingsIn},
        request_max_body_size=MAX_SETTINGS_BYTES * 2,
        responses=problem_responses(400, 401, 403, 413, 422, 429),
    )
    async def replace_settings(self, state: State, request: Request[Any, Any, Any]) -> RfmSettings:
        """Replace the settings whole (an absent field takes its default): `window_days` 1 to
        3650, `currency` an ISO 4217 code or `null`. A failing field is reported with its JSON
        path. Scores change at the next computation (scheduled, or `recomputeRfm`)."""
        principal = principal_of(request)
        settings = rfm.parse_settings(await read_body(request, MAX_SETTINGS_BYTES))

        async def work(conn: TenantConn) -> RfmSettings:
            return await rfm.save_settings(conn, settings, principal.credential_id)

        return await in_tenant(state.db, principal.tenant, work)


rfm_routes: list[type[Controller]] = [RfmController, RfmConfigController]
