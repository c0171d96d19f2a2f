"""A small HTTP/1.1 load generator: keep-alive connections on loopback, closed-loop.

Written on raw asyncio streams rather than an HTTP client library so the generator itself costs
as little CPU as possible: on a 2-core machine it shares the cores with the server under test.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from bench.common import percentile


@dataclass(frozen=True)
class Scenario:
    name: str
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: Work items per request (touchpoints in a batch), for throughput in items per second.
    items_per_request: int = 1
    expect_status: int = 200

    def request_bytes(self, host: str) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        if self.body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


@dataclass(frozen=True)
class LoadResult:
    scenario: str
    connections: int
    seconds: float
    requests: int
    unexpected: int
    requests_per_second: float
    items_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


class UnexpectedResponse(Exception):
    pass


async def _one_connection(
    host: str, port: int, request: bytes, deadline: float, latencies: list[float], bad: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = _content_length(head)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            bad.append(int(head[9:12]))
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
    request = scenario.request_bytes(f"{host}:{port}")
    if warmup > 0:
        await asyncio.gather(
            *(
                _one_connection(host, port, request, time.perf_counter() + warmup, [], [])
                for _ in range(connections)
            )
        )
    latencies: list[float] = []
    statuses: list[int] = []
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(
        *(
            _one_connection(host, port, request, deadline, latencies, statuses)
            for _ in range(connections)
        )
    )
    elapsed = time.perf_counter() - started
    unexpected = sum(1 for status in statuses if status != scenario.expect_status)
    milliseconds = sorted(value * 1000 for value in latencies)
    return LoadResult(
        scenario=scenario.name,
        connections=connections,
        seconds=round(elapsed, 3),
        requests=len(latencies),
        unexpected=unexpected,
        requests_per_second=round(len(latencies) / elapsed, 1),
        items_per_second=round(len(latencies) * scenario.items_per_request / elapsed, 1),
        p50_ms=round(percentile(milliseconds, 0.50), 3),
        p95_ms=round(percentile(milliseconds, 0.95), 3),
        p99_ms=round(percentile(milliseconds, 0.99), 3),
    )
