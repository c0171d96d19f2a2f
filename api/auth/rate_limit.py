"""Token-bucket rate limits: per process by default, shared through Redis with ``SJAAK_REDIS_URL``.

A bucket holds up to ``burst`` tokens and refills at ``per_second``; a hit of ``cost`` tokens is
allowed when that many are there. A denied hit takes nothing, and a hit costing more than ``burst``
is always denied. The math lives in :func:`take`, which :class:`InProcessRateLimiter` calls and the
Lua script of :class:`RedisRateLimiter` mirrors; both turn its outcome into a :class:`Decision`
with the same function, so the two limiters answer alike.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger("sjaak.rate_limit")

#: Float refill (0.1 per second for 10 s) may land a hair below a whole token; count it as there.
_EPSILON = 1e-9


class RateLimit(msgspec.Struct, frozen=True):
    """A bucket of ``burst`` tokens that refills at ``per_second`` tokens per second."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.per_second > 0 and math.isfinite(self.per_second)):
            raise ValueError(f"per_second must be a positive finite number, got {self.per_second}")
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst}")


class Decision(msgspec.Struct, frozen=True):
    """The outcome of one hit, in whole seconds and tokens, ready for response headers."""

    allowed: bool
    #: The bucket's capacity, ``burst``.
    limit: int
    #: Whole tokens left after this hit; 0 when denied.
    remaining: int
    #: Seconds until the bucket is full again (rounded up, >= 0).
    reset_seconds: int
    #: When denied, seconds until this hit's cost is available (rounded up, >= 1); 0 when allowed.
    retry_after_seconds: int


class Bucket(msgspec.Struct, frozen=True):
    """Stored state of one bucket: ``tokens`` as of ``updated`` (seconds on the limiter's clock)."""

    tokens: float
    updated: float


def take(bucket: Bucket | None, limit: RateLimit, cost: int, now: float) -> tuple[Decision, Bucket]:
    """Refill ``bucket`` (``None``: a new, full one) up to ``now`` and try to take ``cost`` tokens.

    Returns the decision and the bucket to store. A denied hit returns the bucket merely refilled,
    which is the same state as the one given, so callers need not store it. A clock that went
    backwards refills nothing rather than draining the bucket.
    """
    if cost < 0:
        raise ValueError(f"cost must be >= 0, got {cost}")
    if bucket is None:
        tokens = float(limit.burst)
    else:
        elapsed = max(0.0, now - bucket.updated)
        tokens = min(float(limit.burst), bucket.tokens + elapsed * limit.per_second)
    allowed = cost <= limit.burst and tokens + _EPSILON >= cost
    if allowed:
        tokens = max(0.0, tokens - cost)
    return decide(allowed, tokens, limit, cost), Bucket(tokens, now)


def decide(allowed: bool, tokens: float, limit: RateLimit, cost: int) -> Decision:
    """The decision for a hit, given the tokens the bucket holds after it."""
    if allowed:
        remaining = math.floor(tokens + _EPSILON)
        retry_after = 0
    else:
        remaining = 0
        # More than burst can never be taken; the best advice is to wait for a full bucket.
        missing = min(cost, limit.burst) - tokens
        retry_after = max(1, math.ceil(missing / limit.per_second))
    return Decision(
        allowed=allowed,
        limit=limit.burst,
        remaining=remaining,
        reset_seconds=max(0, math.ceil(seconds_until_full(tokens, limit) - _EPSILON)),
        retry_after_seconds=retry_after,
    )


def seconds_until_full(tokens: float, limit: RateLimit) -> float:
    """How long a bucket holding ``tokens`` takes to refill to ``burst``."""
    return max(0.0, limit.burst - tokens) / limit.per_second


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    """RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset (IETF draft httpapi-ratelimit-headers,
    delta seconds), plus Retry-After when denied."""
    headers = {
        "RateLimit-Limit": str(decision.limit),
        "RateLimit-Remaining": str(decision.remaining),
        "RateLimit-Reset": str(decision.reset_seconds),
    }
    if not decision.allowed:
        headers["Retry-After"] = str(decision.retry_after_seconds)
    return headers


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: RateLimit, cost: int = 1) -> Decision: ...

    async def close(self) -> None: ...


