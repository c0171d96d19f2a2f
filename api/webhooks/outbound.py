"""One signed POST to a shop's endpoint, through the SSRF guard, pinned to the checked address.

The URL is checked and its name resolved here, at the moment of sending (DNS may have changed
since the endpoint was saved); the connection then goes to a checked address while the request
keeps the URL's name in ``Host`` and in TLS (SNI and certificate check), so no second DNS answer
is ever used. Redirects are answered, never followed; proxies from the environment are ignored;
every phase has a timeout and the whole attempt a deadline; at most a small excerpt of the answer
is read.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass

import certifi
import httpx

from api.webhooks.ssrf import IPAddress, Target, UnsafeUrl, check_url, resolve

#: Per phase: connecting (each address), sending the body, waiting for each read.
TIMEOUT = httpx.Timeout(connect=5.0, write=10.0, read=10.0, pool=5.0)
#: The whole attempt, DNS included, however slowly a receiver drips its answer.
DEADLINE_SECONDS = 20.0
#: How much of an answer is kept (and read).
EXCERPT_BYTES = 2048
#: Addresses tried, in the resolver's order, when connecting to one fails.
MAX_ADDRESSES = 3
USER_AGENT = "Sjaak-Webhooks/1.0"

_TLS = ssl.create_default_context(cafile=certifi.where())


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: an HTTP answer (``status``), or an ``error`` before one."""

    status: int | None
    body: str | None
    error: str | None
    duration_ms: int
    address: str | None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


async def post(
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    allow_http: bool,
    allow_loopback: bool,
    tls: ssl.SSLContext = _TLS,
) -> Outcome:
    """POST ``body`` to ``url`` if the SSRF guard lets it; never raises for network trouble.
    ``tls`` verifies the server (the public CAs; tests bring their own)."""
    started = time.perf_counter()

    def elapsed() -> int:
        return round((time.perf_counter() - started) * 1000)

    try:
        async with asyncio.timeout(DEADLINE_SECONDS):
            try:
                target = check_url(url, allow_http=allow_http, allow_loopback=allow_loopback)
                addresses = await resolve(target, allow_loopback=allow_loopback)
            except UnsafeUrl as exc:
                return Outcome(None, None, f"refused: the URL {exc}", elapsed(), None)
            error = "no address to connect to"
            for address in addresses[:MAX_ADDRESSES]:
                try:
                    status, excerpt = await _post_to(target, address, headers, body, tls)
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    error = _describe(exc)
                    continue
                except httpx.HTTPError as exc:
                    return Outcome(None, None, _describe(exc), elapsed(), str(address))
                return Outcome(status, excerpt, _status_error(status), elapsed(), str(address))
            return Outcome(None, None, error, elapsed(), str(addresses[0]))
    except TimeoutError:
        return Outcome(None, None, f"no answer within {DEADLINE_SECONDS:g} s", elapsed(), None)


async def _post_to(
    target: Target,
    address: IPAddress,
    headers: Mapping[str, str],
    body: bytes,
    tls: ssl.SSLContext,
) -> tuple[int, str]:
    url = httpx.URL(target.url).copy_with(host=address.compressed)
    # The name stays in TLS: SNI and the certificate check use it, not the address.
    extensions = {"sni_hostname": target.host} if target.address is None else {}
    async with httpx.AsyncClient(
        verify=tls,
        timeout=TIMEOUT,
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_keepalive_connections=0),
    ) as client:
        request = client.build_request(
            "POST",
            url,
            headers={
                **headers,
                "Host": target.host_header,
                "User-Agent": USER_AGENT,
                # Raw bytes only: a compressed answer could expand without bound.
                "Accept-Encoding": "identity",
            },
            content=body,
            extensions=extensions,
        )
        response = await client.send(request, stream=True)
        try:
            excerpt = await _excerpt(response)
        finally:
            await response.aclose()
    location = response.headers.get("location")
    if 300 <= response.status_code < 400 and location:
        excerpt = f"[Location: {location[:500]}]\n{excerpt}"
    return response.status_code, excerpt


async def _excerpt(response: httpx.Response) -> str:
    data = b""
    async for chunk in response.aiter_raw():
        data += chunk
        if len(data) >= EXCERPT_BYTES:
            break
    # PostgreSQL text cannot hold NUL.
    return data[:EXCERPT_BYTES].decode("utf-8", "replace").replace("\x00", "\ufffd")


def _status_error(status: int) -> str | None:
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return f"HTTP {status}: redirects are not followed; point the endpoint at the final URL"
    return f"HTTP {status}"


def _describe(exc: httpx.HTTPError) -> str:
    detail = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {detail}"[:500]
