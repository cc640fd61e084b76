"""Per-mailbox rate limiting: request tokens, concurrency slots and Retry-After pauses.

Providers throttle per mailbox (providers.md): Graph allows 10,000 requests in any 10 minutes
(a rolling window) and 4 at once, Google about 600 a minute per user. The queue keeps every
mailbox close to its limit without crossing it, across all lanes and worker processes.

**Why a token bucket, and why its capacity is small.** A bucket of capacity ``C`` refilled at
``R`` tokens/s grants at most ``C + R·T`` requests in *any* window of length ``T``: the bucket
can be full when the window opens and refills ``R·T`` during it. We pick ``R = (requests − C) /
per_s``, so that every window of the provider's length sees at most ``requests`` grants, as
Graph's rolling window demands. The price is the sustained rate: ``R`` is ``1 − C/requests`` of
the allowed rate, so ``C`` is a small share (``BURST_SHARE``, 4 % → 96 % of the limit). A
sliding-window log would allow 100 % but needs one Redis entry per request in the window
(10,000 per busy Graph mailbox); the bucket needs one number. Its windows are also one request
short for half-open windows (``[t, t+T)`` holds at most ``C + R·T − 1`` grants), which absorbs
about ``1/R`` seconds of jitter between our grant and the provider's clock.

The bucket is kept as GCRA: one "theoretical arrival time" ``tat``; the bucket holds
``C − (tat − now)·R`` tokens. **A mailbox without state starts empty**, not full: if Redis loses
its keys (restart without persistence, eviction), forgetting never lets a burst through that the
provider's window still remembers. It costs one refill interval (Graph: 62 ms) on the first
request to a mailbox idle for longer than its window.

A ``Lease`` holds one concurrency slot (or ``slots`` of them: a Graph ``$batch`` to one mailbox
has up to 4 of its items served at once, and each counts against the mailbox's concurrency)
until released or until it expires (``lease_ttl_s``), so a crashed worker's slots free
themselves; provider request timeouts must stay below the lease TTL.
``acquire`` never waits: it grants or answers how long to wait, so one worker can serve other
mailboxes meanwhile. ``acquire_wait`` is the simple loop for callers with nothing else to do.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, Self

from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from syncsvc.errors import Transient
from syncsvc.limits import RateLimit
from syncsvc.queue import keys

#: How long a slot stays taken by a holder that never releases it (crash, lost connection).
LEASE_TTL_S = 60.0
#: Retry hint when every slot is taken: a release may come at any moment, and we cannot
#: know when, so callers look again soon (capped by the earliest lease expiry).
SLOT_RETRY_S = 0.02
#: Back-off hint carried by ``Transient`` when Redis cannot be reached.
REDIS_RETRY_S = 0.5
#: Socket timeouts for a limiter built from a URL: a limiter call must fail fast, not hang.
REDIS_SOCKET_TIMEOUT_S = 2.0
#: How often the in-process limiter drops state of idle mailboxes.
SWEEP_EVERY_S = 60.0

_US_PER_S = 1_000_000
#: Float sums of refill intervals drift by ~1e-13 s; a wait below this is no wait.
_FLOAT_SLACK_S = 1e-9


@dataclass(frozen=True, slots=True)
class Lease:
    """Granted concurrency slots (and the tokens taken with them).

    Times are on the limiter's clock (Redis server time for ``RedisRateLimiter``), so compare
    them only with each other.
    """

    mailbox: str
    id: str
    granted_at_s: float
    expires_at_s: float
    slots: int = 1

    @property
    def slot_ids(self) -> list[str]:
        """One id per held slot: the lease id, then ``<id>#1``, ``<id>#2``, …"""
        return [self.id] + [f"{self.id}#{i}" for i in range(1, self.slots)]


class RateLimiter(Protocol):
    """What the queue needs from a limiter; the in-process and Redis ones behave the same."""

    async def acquire(
        self, mailbox: str, limit: RateLimit, n: int = 1, slots: int = 1
    ) -> Lease | float:
        """Takes ``n`` tokens and ``slots`` slots together, or nothing and answers seconds to
        wait.

        Refused while the mailbox is paused. ``n`` (e.g. the size of a batch) must not exceed
        ``limit.capacity``, nor ``slots`` ``limit.concurrency``.
        """
        ...

    async def release(self, lease: Lease) -> None:
        """Frees the lease's slot; releasing an expired or unknown lease does nothing."""
        ...

    async def pause(self, mailbox: str, seconds: float) -> None:
        """Honours Retry-After: no grant for ``mailbox`` before ``seconds`` have passed.

        A longer pause extends the current one; a shorter one never shortens it.
        """
        ...

    async def paused_for(self, mailbox: str) -> float:
        """Seconds left in the mailbox's pause, 0 if it is not paused."""
        ...


async def acquire_wait(limiter: RateLimiter, mailbox: str, limit: RateLimit, n: int = 1) -> Lease:
    """Acquires, sleeping as told in between; for callers with nothing else to serve."""
    while True:
        granted = await limiter.acquire(mailbox, limit, n)
        if isinstance(granted, Lease):
            return granted
        await asyncio.sleep(granted)


