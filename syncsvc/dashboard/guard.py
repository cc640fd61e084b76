"""What the dashboard's sign-in remembers: open sessions and recent failed sign-ins.

In Redis when ``SYNCSVC_REDIS_URL`` is set, so every API process sees the same sessions and
the same failures; in the process otherwise (the one-process default). A lost Redis key signs
an operator out or forgets some failures, never lets a signed-out cookie back in: a session is
valid only while its key exists.

**Failed sign-ins.** Each client address (an IPv6 client's /64, which one host gets whole) may
fail ``client_max`` times within ``window_s`` of its first failure, and every address together
``all_max`` times, so that a botnet cannot spread its guesses either. A scope that reaches its
maximum is locked for ``window_s`` from then on: every attempt is refused with the seconds left,
*before* the key is looked at, so the right key is refused too. An attempt is counted before the
key is compared (concurrent guesses cannot all slip past the check) and given back when the key
was right; a right key also clears its address's failures. The price of the global cap: while
it is locked nobody can sign in, but sessions already open keep working.

The existing mailbox limiter (``queue/ratelimit.py``) does not fit: its buckets start empty and
it has no reset, and failures are counted, not paced.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, Self

from aiohttp import web
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from syncsvc.errors import SyncSvcError
from syncsvc.queue.keys import PREFIX
from syncsvc.queue.ratelimit import REDIS_SOCKET_TIMEOUT_S

CLIENT_FAILURES_MAX = 5
ALL_FAILURES_MAX = 50
FAILURE_WINDOW_S = 300.0

#: Failed sign-ins: a counter per client address and one for all of them (``…all``), each with
#: a PX TTL. One Cluster hash tag for all, because one script touches a client's and ``all``.
FAILURES_PREFIX = PREFIX + "signin:{dashboard}:"
#: An open session: exists (with a PX TTL) until it expires or its operator signs out.
SESSION_PREFIX = PREFIX + "session:"
_ALL = "all"
_CLIENT = "client:"
_MS_PER_S = 1000


class SignInUnavailable(SyncSvcError):
    """Redis does not answer: the sign-in fails closed rather than stop counting."""

    code = "sign_in_unavailable"
    http_status = 503


class Guard(Protocol):
    """Sessions and failed sign-ins; the in-process and Redis ones behave the same."""

    async def attempt(self, client: str) -> float:
        """0 to go on and compare the key (the attempt is counted as a failure until
        ``succeeded``), else the seconds until ``client`` may try again."""
        ...

    async def succeeded(self, client: str) -> None:
        """The key was right: clears ``client``'s failures and gives the attempt back."""
        ...

    async def open_session(self, session_id: str, ttl_s: float) -> None: ...

    async def has_session(self, session_id: str) -> bool: ...

    async def close_session(self, session_id: str) -> None:
        """Ends the session on every process; an unknown one does nothing."""
        ...

    async def aclose(self) -> None: ...


def client_of(request: web.Request) -> str:
    """The address failures are counted against: the peer's, or its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return request.remote or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(slots=True)
class _Failures:
    count: int
    #: Forgotten at; once ``count`` reaches the maximum, locked until.
    until_s: float


class MemoryGuard:
    """This process's own; every method runs without awaiting, so each is atomic on the loop.

    What it holds stays small: failures stop being counted once ``all_max`` is reached, and
    only the operator key opens sessions.
    """

    def __init__(
        self,
        *,
        client_max: int = CLIENT_FAILURES_MAX,
        all_max: int = ALL_FAILURES_MAX,
        window_s: float = FAILURE_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._maxes = {_CLIENT: client_max, _ALL: all_max}
        self._window_s = window_s
        self._clock = clock
        self._failures: dict[str, _Failures] = {}
        self._sessions: dict[str, float] = {}

    def _forget(self, now: float) -> None:
        self._failures = {k: f for k, f in self._failures.items() if f.until_s > now}
        self._sessions = {k: until for k, until in self._sessions.items() if until > now}

    async def attempt(self, client: str) -> float:
        now = self._clock()
        self._forget(now)
        scopes = {_CLIENT + client: self._maxes[_CLIENT], _ALL: self._maxes[_ALL]}
        locked = [
            failures.until_s - now
            for scope, most in scopes.items()
            if (failures := self._failures.get(scope)) is not None and failures.count >= most
        ]
        if locked:
            return max(locked)
        for scope, most in scopes.items():
            failures = self._failures.setdefault(scope, _Failures(0, now + self._window_s))
            failures.count += 1
            if failures.count >= most:
                failures.until_s = now + self._window_s
        return 0.0

    async def succeeded(self, client: str) -> None:
        self._failures.pop(_CLIENT + client, None)
        every = self._failures.get(_ALL)
        if every is not None and every.count > 0:
            every.count -= 1

    async def open_session(self, session_id: str, ttl_s: float) -> None:
        now = self._clock()
        self._forget(now)
        self._sessions[session_id] = now + ttl_s

    async def has_session(self, session_id: str) -> bool:
        return self._sessions.get(session_id, -math.inf) > self._clock()

    async def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    async def aclose(self) -> None:
        pass


# KEYS: the client's failures, all failures.  ARGV: client max, all max, window (ms).
# Replies 0 (counted: compare the key) or the milliseconds until the first locked scope opens.
_ATTEMPT_LUA = """
local wait = 0
for i, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') >= tonumber(ARGV[i]) then
    local ttl = redis.call('PTTL', key)
    if ttl < 0 then ttl = tonumber(ARGV[3]) end
    wait = math.max(wait, ttl)
  end
