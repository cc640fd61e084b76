"""Both limiters under real load: many acquirers, several processes, a Redis restart.

Limits are time-scaled (tens of requests per second) so that a few seconds show what Graph's
10,000 per 10 minutes would show in hours. Window checks use the limiter's own grant times
(Redis server time), the clock the guarantee is stated in.

These tests assert safety only (never over the limit, never more holders than slots, nothing
lost across a restart), which no slow or busy machine can break; how close to the limit the
rate comes is measured by ``bench/ratelimit.py``, and the exact arithmetic is tested with a
controlled clock in ``tests/unit/test_ratelimit.py``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import pytest
from redis.asyncio import Redis

from syncsvc.errors import Transient
from syncsvc.limits import RateLimit
from syncsvc.queue.ratelimit import (
    Lease,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    acquire_wait,
)
from tests.servers.redis import RedisServer
from tests.unit.test_ratelimit import max_in_window

MakeLimiter = Callable[..., RateLimiter]
"""Takes ``lease_ttl_s`` (and ``slot_retry_s``) as keywords."""


@dataclass(slots=True)
class Run:
    """What a load run saw: grant times (limiter clock) and hold intervals (monotonic)."""

    grants: list[float] = field(default_factory=list)
    holds: list[tuple[float, float]] = field(default_factory=list)
    transient: int = 0


def max_overlap(holds: Sequence[tuple[float, float]]) -> int:
    """Most intervals open at once; an end at the same instant as a start comes first."""
    events = sorted([(start, 1) for start, _ in holds] + [(end, -1) for _, end in holds])
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


async def hammer(
    limiter: RateLimiter,
    mailbox: str,
    limit: RateLimit,
    *,
    workers: int,
    duration_s: float,
    hold_s: tuple[float, float],
    until: asyncio.Event | None = None,
    run: Run | None = None,
) -> Run:
    """``workers`` tasks acquire, hold a while (the provider call) and release, until time is
    up (or ``until`` is set, if given); an unreachable Redis is waited out as a worker would.
    Grants are recorded in ``run`` as they happen, if given."""
    run = run if run is not None else Run()
    end = time.monotonic() + duration_s

    def going() -> bool:
        return not until.is_set() if until is not None else time.monotonic() < end

    async def worker() -> None:
        while going():
            try:
                got = await limiter.acquire(mailbox, limit)
            except Transient as exc:
                run.transient += 1
                await asyncio.sleep(exc.retry_after_s or 0.1)
                continue
            if not isinstance(got, Lease):
                await asyncio.sleep(got)
                continue
            start = time.monotonic()
            await asyncio.sleep(random.uniform(*hold_s))
            run.holds.append((start, time.monotonic()))
            run.grants.append(got.granted_at_s)
            await release(limiter, got, run)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return run


async def release(limiter: RateLimiter, lease: Lease, run: Run) -> None:
    """Retries a release Redis could not take; past the lease's life there is nothing to free."""
    give_up = time.monotonic() + (lease.expires_at_s - lease.granted_at_s)
    while True:
        try:
            await limiter.release(lease)
            return
        except Transient as exc:
            run.transient += 1
            if time.monotonic() > give_up:
                return
            await asyncio.sleep(exc.retry_after_s or 0.1)


@pytest.fixture(params=["memory", "redis"])
async def make_limiter(request: pytest.FixtureRequest) -> AsyncIterator[MakeLimiter]:
    """Builds limiters that share state: one in-process instance, or Redis clients of their
    own (as separate processes would have). The first call's options hold for memory."""
    made: list[RedisRateLimiter] = []
    memory: list[MemoryRateLimiter] = []

    if request.param == "memory":

        def make(**options: float) -> RateLimiter:
            if not memory:
                memory.append(MemoryRateLimiter(**options))  # type: ignore[arg-type]
            return memory[0]

    else:
        url: str = request.getfixturevalue("redis_url")

        def make(**options: float) -> RateLimiter:
            made.append(RedisRateLimiter.from_url(url, **options))
            return made[-1]

    yield make
    for limiter in made:
        await limiter.aclose()


async def test_concurrency_cap_holds_under_many_acquirers(make_limiter: MakeLimiter) -> None:
    limit = RateLimit(requests=10_000, per_s=1.0, concurrency=3)
    limiters = [make_limiter(), make_limiter()]
    runs = await asyncio.gather(
        *(
            hammer(lim, "a@x", limit, workers=15, duration_s=1.0, hold_s=(0.005, 0.02))
            for lim in limiters
        )
    )
    holds = [h for run in runs for h in run.holds]
    assert holds
    assert max_overlap(holds) <= 3


