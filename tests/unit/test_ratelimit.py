"""The in-process limiter on a hand-driven clock: every figure here is computed by hand.

The limit used throughout is 10 requests per second, concurrency 2, burst 2: the bucket holds
2 tokens and refills (10 − 2) / 1 s = 8 tokens/s, one every 0.125 s.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from syncsvc.limits import CALDAV_LIMIT, DEFAULT_LIMITS, GOOGLE_LIMIT, GRAPH_LIMIT, RateLimit
from syncsvc.queue.ratelimit import (
    SLOT_RETRY_S,
    SWEEP_EVERY_S,
    Lease,
    MemoryRateLimiter,
)

LIMIT = RateLimit(requests=10, per_s=1.0, concurrency=2, burst=2)
TICK_S = 0.125


def max_in_window(times: Sequence[float], window_s: float) -> int:
    """Most grants in any closed window ``[t, t + window_s]`` (the strictest reading)."""
    ordered = sorted(times)
    best, j = 0, 0
    for i, start in enumerate(ordered):
        j = max(j, i)
        while j < len(ordered) and ordered[j] <= start + window_s:
            j += 1
        best = max(best, j - i)
    return best


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock) -> MemoryRateLimiter:
    return MemoryRateLimiter(clock=clock, lease_ttl_s=5.0)


async def granted(limiter: MemoryRateLimiter, mailbox: str = "a@x", n: int = 1) -> Lease:
    got = await limiter.acquire(mailbox, LIMIT, n)
    assert isinstance(got, Lease), f"expected a lease, got a wait of {got}"
    return got


def test_provider_defaults_fill_their_window_exactly_and_sustain_96_percent() -> None:
    assert (GRAPH_LIMIT.capacity, GRAPH_LIMIT.refill_per_s) == (400, 16.0)
    assert GOOGLE_LIMIT.capacity == 24
    assert GOOGLE_LIMIT.refill_per_s == pytest.approx(9.6)
    assert (CALDAV_LIMIT.capacity, CALDAV_LIMIT.refill_per_s) == (1, 19.0)
    assert (GRAPH_LIMIT.concurrency, GOOGLE_LIMIT.concurrency) == (4, 10)
    for limit in DEFAULT_LIMITS.values():
        assert limit.capacity + limit.refill_per_s * limit.per_s == pytest.approx(limit.requests)
        assert limit.refill_per_s * limit.per_s / limit.requests >= 0.95


@pytest.mark.parametrize(
    "kwargs",
    [
        {"requests": 1, "per_s": 1.0, "concurrency": 1},
        {"requests": 10, "per_s": 1.0, "concurrency": 1, "burst": 10},
        {"requests": 10, "per_s": 0.0, "concurrency": 1},
        {"requests": 10, "per_s": 1.0, "concurrency": 0},
    ],
)
def test_impossible_limits_are_refused(kwargs: dict[str, int | float]) -> None:
    with pytest.raises(ValueError):
        RateLimit(**kwargs)  # type: ignore[arg-type]


async def test_a_new_mailbox_starts_empty_and_refills_one_token_per_tick(
    limiter: MemoryRateLimiter, clock: Clock
) -> None:
    assert await limiter.acquire("a@x", LIMIT) == pytest.approx(TICK_S)
    clock.now += TICK_S
    lease = await granted(limiter)
    assert (lease.granted_at_s, lease.expires_at_s) == (clock.now, clock.now + 5.0)
    await limiter.release(lease)
    assert await limiter.acquire("a@x", LIMIT) == pytest.approx(TICK_S)


async def test_an_idle_bucket_allows_a_burst_of_capacity_then_the_refill_rate(
    limiter: MemoryRateLimiter, clock: Clock
) -> None:
    await limiter.acquire("a@x", LIMIT)
    clock.now += 0.5  # bucket full (2 tokens) after 0.25 s; remembered for 1 s after that
    first, second = await granted(limiter), await granted(limiter)
    await limiter.release(first)
    await limiter.release(second)
    assert await limiter.acquire("a@x", LIMIT) == pytest.approx(TICK_S)


async def test_a_long_idle_mailbox_is_forgotten_and_starts_empty_again(
    limiter: MemoryRateLimiter, clock: Clock
) -> None:
    await limiter.acquire("a@x", LIMIT)
    clock.now += 0.25 + 1.0 + 0.001  # full at +0.25 s, forgotten one window later
    assert await limiter.acquire("a@x", LIMIT) == pytest.approx(TICK_S)


async def test_a_greedy_client_fills_but_never_exceeds_any_window(
    limiter: MemoryRateLimiter, clock: Clock
) -> None:
    """Greedy to 5 s, idle to 5.5 s (bucket full again), greedy to 7.5 s; 1 ms steps."""
    start = clock.now
    grants: list[float] = []
    for ms in range(7501):
        clock.now = start + ms / 1000
        if 5000 < ms < 5500:
            continue
        got = await limiter.acquire("a@x", LIMIT)
        if isinstance(got, Lease):
            grants.append(got.granted_at_s)
            await limiter.release(got)
    # From empty: one per tick at 0.125 … 5.0 s (40); full at 5.5 s: 2 at once, then one per
    # tick at 5.625 … 7.5 s (16). The window [5.5, 6.5] holds 2 + 8 = 10, the limit itself.
    assert len(grants) == 40 + 2 + 16
    assert max_in_window(grants, 1.0) == LIMIT.requests


async def test_n_tokens_come_all_together_or_not_at_all(
    limiter: MemoryRateLimiter, clock: Clock
) -> None:
    with pytest.raises(ValueError):
        await limiter.acquire("a@x", LIMIT, n=3)
    await limiter.acquire("a@x", LIMIT)
    clock.now += TICK_S  # one token
    assert await limiter.acquire("a@x", LIMIT, n=2) == pytest.approx(TICK_S)
    clock.now += TICK_S
    await granted(limiter, n=2)
    assert await limiter.acquire("a@x", LIMIT) == pytest.approx(TICK_S)


async def test_a_full_mailbox_answers_a_short_retry_and_a_release_frees_a_slot(
    limiter: MemoryRateLimiter, clock: Clock
) -> None:
    await limiter.acquire("a@x", LIMIT)
    clock.now += 4 * TICK_S
    first, _second = await granted(limiter), await granted(limiter)
    clock.now += TICK_S
    assert await limiter.acquire("a@x", LIMIT) == SLOT_RETRY_S
    await limiter.release(first)
    await granted(limiter)


async def test_a_crashed_holders_slot_frees_when_its_lease_expires(clock: Clock) -> None:
    limiter = MemoryRateLimiter(clock=clock, lease_ttl_s=0.5)
    await limiter.acquire("a@x", LIMIT)
    clock.now += 4 * TICK_S
    crashed = [await granted(limiter), await granted(limiter)]  # never released
    clock.now = crashed[0].expires_at_s - 0.005  # tokens are back; the slots are not
    assert await limiter.acquire("a@x", LIMIT) == pytest.approx(0.005)
    clock.now = crashed[0].expires_at_s
    holders = [await granted(limiter), await granted(limiter)]
    for stale in crashed:  # a late release must not free the new holders' slots
        await limiter.release(stale)
    clock.now += 0.3
    assert await limiter.acquire("a@x", LIMIT) == SLOT_RETRY_S
    await limiter.release(holders[0])
    await granted(limiter)


async def test_pause_extends_but_never_shortens(limiter: MemoryRateLimiter, clock: Clock) -> None:
    await limiter.pause("a@x", 3.0)
    await limiter.pause("a@x", 1.0)
    assert await limiter.paused_for("a@x") == 3.0
    assert await limiter.acquire("a@x", LIMIT) == 3.0
    assert await limiter.paused_for("b@x") == 0.0
    await limiter.pause("a@x", 5.0)
    clock.now += 4.0
    assert await limiter.paused_for("a@x") == pytest.approx(1.0)
    clock.now += 1.0  # the pause is over; the bucket, untouched for 5 s, was forgotten
    assert await limiter.acquire("a@x", LIMIT) == pytest.approx(TICK_S)
    clock.now += TICK_S
    await granted(limiter)


async def test_idle_mailboxes_cost_no_memory(limiter: MemoryRateLimiter, clock: Clock) -> None:
    for i in range(1000):
        await limiter.acquire(f"m{i}@x", LIMIT)
        await limiter.pause(f"m{i}@x", 1.0)
    clock.now += 1.0
    await granted(limiter, "m0@x")
    assert limiter.tracked == 1000
    clock.now += SWEEP_EVERY_S + 10.0  # every lease, bucket and pause has expired
    await limiter.acquire("new@x", LIMIT)
    assert limiter.tracked == 1
