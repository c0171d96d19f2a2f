"""Token-bucket rate limits: the math on a fake clock, headers, bounded memory, and Redis sharing.

The Redis tests use ``TEST_REDIS_URL`` or a local Redis (database 15), and are skipped when
neither answers, so a fresh machine without Redis still runs the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from api.auth.rate_limit import (
    KEY_PREFIX,
    Bucket,
    Decision,
    InProcessRateLimiter,
    RateLimit,
    RedisRateLimiter,
    build_rate_limiter,
    rate_limit_headers,
    take,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> InProcessRateLimiter:
    return InProcessRateLimiter(clock)


# --- the bucket math ---------------------------------------------------------------------------


async def test_the_burst_is_consumed_then_hits_are_denied(limiter: InProcessRateLimiter) -> None:
    limit = RateLimit(per_second=1.0, burst=3)
    decisions = [await limiter.hit("k", limit) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert [d.limit for d in decisions] == [3, 3, 3, 3]
    assert [d.retry_after_seconds for d in decisions] == [0, 0, 0, 1]
    assert [d.reset_seconds for d in decisions] == [1, 2, 3, 3]


async def test_tokens_refill_over_time(limiter: InProcessRateLimiter, clock: FakeClock) -> None:
    limit = RateLimit(per_second=2.0, burst=4)
    for _ in range(4):
        assert (await limiter.hit("k", limit)).allowed
    assert not (await limiter.hit("k", limit)).allowed
    clock.advance(0.5)  # one token
    decision = await limiter.hit("k", limit)
    assert decision.allowed
    assert decision.remaining == 0
    clock.advance(1.0)  # two tokens
    assert (await limiter.hit("k", limit)).remaining == 1
    clock.advance(3600)  # capped at burst
    assert (await limiter.hit("k", limit)).remaining == 3


async def test_a_denial_says_when_to_retry(limiter: InProcessRateLimiter, clock: FakeClock) -> None:
    limit = RateLimit(per_second=0.5, burst=2)
    await limiter.hit("k", limit)
    await limiter.hit("k", limit)
    denied = await limiter.hit("k", limit)
    assert denied == Decision(
        allowed=False, limit=2, remaining=0, reset_seconds=4, retry_after_seconds=2
    )
    clock.advance(1.0)  # half a token: one more second to go, rounded up
    denied = await limiter.hit("k", limit)
    assert denied.retry_after_seconds == 2 - 1
    clock.advance(0.9)  # a tenth of a second left, still reported as at least one
    assert (await limiter.hit("k", limit)).retry_after_seconds == 1
    clock.advance(0.1)
    assert (await limiter.hit("k", limit)).allowed


async def test_a_denied_hit_consumes_nothing(
    limiter: InProcessRateLimiter, clock: FakeClock
) -> None:
    limit = RateLimit(per_second=1.0, burst=1)
    assert (await limiter.hit("k", limit)).allowed
    for _ in range(5):
        clock.advance(0.1)
        assert not (await limiter.hit("k", limit)).allowed
    clock.advance(0.5)  # 1.0 s since the only allowed hit: the denials took nothing
    assert (await limiter.hit("k", limit)).allowed


async def test_a_cost_above_burst_is_always_denied(limiter: InProcessRateLimiter) -> None:
    limit = RateLimit(per_second=1.0, burst=5)
    denied = await limiter.hit("k", limit, cost=6)
    assert not denied.allowed
    assert denied.remaining == 0
    assert denied.retry_after_seconds >= 1
    # ...and it took nothing from the full bucket.
    assert (await limiter.hit("k", limit, cost=5)).allowed


async def test_cost_takes_that_many_tokens(limiter: InProcessRateLimiter) -> None:
    limit = RateLimit(per_second=1.0, burst=5)
    assert (await limiter.hit("k", limit, cost=3)).remaining == 2
    denied = await limiter.hit("k", limit, cost=3)
    assert not denied.allowed
    assert denied.retry_after_seconds == 1  # one token short
    assert (await limiter.hit("k", limit, cost=2)).remaining == 0


async def test_keys_have_separate_buckets(limiter: InProcessRateLimiter) -> None:
    limit = RateLimit(per_second=1.0, burst=1)
    assert (await limiter.hit("a", limit)).allowed
    assert not (await limiter.hit("a", limit)).allowed
    assert (await limiter.hit("b", limit)).allowed


def test_take_is_pure() -> None:
    limit = RateLimit(per_second=1.0, burst=2)
    decision, bucket = take(None, limit, 1, now=50.0)
    assert decision.allowed
    assert bucket == Bucket(tokens=1.0, updated=50.0)
    decision, after = take(bucket, limit, 2, now=50.5)
    assert not decision.allowed
    assert after == Bucket(tokens=1.5, updated=50.5)  # refilled only: same state as before
    assert take(bucket, limit, 2, now=51.0)[0].allowed


def test_a_clock_going_backwards_refills_nothing() -> None:
    limit = RateLimit(per_second=1.0, burst=2)
    decision, bucket = take(Bucket(tokens=1.0, updated=100.0), limit, 1, now=90.0)
    assert decision.allowed
    assert bucket.tokens == 0.0


def test_float_refill_reaches_whole_tokens() -> None:
    # A clock summed from 0.1 s steps reads a hair under 10 s; at 0.1/s that is still a token.
    ten_seconds = sum([0.1] * 100)
    assert ten_seconds < 10.0
    limit = RateLimit(per_second=0.1, burst=1)
    assert take(Bucket(tokens=0.0, updated=0.0), limit, 1, now=ten_seconds)[0].allowed
    decision = take(Bucket(tokens=0.0, updated=0.0), limit, 0, now=ten_seconds)[0]
    assert decision.remaining == 1
    assert decision.reset_seconds == 0


def test_bad_limits_and_costs_are_refused() -> None:
    with pytest.raises(ValueError, match="per_second"):
        RateLimit(per_second=0, burst=1)
    with pytest.raises(ValueError, match="per_second"):
        RateLimit(per_second=float("inf"), burst=1)
    with pytest.raises(ValueError, match="burst"):
        RateLimit(per_second=1, burst=0)
    with pytest.raises(ValueError, match="cost"):
        take(None, RateLimit(per_second=1, burst=1), -1, now=0.0)


# --- headers -----------------------------------------------------------------------------------


def test_headers_of_an_allowed_hit() -> None:
    decision = Decision(allowed=True, limit=10, remaining=7, reset_seconds=3, retry_after_seconds=0)
    assert rate_limit_headers(decision) == {
        "RateLimit-Limit": "10",
        "RateLimit-Remaining": "7",
        "RateLimit-Reset": "3",
    }


def test_headers_of_a_denied_hit_add_retry_after() -> None:
    decision = Decision(
        allowed=False, limit=10, remaining=0, reset_seconds=20, retry_after_seconds=2
    )
    assert rate_limit_headers(decision) == {
        "RateLimit-Limit": "10",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "20",
        "Retry-After": "2",
    }


# --- bounded memory ----------------------------------------------------------------------------


async def test_the_least_recently_hit_bucket_goes_beyond_the_cap(clock: FakeClock) -> None:
    limiter = InProcessRateLimiter(clock, max_buckets=3)
    limit = RateLimit(per_second=0.001, burst=1)
    for key in ("a", "b", "c"):
        await limiter.hit(key, limit)
    await limiter.hit("d", limit)
    assert len(limiter) == 3
    assert (await limiter.hit("a", limit)).allowed  # evicted, so a full bucket again
    assert not (await limiter.hit("c", limit)).allowed  # kept
    for n in range(1000):
        await limiter.hit(f"many-{n}", limit)
    assert len(limiter) == 3


async def test_full_buckets_are_swept(clock: FakeClock) -> None:
    limiter = InProcessRateLimiter(clock, sweep_interval=60.0)
    quick = RateLimit(per_second=1.0, burst=5)  # full again 1 s after a hit
    slow = RateLimit(per_second=0.001, burst=5)  # full again 1000 s after a hit
    for n in range(100):
        await limiter.hit(f"quick-{n}", quick)
    await limiter.hit("slow", slow)
    assert len(limiter) == 101
    clock.advance(61)
    await limiter.hit("slow", slow)
    assert len(limiter) == 1
    assert (await limiter.hit("slow", slow)).remaining == 2  # the slow bucket kept its state


async def test_build_picks_the_limiter() -> None:
    assert isinstance(build_rate_limiter(None), InProcessRateLimiter)
    assert isinstance(build_rate_limiter(""), InProcessRateLimiter)
    shared = build_rate_limiter("redis://127.0.0.1:1/0")
    assert isinstance(shared, RedisRateLimiter)
    await shared.close()


# --- Redis -------------------------------------------------------------------------------------

RUN = uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
async def redis_url() -> str:
    url = os.environ.get("TEST_REDIS_URL") or "redis://127.0.0.1:6379/15"
    client = aioredis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        async with asyncio.timeout(0.5):
            await client.ping()
    except (OSError, TimeoutError, aioredis.RedisError) as exc:
        pytest.skip(
            f"no Redis answering at {url} (set TEST_REDIS_URL): {type(exc).__name__}: {exc}"
        )
    finally:
        await client.aclose()
    return url


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client, to look at what the limiter stored; removes this run's keys after."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{KEY_PREFIX}test-{RUN}-*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def key() -> str:
    return f"test-{RUN}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def two_limiters(redis_url: str) -> AsyncIterator[tuple[RedisRateLimiter, RedisRateLimiter]]:
    """Two limiters with their own connections, like two worker processes."""
    first, second = RedisRateLimiter(redis_url), RedisRateLimiter(redis_url)
    yield first, second
    await first.close()
    await second.close()


async def test_redis_limiters_share_one_bucket(
    two_limiters: tuple[RedisRateLimiter, RedisRateLimiter], raw: aioredis.Redis, key: str
) -> None:
    first, second = two_limiters
    limit = RateLimit(per_second=0.001, burst=3)  # a token per 1000 s: no refill during the test
    assert (await first.hit(key, limit)).remaining == 2
    assert (await second.hit(key, limit)).remaining == 1
    assert (await first.hit(key, limit)).remaining == 0
    denied = await second.hit(key, limit)
    assert not denied.allowed
    assert denied.remaining == 0
    assert 990 <= denied.retry_after_seconds <= 1000
    assert 2990 <= denied.reset_seconds <= 3000
    assert not (await first.hit(key, limit)).allowed
    assert (await first.hit(f"{key}-other", limit)).allowed  # other keys are untouched


async def test_redis_buckets_are_prefixed_and_expire(
    two_limiters: tuple[RedisRateLimiter, RedisRateLimiter], raw: aioredis.Redis, key: str
) -> None:
    limit = RateLimit(per_second=10.0, burst=5)
    await two_limiters[0].hit(key, limit, cost=2)
    # Full again 0.2 s later; the hash lives that long plus a second of slack.
    ttl = await raw.pttl(KEY_PREFIX + key)
    assert 0 < ttl <= 1200
    assert float(await raw.hget(KEY_PREFIX + key, "tokens") or "nan") == pytest.approx(3, abs=0.1)


async def test_redis_refills_by_the_same_math(
    two_limiters: tuple[RedisRateLimiter, RedisRateLimiter], raw: aioredis.Redis, key: str
) -> None:
    first, second = two_limiters
    limit = RateLimit(per_second=1.0, burst=4)
    assert (await first.hit(key, limit, cost=4)).remaining == 0
    assert not (await second.hit(key, limit)).allowed
    # Instead of sleeping, move the bucket's last update 2.5 s into the past: 2.5 tokens back.
    updated = float(await raw.hget(KEY_PREFIX + key, "updated") or "nan")
    await raw.hset(KEY_PREFIX + key, "updated", repr(updated - 2.5))
    decision = await second.hit(key, limit)
    assert decision.allowed
    assert decision.remaining == 1
    assert decision.reset_seconds == 3  # 2.5 tokens short, rounded up
    denied = await first.hit(key, limit, cost=2)
    assert not denied.allowed
    assert denied.retry_after_seconds == 1  # half a token short


async def test_redis_denials_consume_and_store_nothing(
    two_limiters: tuple[RedisRateLimiter, RedisRateLimiter], raw: aioredis.Redis, key: str
) -> None:
    limiter = two_limiters[0]
    limit = RateLimit(per_second=0.001, burst=2)
    denied = await limiter.hit(key, limit, cost=3)
    assert not denied.allowed
    assert denied.retry_after_seconds >= 1
    assert await raw.exists(KEY_PREFIX + key) == 0
    assert (await limiter.hit(key, limit, cost=2)).allowed
    tokens = await raw.hget(KEY_PREFIX + key, "tokens")
    for _ in range(3):
        assert not (await limiter.hit(key, limit)).allowed
    assert await raw.hget(KEY_PREFIX + key, "tokens") == tokens


async def test_an_unreachable_redis_fails_open_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = RedisRateLimiter("redis://127.0.0.1:1/0")
    limit = RateLimit(per_second=1.0, burst=3)
    try:
        with caplog.at_level(logging.WARNING, logger="sjaak.rate_limit"):
            decisions = [await limiter.hit("k", limit) for _ in range(5)]
    finally:
        await limiter.close()
    assert all(
        d == Decision(allowed=True, limit=3, remaining=3, reset_seconds=0, retry_after_seconds=0)
        for d in decisions
    )
    warnings = [r for r in caplog.records if r.name == "sjaak.rate_limit"]
    assert len(warnings) == 1
    assert "Redis" in warnings[0].getMessage()