def _check_n(limit: RateLimit, n: int, slots: int = 1) -> None:
    if not 1 <= n <= limit.capacity:
        raise ValueError(f"cannot take {n} tokens at once from a bucket of {limit.capacity}")
    if not 1 <= slots <= limit.concurrency:
        raise ValueError(f"cannot take {slots} slots of a concurrency of {limit.concurrency}")


@dataclass(slots=True)
class _Bucket:
    tat_s: float
    forget_at_s: float


@dataclass(slots=True)
class _MemoryState:
    buckets: dict[str, _Bucket] = field(default_factory=dict)
    leases: dict[str, dict[str, float]] = field(default_factory=dict)
    paused_until_s: dict[str, float] = field(default_factory=dict)


class MemoryRateLimiter:
    """The limiter for one process (the embedded ``serve`` default, no Redis).

    Every method runs without awaiting, so each is atomic on the event loop.
    """

    def __init__(
        self,
        *,
        lease_ttl_s: float = LEASE_TTL_S,
        slot_retry_s: float = SLOT_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lease_ttl_s = lease_ttl_s
        self._slot_retry_s = slot_retry_s
        self._clock = clock
        self._state = _MemoryState()
        self._next_sweep_s = clock() + SWEEP_EVERY_S

    @property
    def tracked(self) -> int:
        """Mailboxes with any state held; idle ones are dropped, so this stays bounded."""
        s = self._state
        return len(s.buckets.keys() | s.leases.keys() | s.paused_until_s.keys())

    async def acquire(
        self, mailbox: str, limit: RateLimit, n: int = 1, slots: int = 1
    ) -> Lease | float:
        _check_n(limit, n, slots)
        now = self._clock()
        self._sweep(now)
        interval = 1.0 / limit.refill_per_s
        wait = self._state.paused_until_s.get(mailbox, now) - now

        bucket = self._state.buckets.get(mailbox)
        if bucket is None or bucket.forget_at_s <= now:
            tat = now + limit.capacity * interval
            bucket = self._state.buckets[mailbox] = _Bucket(tat, tat + limit.per_s)
        new_tat = max(bucket.tat_s, now) + n * interval
        wait = max(wait, new_tat - now - limit.capacity * interval)

        leases = self._live_leases(mailbox, now)
        if len(leases) + slots > limit.concurrency:
            wait = max(wait, min(min(leases.values()) - now, self._slot_retry_s))
        if wait > _FLOAT_SLACK_S:
            return wait

        bucket.tat_s, bucket.forget_at_s = new_tat, new_tat + limit.per_s
        lease = Lease(mailbox, uuid.uuid4().hex, now, now + self._lease_ttl_s, slots)
        for slot_id in lease.slot_ids:
            leases[slot_id] = lease.expires_at_s
        self._state.leases[mailbox] = leases
        return lease

    async def release(self, lease: Lease) -> None:
        held = self._state.leases.get(lease.mailbox)
        if held is not None:
            for slot_id in lease.slot_ids:
                held.pop(slot_id, None)

    async def pause(self, mailbox: str, seconds: float) -> None:
        if seconds <= 0:
            return
        until = self._clock() + seconds
        paused = self._state.paused_until_s
        if until > paused.get(mailbox, -math.inf):
            paused[mailbox] = until

    async def paused_for(self, mailbox: str) -> float:
        return max(0.0, self._state.paused_until_s.get(mailbox, 0.0) - self._clock())

    def _live_leases(self, mailbox: str, now: float) -> dict[str, float]:
        held = self._state.leases.get(mailbox, {})
        return {lid: exp for lid, exp in held.items() if exp > now}

    def _sweep(self, now: float) -> None:
        """Drops what a Redis TTL would have expired, so idle mailboxes cost no memory."""
        if now < self._next_sweep_s:
            return
        self._next_sweep_s = now + SWEEP_EVERY_S
        s = self._state
        s.buckets = {m: b for m, b in s.buckets.items() if b.forget_at_s > now}
        s.paused_until_s = {m: u for m, u in s.paused_until_s.items() if u > now}
        live = {m: self._live_leases(m, now) for m in s.leases}
        s.leases = {m: held for m, held in live.items() if held}


# KEYS: rate, concurrency, pause.  ARGV: n, capacity, interval_us, concurrency, lease_ttl_us,
# lease_id, forget_us (how long a bucket is remembered once full), slot_retry_us, slots (the
# first slot's member is lease_id, the others lease_id#1, lease_id#2, …).
# Times are integer microseconds of the server's clock, exact in Lua's doubles; the stored tat
# is rounded up, which only ever leaves fewer tokens.
# Replies {1, granted_at_us, expires_at_us} or {0, wait_us}.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n, capacity, interval = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local concurrency, lease_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local forget, slot_retry = tonumber(ARGV[7]), tonumber(ARGV[8])
local slots = tonumber(ARGV[9])

local function remember(tat)
  tat = math.ceil(tat)
  redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now + forget) / 1000))
  return tat