end
if wait > 0 then return wait end
for i, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  if n == 1 or n >= tonumber(ARGV[i]) then redis.call('PEXPIRE', key, ARGV[3]) end
end
return 0
"""

# KEYS: the client's failures, all failures.
_SUCCEEDED_LUA = """
redis.call('DEL', KEYS[1])
if tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then redis.call('DECR', KEYS[2]) end
return 0
"""


@contextmanager
def _redis_errors() -> Iterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, ReadOnlyError) as exc:
        raise SignInUnavailable("the dashboard's session store does not answer") from exc


class RedisGuard:
    """Shared by every API process; the failure counts are decided in Lua, atomically."""

    def __init__(
        self,
        client: Redis,
        *,
        client_max: int = CLIENT_FAILURES_MAX,
        all_max: int = ALL_FAILURES_MAX,
        window_s: float = FAILURE_WINDOW_S,
    ) -> None:
        self._client = client
        self._args = [client_max, all_max, math.ceil(window_s * _MS_PER_S)]
        self._attempt = client.register_script(_ATTEMPT_LUA)
        self._succeeded = client.register_script(_SUCCEEDED_LUA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        client_max: int = CLIENT_FAILURES_MAX,
        all_max: int = ALL_FAILURES_MAX,
        window_s: float = FAILURE_WINDOW_S,
    ) -> Self:
        """With its own client that fails fast (one retry), like the queue's limiter."""
        client = Redis.from_url(
            url,
            retry=Retry(NoBackoff(), 1),
            socket_timeout=REDIS_SOCKET_TIMEOUT_S,
            socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
        )
        return cls(client, client_max=client_max, all_max=all_max, window_s=window_s)

    @staticmethod
    def _keys(client: str) -> list[str]:
        return [FAILURES_PREFIX + _CLIENT + client, FAILURES_PREFIX + _ALL]

    async def attempt(self, client: str) -> float:
        with _redis_errors():
            wait_ms = await self._attempt(keys=self._keys(client), args=self._args)
        return int(wait_ms) / _MS_PER_S

    async def succeeded(self, client: str) -> None:
        with _redis_errors():
            await self._succeeded(keys=self._keys(client))

    async def open_session(self, session_id: str, ttl_s: float) -> None:
        with _redis_errors():
            await self._client.set(SESSION_PREFIX + session_id, 1, px=math.ceil(ttl_s * 1000))

    async def has_session(self, session_id: str) -> bool:
        with _redis_errors():
            return bool(await self._client.exists(SESSION_PREFIX + session_id))

    async def close_session(self, session_id: str) -> None:
        with _redis_errors():
            await self._client.delete(SESSION_PREFIX + session_id)

    async def aclose(self) -> None:
        await self._client.aclose()


#: The app's guard, made by ``build_app`` (tests replace it: small limits, a clock they move).
GUARD: web.AppKey[Guard] = web.AppKey("dashboard_guard")


def new_guard(redis_url: str | None) -> Guard:
    """Redis when configured, else this process's own."""
    return RedisGuard.from_url(redis_url) if redis_url else MemoryGuard()