class InProcessRateLimiter:
    """Buckets in a dict of this process: each worker process limits on its own.

    Memory stays bounded: every ``sweep_interval`` seconds, buckets that have refilled to full are
    dropped (a missing bucket is a full one, so nothing changes), and beyond ``max_buckets`` the
    least recently hit bucket goes, which at worst forgives that key a partly used bucket.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_buckets: int = 100_000,
        sweep_interval: float = 60.0,
    ) -> None:
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be >= 1, got {max_buckets}")
        self._clock = clock
        self._max_buckets = max_buckets
        self._sweep_interval = sweep_interval
        # Insertion order is hit order (each hit re-inserts its key), so the first key is the
        # least recently hit. The float is when the bucket is full again.
        self._buckets: dict[str, tuple[Bucket, float]] = {}
        self._next_sweep = clock() + sweep_interval

    def __len__(self) -> int:
        return len(self._buckets)

    async def hit(self, key: str, limit: RateLimit, cost: int = 1) -> Decision:
        # No await in here: on one event loop the read-modify-write of a bucket is atomic.
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        entry = self._buckets.get(key)
        decision, bucket = take(entry[0] if entry else None, limit, cost, now)
        if decision.allowed:
            self._buckets.pop(key, None)
            self._buckets[key] = (bucket, now + seconds_until_full(bucket.tokens, limit))
            if len(self._buckets) > self._max_buckets:
                del self._buckets[next(iter(self._buckets))]
        return decision

    def _sweep(self, now: float) -> None:
        self._buckets = {k: v for k, v in self._buckets.items() if v[1] > now}
        self._next_sweep = now + self._sweep_interval

    async def close(self) -> None:
        self._buckets.clear()


KEY_PREFIX = "sjaak:rl:"

# Mirrors take(): KEYS[1] is the bucket hash, ARGV is per_second, burst, cost. Redis's own clock
# (TIME) is used so that workers whose clocks disagree still share one bucket correctly. Only an
# allowed hit writes; the hash expires once the bucket would be full again, which is the same as
# it missing. Floats are returned as strings because Redis truncates Lua numbers to integers.
_LUA_TAKE = f"""
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = burst
if state[1] and state[2] then
  local elapsed = math.max(0, now - tonumber(state[2]))
  tokens = math.min(burst, tonumber(state[1]) + elapsed * rate)
end
local allowed = 0
if cost <= burst and tokens + {_EPSILON!r} >= cost then
  allowed = 1
  tokens = math.max(0, tokens - cost)
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
             'updated', string.format('%.17g', now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
end
return {{allowed, string.format('%.17g', tokens)}}
"""

#: A rate limiter must not hold a request up for long; these bound a hit while Redis is unwell.
_SOCKET_TIMEOUT = 0.25
#: After a failure, requests skip Redis (and are allowed) this long, so a Redis that times out
#: does not add the timeout to every request.
_RETRY_REDIS_AFTER = 1.0
_WARN_INTERVAL = 30.0


class RedisRateLimiter:
    """Buckets in Redis, shared by every worker and process using the same server.

    One round trip per hit (EVALSHA of a Lua script, loaded again if the server lost it). When
    Redis fails, hits are allowed with a full bucket rather than failing the request, and a
    warning is logged at most every 30 seconds.
    """

    def __init__(self, url: str) -> None:
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=_SOCKET_TIMEOUT,
            socket_connect_timeout=_SOCKET_TIMEOUT,
            # One immediate retry replaces a pooled connection that died (say, Redis restarted);
            # more would only keep a request waiting on a Redis that is down.
            retry=Retry(NoBackoff(), retries=1),
        )
        self._take = self._redis.register_script(_LUA_TAKE)
        self._skip_until = 0.0
        self._warned_at: float | None = None
        self._unwarned_failures = 0

    async def hit(self, key: str, limit: RateLimit, cost: int = 1) -> Decision:
        if cost < 0:
            raise ValueError(f"cost must be >= 0, got {cost}")
        if time.monotonic() < self._skip_until:
            return self._fail_open(limit, None)
        try:
            reply = await self._take(
                keys=[KEY_PREFIX + key], args=[repr(limit.per_second), limit.burst, cost]
            )
            allowed, tokens = _parse_reply(reply)
        except (RedisError, OSError) as exc:
            self._skip_until = time.monotonic() + _RETRY_REDIS_AFTER
            return self._fail_open(limit, exc)
        return decide(allowed, tokens, limit, cost)

    def _fail_open(self, limit: RateLimit, exc: Exception | None) -> Decision:
        now = time.monotonic()
        if exc is not None and (self._warned_at is None or now - self._warned_at >= _WARN_INTERVAL):
            log.warning(
                "rate limiting is off: Redis failed (%s: %s); allowing requests "
                "(%d failed or skipped hits since the last warning)",
                type(exc).__name__,
                exc,
                self._unwarned_failures,
            )
            self._warned_at = now
            self._unwarned_failures = 0
        else:
            self._unwarned_failures += 1
        return Decision(
            allowed=True,
            limit=limit.burst,
            remaining=limit.burst,
            reset_seconds=0,
            retry_after_seconds=0,
        )

    async def close(self) -> None:
        await self._redis.aclose()


def _parse_reply(reply: object) -> tuple[bool, float]:
    """The script's ``{allowed, tokens}``; anything else counts as a Redis failure."""
    if isinstance(reply, list) and len(reply) == 2:
        allowed, tokens = reply
        if isinstance(allowed, int) and isinstance(tokens, bytes | str):
            try:
                return allowed == 1, float(tokens)
            except ValueError:
                pass
    raise RedisError(f"unexpected reply from the rate limit script: {reply!r}")


def build_rate_limiter(redis_url: str | None) -> RateLimiter:
    """A limiter shared through Redis when ``redis_url`` is set, else one for this process."""
    if redis_url:
        return RedisRateLimiter(redis_url)
    return InProcessRateLimiter()