end

local wait = 0
local pause_ms = redis.call('PTTL', KEYS[3])
if pause_ms > 0 then wait = pause_ms * 1000 end

local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then tat = remember(now + capacity * interval) end
local new_tat = math.max(tat, now) + n * interval
wait = math.max(wait, new_tat - now - capacity * interval)

redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) + slots > concurrency then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  wait = math.max(wait, math.min(tonumber(first[2]) - now, slot_retry))
end
-- Server times are ~1.8e15 us, where doubles step by 0.25 us: a wait under 1 us is rounding
-- (it would refuse n == capacity forever), not a real wait.
if wait >= 1 then return {0, math.ceil(wait)} end

remember(new_tat)
local expires = now + lease_ttl
redis.call('ZADD', KEYS[2], string.format('%d', expires), ARGV[6])
for i = 1, slots - 1 do
  redis.call('ZADD', KEYS[2], string.format('%d', expires), ARGV[6] .. '#' .. i)
end
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[2], math.ceil((tonumber(last[2]) - now) / 1000))
return {1, now, expires}
"""

# KEYS: pause.  ARGV: milliseconds.  Extends, never shortens.
_PAUSE_LUA = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
end
return 0
"""


@contextmanager
def _redis_errors(operation: str) -> Iterator[None]:
    """Turns an unreachable Redis (down, restarting, loading, a replica mid-failover) into one
    retryable error."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, ReadOnlyError) as exc:
        raise Transient(
            f"redis unavailable during rate-limit {operation}", retry_after_s=REDIS_RETRY_S
        ) from exc


class RedisRateLimiter:
    """The limiter shared by every worker process through Redis.

    All decisions run in Lua on the server with the server's clock, so they are atomic across
    processes and the workers' clocks do not matter. Scripts are registered once; redis-py
    reloads them when a restarted server answers NOSCRIPT. Unreachable Redis raises
    ``Transient``, which the worker backs off on.

    A restart with persistence (AOF) keeps every limit. If Redis loses its keys instead, buckets
    restart empty, which is safe; pauses and held slots are forgotten, so until the requests in
    flight finish a mailbox may see more than ``concurrency``, and a pause lasts only until the
    provider's next 429 renews it.
    """

    def __init__(
        self,
        client: Redis,
        *,
        lease_ttl_s: float = LEASE_TTL_S,
        slot_retry_s: float = SLOT_RETRY_S,
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._lease_ttl_us = round(lease_ttl_s * _US_PER_S)
        self._slot_retry_us = round(slot_retry_s * _US_PER_S)
        self._owns_client = owns_client
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._pause = client.register_script(_PAUSE_LUA)

    @classmethod
    def from_url(
        cls, url: str, *, lease_ttl_s: float = LEASE_TTL_S, slot_retry_s: float = SLOT_RETRY_S
    ) -> Self:
        """A limiter with its own client that fails fast: one immediate retry (for a pooled
        connection a restart has closed), then ``Transient``."""
        client = Redis.from_url(
            url,
            retry=Retry(NoBackoff(), 1),
            socket_timeout=REDIS_SOCKET_TIMEOUT_S,
            socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
        )
        return cls(client, lease_ttl_s=lease_ttl_s, slot_retry_s=slot_retry_s, owns_client=True)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def acquire(
        self, mailbox: str, limit: RateLimit, n: int = 1, slots: int = 1
    ) -> Lease | float:
        _check_n(limit, n, slots)
        lease_id = uuid.uuid4().hex
        keys_ = [keys.rate_key(mailbox), keys.concurrency_key(mailbox), keys.pause_key(mailbox)]
        args: list[str | int] = [
            n,
            limit.capacity,
            repr(_US_PER_S / limit.refill_per_s),
            limit.concurrency,
            self._lease_ttl_us,
            lease_id,
            math.ceil(limit.per_s * _US_PER_S),
            self._slot_retry_us,
            slots,
        ]
        with _redis_errors("acquire"):
            reply = await self._acquire(keys=keys_, args=args)
        if reply[0] == 0:
            return int(reply[1]) / _US_PER_S
        return Lease(mailbox, lease_id, int(reply[1]) / _US_PER_S, int(reply[2]) / _US_PER_S, slots)

    async def release(self, lease: Lease) -> None:
        """Frees the slot. If Redis is unreachable this raises ``Transient``: retry the release
        later, or the slot stays taken until the lease expires."""
        with _redis_errors("release"):
            await self._client.zrem(keys.concurrency_key(lease.mailbox), *lease.slot_ids)

    async def pause(self, mailbox: str, seconds: float) -> None:
        if seconds <= 0:
            return
        with _redis_errors("pause"):
            await self._pause(keys=[keys.pause_key(mailbox)], args=[math.ceil(seconds * 1000)])

    async def paused_for(self, mailbox: str) -> float:
        with _redis_errors("paused_for"):
            ms = await self._client.pttl(keys.pause_key(mailbox))
        return max(0, int(ms)) / 1000