async def test_no_window_exceeds_the_limit(make_limiter: MakeLimiter) -> None:
    """50 per 1 s (burst 2, then 48/s), starting with a full bucket, hammered for 3 s: no
    one-second window of grants holds more than 50, however the acquirers are scheduled."""
    limit = RateLimit(requests=50, per_s=1.0, concurrency=50)
    limiter = make_limiter()
    await limiter.release(await acquire_wait(limiter, "a@x", limit))
    await asyncio.sleep(0.1)  # refills the 2-token bucket in 2/48 s
    run = await hammer(limiter, "a@x", limit, workers=20, duration_s=3.0, hold_s=(0.001, 0.002))
    assert run.grants
    assert max_in_window(run.grants, limit.per_s) <= limit.requests


async def test_pause_stops_every_acquirer_and_a_shorter_one_does_not_shorten_it(
    make_limiter: MakeLimiter,
) -> None:
    """Pauses long enough (tens of seconds) that no scheduling delay can end them early; the
    end of a pause is waited for, not timed."""
    limit = RateLimit(requests=1000, per_s=1.0, concurrency=4)
    first, second = make_limiter(), make_limiter()
    await acquire_wait(first, "a@x", limit)  # the bucket is warm: only the pause can refuse
    await first.pause("a@x", 60.0)
    await second.pause("a@x", 1.0)
    assert 30.0 < await second.paused_for("a@x") <= 60.0
    for limiter in (first, second):
        wait = await limiter.acquire("a@x", limit)
        assert isinstance(wait, float)
        assert 30.0 < wait <= 60.0
    async with asyncio.timeout(10):  # other mailboxes go on (after their first refill tick)
        await acquire_wait(second, "b@x", limit)
    await second.pause("a@x", 120.0)  # a longer one extends it
    assert 90.0 < await first.paused_for("a@x") <= 120.0

    await first.pause("c@x", 0.3)
    assert isinstance(await second.acquire("c@x", limit), float)
    async with asyncio.timeout(30):
        while await first.paused_for("c@x") > 0.0:  # noqa: ASYNC110 - Redis's state, polled
            await asyncio.sleep(0.05)
        await acquire_wait(second, "c@x", limit)


async def test_a_crashed_holders_slot_frees_itself(make_limiter: MakeLimiter) -> None:
    limit = RateLimit(requests=1000, per_s=1.0, concurrency=1)
    crashed, survivor = make_limiter(lease_ttl_s=0.3), make_limiter(lease_ttl_s=0.3)
    await acquire_wait(crashed, "a@x", limit)  # and never released
    started = time.monotonic()
    lease = await acquire_wait(survivor, "a@x", limit)
    waited = time.monotonic() - started
    assert waited > 0.2  # never two holders of the one slot: it waited for the expiry
    assert isinstance(await crashed.acquire("a@x", limit), float)
    await survivor.release(lease)
    assert isinstance(await crashed.acquire("a@x", limit), Lease)


async def test_mailboxes_do_not_limit_each_other(make_limiter: MakeLimiter) -> None:
    limit = RateLimit(requests=1000, per_s=1.0, concurrency=1)
    limiter = make_limiter()
    await acquire_wait(limiter, "busy@x", limit)
    await limiter.pause("paused@x", 5.0)
    assert isinstance(await limiter.acquire("busy@x", limit), float)
    assert isinstance(await limiter.acquire("paused@x", limit), float)
    await acquire_wait(limiter, "free@x", limit)
    assert await limiter.paused_for("free@x") == 0.0


# --- Redis only: processes, TTLs, restarts. ---

SHARED_LIMIT = RateLimit(requests=60, per_s=1.0, concurrency=3)


def _process_main(url: str, start_at: float, duration_s: float) -> Run:
    """One worker process: its own event loop, its own Redis client, the shared mailbox."""

    async def main() -> Run:
        limiter = RedisRateLimiter.from_url(url)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        try:
            return await hammer(
                limiter,
                "shared@x",
                SHARED_LIMIT,
                workers=6,
                duration_s=duration_s,
                hold_s=(0.03, 0.05),
            )
        finally:
            await limiter.aclose()

    return asyncio.run(main())


