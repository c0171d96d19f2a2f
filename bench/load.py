"""A small HTTP/1.1 load generator: keep-alive connections on loopback, closed-loop.

Written on raw asyncio streams rather than an HTTP client library so the generator itself costs
as little CPU as possible: on a 2-core machine it shares the cores with the server under test.

A scenario sends the same request over and over, or asks a factory for the next body or path
(new touchpoint ids, different customers). Factories run in the generator, on the same cores as
the server, so they must be cheap: stamp a counter into pre-encoded bytes, pick from a list.
Their time is not part of the measured latency.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.common import percentile

#: The next request body, or the next path (with its query string).
BodyFactory = Callable[[], bytes]
PathFactory = Callable[[], str]
RequestFactory = Callable[[], bytes]

#: How much of an unexpected response to keep, to say what went wrong.
SAMPLE_BYTES = 300


@dataclass(frozen=True)
class Scenario:
    name: str
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: Called once per request for its body instead of sending ``body`` every time.
    body_factory: BodyFactory | None = None
    #: Called once per request for its path instead of requesting ``path`` every time.
    path_factory: PathFactory | None = None
    #: Work items per request (touchpoints in a batch), for throughput in items per second.
    items_per_request: int = 1
    expect_status: int = 200
    #: Connections for this scenario, instead of the run's default (fewer for big batches).
    connections: int | None = None
    #: A short name for ``--only`` (scenario names contain commas); defaults to ``name``.
    key: str = ""

    def request_bytes(self, host: str, path: str | None = None, body: bytes | None = None) -> bytes:
        body = self.body if body is None else body
        lines = [f"{self.method} {self.path if path is None else path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        if body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def request_factory(self, host: str) -> RequestFactory:
        """The next request's bytes; the same bytes each time when there is no factory."""
        if self.body_factory is None and self.path_factory is None:
            fixed = self.request_bytes(host)
            return lambda: fixed
        # Everything after the request line, but the length and the body, is fixed: build it once.
        fields = [f"Host: {host}", *(f"{name}: {value}" for name, value in self.headers.items())]
        middle = (" HTTP/1.1\r\n" + "\r\n".join(fields) + "\r\n").encode()
        start = f"{self.method} ".encode()
        with_length = self.body_factory is not None or self.method in ("POST", "PUT", "PATCH")
        next_body = self.body_factory or (lambda: self.body)
        fixed_path = self.path.encode()

        def next_request() -> bytes:
            path = fixed_path if self.path_factory is None else self.path_factory().encode()
            body = next_body()
            length = b"Content-Length: %d\r\n" % len(body) if with_length or body else b""
            return b"".join((start, path, middle, length, b"\r\n", body))

        return next_request


@dataclass(frozen=True)
class LoadResult:
    scenario: str
    key: str
    connections: int
    seconds: float
    requests: int
    #: Answers with another status than the scenario expects.
    unexpected: int
    #: Connections that failed (refused, reset, closed mid-answer); each is reopened.
    errors: int
    requests_per_second: float
    items_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    #: Every status seen, with its count (as strings, for JSON).
    statuses: dict[str, int] = field(default_factory=dict)
    #: The start of the first unexpected answer's body per status, to tell what went wrong.
    samples: dict[str, str] = field(default_factory=dict)


class UnexpectedResponse(Exception):
    pass


@dataclass
class _Tally:
    expect_status: int
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    samples: dict[int, bytes] = field(default_factory=dict)
    errors: int = 0


async def _one_connection(
    host: str, port: int, next_request: RequestFactory, deadline: float, tally: _Tally
) -> None:
    """Closed loop on one keep-alive connection until ``deadline``; reconnects after a failure."""
    while time.perf_counter() < deadline:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            tally.errors += 1
            await asyncio.sleep(0.05)
            continue
        try:
            while time.perf_counter() < deadline:
                request = next_request()
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                body = await reader.readexactly(_content_length(head))
                tally.latencies.append(time.perf_counter() - started)
                status = int(head[9:12])
                tally.statuses[status] += 1
                if status != tally.expect_status:
                    tally.samples.setdefault(status, body[:SAMPLE_BYTES])
                    if b"\r\nconnection: close" in head.lower():
                        break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            tally.errors += 1
        finally:
            writer.close()


def _content_length(head: bytes) -> int:
    lower = head.lower()
    index = lower.find(b"\r\ncontent-length:")
    if index < 0:
        raise UnexpectedResponse(f"no content-length in {head[:200]!r}")
    end = lower.find(b"\r\n", index + 2)
    return int(lower[index + 17 : end])


async def run_load(
    host: str, port: int, scenario: Scenario, *, connections: int, seconds: float, warmup: float
) -> LoadResult:
    """Closed-loop load: each connection sends its next request as soon as the last answered."""
    next_request = scenario.request_factory(f"{host}:{port}")
    if warmup > 0:
        discarded = _Tally(scenario.expect_status)
        warm_until = time.perf_counter() + warmup
        await asyncio.gather(
            *(
                _one_connection(host, port, next_request, warm_until, discarded)
                for _ in range(connections)
            )
        )
    tally = _Tally(scenario.expect_status)
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(
        *(_one_connection(host, port, next_request, deadline, tally) for _ in range(connections))
    )
    elapsed = time.perf_counter() - started
    return summarize(
        scenario.name,
        scenario.key or scenario.name,
        connections=connections,
        elapsed=elapsed,
        latencies=tally.latencies,
        items_per_request=scenario.items_per_request,
        unexpected=sum(
            n for status, n in tally.statuses.items() if status != scenario.expect_status
        ),
        errors=tally.errors,
        statuses={str(status): n for status, n in sorted(tally.statuses.items())},
        samples={
            str(status): sample.decode(errors="replace") for status, sample in tally.samples.items()
        },
    )


def summarize(
    name: str,
    key: str,
    *,
    connections: int,
    elapsed: float,
    latencies: list[float],
    items_per_request: int,
    unexpected: int = 0,
    errors: int = 0,
    statuses: dict[str, int] | None = None,
    samples: dict[str, str] | None = None,
) -> LoadResult:
    """Throughput and latency percentiles of one timed window (latencies in seconds)."""
    milliseconds = sorted(value * 1000 for value in latencies) or [0.0]
    return LoadResult(
        scenario=name,
        key=key,
        connections=connections,
        seconds=round(elapsed, 3),
        requests=len(latencies),
        unexpected=unexpected,
        errors=errors,
        requests_per_second=round(len(latencies) / elapsed, 1),
        items_per_second=round(len(latencies) * items_per_request / elapsed, 1),
        p50_ms=round(percentile(milliseconds, 0.50), 3),
        p95_ms=round(percentile(milliseconds, 0.95), 3),
        p99_ms=round(percentile(milliseconds, 0.99), 3),
        statuses=statuses or {},
        samples=samples or {},
    )
