"""Per-tenant API quota: requests per window, and heavy requests (plans, commits) at once.

One tenant's script must not take the API from the others. Each tenant may make
``SYNCSVC_API_RATE`` requests (``600/60``: 600 a minute) in fixed windows, and run
``SYNCSVC_API_HEAVY_CONCURRENCY`` heavy requests at once; beyond either, a ``429`` with
``Retry-After``. Every answer carries the IETF ``RateLimit-Policy`` and ``RateLimit`` fields
(draft-ietf-httpapi-ratelimit-headers: quota ``q``, window ``w``, remaining ``r``, seconds to
reset ``t``).

The counts live in Redis when ``SYNCSVC_REDIS_URL`` is set (every API process shares them) and
in the process otherwise. Fixed windows need one counter per tenant (a window's start may see
up to twice the rate across its edge, which a quota of this kind allows). Heavy requests hold
a lease that expires on its own, so a crashed process frees its slots. If Redis does not
answer, requests go through (logged once per outage): the quota protects the service, and
refusing everyone would be the outage it guards against.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from aiohttp import web
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from syncsvc.limits import Quota
from syncsvc.queue.keys import PREFIX
from syncsvc.queue.ratelimit import REDIS_SOCKET_TIMEOUT_S

log = logging.getLogger("syncsvc.api.quota")
T = TypeVar("T")

#: A heavy request's lease outlives any request (the API's own timeouts end them first).
HEAVY_LEASE_S = 600.0
COUNT_PREFIX = PREFIX + "api:count:"
HEAVY_PREFIX = PREFIX + "api:heavy:"

_TAKE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
"""
_ENTER = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""


@dataclass(frozen=True, slots=True)
class Taken:
    count: int  # requests in this window, this one included
    reset_s: int  # seconds until the window ends


class QuotaStore(Protocol):
    async def take(self, tenant: str, quota: Quota) -> Taken: ...

    async def enter(self, tenant: str, quota: Quota) -> str | None:
        """A heavy request's lease, or ``None`` when the tenant runs ``quota.heavy``."""
        ...

    async def leave(self, tenant: str, lease: str) -> None: ...

    async def aclose(self) -> None: ...


@dataclass
class MemoryQuota:
    """One process's counts (the embedded default)."""

    clock: Callable[[], float] = time.monotonic
    _counts: dict[str, tuple[float, int]] = field(default_factory=dict)
    _heavy: dict[str, set[str]] = field(default_factory=dict)

    async def take(self, tenant: str, quota: Quota) -> Taken:
        now = self.clock()
        ends, count = self._counts.get(tenant, (0.0, 0))
        if now >= ends:
            if len(self._counts) > 10_000:  # forget finished windows of idle tenants
                self._counts = {t: v for t, v in self._counts.items() if v[0] > now}
            ends, count = now + quota.window_s, 0
        self._counts[tenant] = (ends, count + 1)
        return Taken(count + 1, math.ceil(ends - now))

    async def enter(self, tenant: str, quota: Quota) -> str | None:
        held = self._heavy.setdefault(tenant, set())
        if len(held) >= quota.heavy:
            return None
        lease = uuid.uuid4().hex
        held.add(lease)
        return lease

    async def leave(self, tenant: str, lease: str) -> None:
        self._heavy.get(tenant, set()).discard(lease)

    async def aclose(self) -> None:
        return None


class RedisQuota:
    """Counts shared by every API process."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._take = redis.register_script(_TAKE)
        self._enter = redis.register_script(_ENTER)
        self._down = False

    @classmethod
    def from_url(cls, url: str) -> RedisQuota:
        """With its own client that fails fast (one retry), like the queue's limiter."""
        return cls(
            Redis.from_url(
                url,
                retry=Retry(NoBackoff(), 1),
                socket_timeout=REDIS_SOCKET_TIMEOUT_S,
                socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
            )
        )

    async def take(self, tenant: str, quota: Quota) -> Taken:
        count, ttl_ms = await self._call(
            self._take([COUNT_PREFIX + tenant], [quota.window_s * 1000]), [0, 0]
        )
        return Taken(int(count), math.ceil(max(int(ttl_ms), 0) / 1000))

    async def enter(self, tenant: str, quota: Quota) -> str | None:
        lease = uuid.uuid4().hex
        now_ms = int(time.time() * 1000)
        ttl_ms = int(HEAVY_LEASE_S * 1000)
        args: list[int | str] = [now_ms, quota.heavy, now_ms + ttl_ms, lease, ttl_ms]
        granted = await self._call(self._enter([HEAVY_PREFIX + tenant], args), 1)
        return lease if int(granted) else None

    async def leave(self, tenant: str, lease: str) -> None:
        await self._call(self.redis.zrem(HEAVY_PREFIX + tenant, lease), 0)

    async def _call(self, call: Awaitable[T], fallback: T) -> T:
        try:
            result = await call
        except (RedisError, OSError) as exc:
            if not self._down:
                log.warning("event=api.quota.unavailable error=%s (requests go through)", exc)
            self._down = True
            return fallback
        if self._down:
            log.info("event=api.quota.available")
        self._down = False
        return result

    async def aclose(self) -> None:
        await self.redis.aclose()


QUOTA: web.AppKey[QuotaStore] = web.AppKey("quota", QuotaStore)