@pytest.mark.redis
async def test_three_processes_share_one_limit(redis_url: str) -> None:
    """Together they get 60/s at most (58/s sustained) and 3 slots, however they race."""
    duration_s = 3.0
    start_at = time.time() + 1.5  # every process imported and connected by then
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(3, mp_context=get_context("spawn")) as pool:
        runs = await asyncio.gather(
            *(
                loop.run_in_executor(pool, _process_main, redis_url, start_at, duration_s)
                for _ in range(3)
            )
        )
    grants = [t for run in runs for t in run.grants]
    assert all(run.grants for run in runs)
    assert max_in_window(grants, SHARED_LIMIT.per_s) <= SHARED_LIMIT.requests
    assert max_overlap([h for run in runs for h in run.holds]) <= SHARED_LIMIT.concurrency


@pytest.mark.redis
async def test_every_key_expires_on_its_own(redis_url: str) -> None:
    limiter = RedisRateLimiter.from_url(redis_url)
    client = Redis.from_url(redis_url)
    try:
        lease = await acquire_wait(limiter, "a@x", SHARED_LIMIT)
        await limiter.pause("a@x", 2.0)
        found = [key async for key in client.scan_iter("syncsvc:*")]
        assert len(found) == 3
        for key in found:
            assert 0 < await client.pttl(key) <= 61_000
        await limiter.release(lease)
    finally:
        await client.aclose()
        await limiter.aclose()


@pytest.mark.redis
async def test_redis_down_is_a_transient_error_and_recovery_is_automatic(
    redis_server: RedisServer, redis_url: str
) -> None:
    limiter = RedisRateLimiter.from_url(redis_url)
    try:
        lease = await acquire_wait(limiter, "a@x", SHARED_LIMIT)
        redis_server.stop()
        with pytest.raises(Transient) as caught:
            await limiter.acquire("a@x", SHARED_LIMIT)
        assert caught.value.retry_after_s
        with pytest.raises(Transient):
            await limiter.release(lease)
        with pytest.raises(Transient):
            await limiter.pause("a@x", 1.0)
        redis_server.start()
        await limiter.release(lease)
        await acquire_wait(limiter, "a@x", SHARED_LIMIT)  # scripts reloaded after NOSCRIPT
    finally:
        await limiter.aclose()


@pytest.mark.redis
@pytest.mark.parametrize("wipe", [False, True], ids=["persisted", "keys-lost"])
async def test_limits_hold_across_a_redis_restart(
    redis_server: RedisServer, redis_url: str, wipe: bool
) -> None:
    """A restart mid-run: acquirers back off, then resume within the limits. With its data
    kept, every limit holds; with every key lost, the window limit still holds (buckets start
    empty) while slots held across the loss are forgotten, so only the window is checked.

    Driven by what happened, not by the clock: the restart comes after some grants, and the
    run ends once grants have been made after it."""
    limit = RateLimit(requests=50, per_s=1.0, concurrency=3)
    limiters = [RedisRateLimiter.from_url(redis_url, lease_ttl_s=2.0) for _ in range(2)]
    done = asyncio.Event()
    runs = [Run() for _ in limiters]

    async def restart() -> float:
        while sum(len(run.holds) for run in runs) < 20:  # noqa: ASYNC110 - polls the runs
            await asyncio.sleep(0.05)
        await asyncio.to_thread(redis_server.restart, wipe=wipe)
        restarted_at = time.monotonic()
        while sum(1 for run in runs for h in run.holds if h[0] > restarted_at) < 20:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        done.set()
        return restarted_at

    try:
        async with asyncio.timeout(60):
            restarting = asyncio.create_task(restart())
            hammering = [
                asyncio.create_task(
                    hammer(
                        lim,
                        "a@x",
                        limit,
                        workers=8,
                        duration_s=0,
                        hold_s=(0.01, 0.03),
                        until=done,
                        run=run,
                    )
                )
                for lim, run in zip(limiters, runs, strict=True)
            ]
            restarted_at = await restarting
            await asyncio.gather(*hammering)
    finally:
        for lim in limiters:
            await lim.aclose()
    grants = [t for run in runs for t in run.grants]
    holds = [h for run in runs for h in run.holds]
    assert sum(run.transient for run in runs) > 0
    assert max_in_window(grants, limit.per_s) <= limit.requests
    if not wipe:
        assert max_overlap(holds) <= limit.concurrency
    assert [h for h in holds if h[0] > restarted_at]
