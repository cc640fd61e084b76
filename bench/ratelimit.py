"""How close the rate limiter keeps mailboxes to their limit, and whether it ever crosses it.

Four mailboxes at a time-scaled limit (default 100 requests per 1 s, 4 at once: Graph's shape
with 60× less patience). Async workers hammer acquire → provider call → release; the "provider"
is an in-process counter that answers 429 the way Graph would (a rolling window of arrivals, a
concurrency cap) and records it. Printed per mailbox: the achieved rate over the whole run
(cold start included) and between its first and last request, the allowed rate and the ratio,
the most requests the provider saw in any window and at once, and the share of 429s (should
be 0).

Runs the in-process limiter, then the Redis one (``SYNCSVC_REDIS_URL``, or a redis-server it
starts in a temporary folder)::

    python -m bench.ratelimit [--seconds 5] [--workers 32] [--requests 100] [--per-s 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from syncsvc.limits import RateLimit
from syncsvc.queue.ratelimit import (
    Lease,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
)
from tests.servers.redis import RedisServer

MAILBOXES = ("a@example.com", "b@example.com", "c@example.com", "d@example.com")
PROVIDER_LATENCY_S = (0.005, 0.02)
#: Bursty load: each mailbox's workers alternate this long busy / idle (bucket refills).
BURST_ON_S, BURST_OFF_S = 0.7, 0.4


@dataclass(slots=True)
class ThrottledMailbox:
    """The provider's view of one mailbox: rolling window of arrivals plus a concurrency cap."""

    limit: RateLimit
    arrivals: deque[float] = field(default_factory=deque)
    in_flight: int = 0
    served: int = 0
    throttled: int = 0
    max_window: int = 0
    max_in_flight: int = 0
    first_s: float = 0.0
    last_s: float = 0.0

    @property
    def steady_per_s(self) -> float:
        """Rate between the first and the last request, without the cold start."""
        span = self.last_s - self.first_s
        return (self.served - 1) / span if span > 0 else 0.0

    async def call(self) -> None:
        now = time.monotonic()
        while self.arrivals and self.arrivals[0] <= now - self.limit.per_s:
            self.arrivals.popleft()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if len(self.arrivals) >= self.limit.requests or self.in_flight > self.limit.concurrency:
                self.throttled += 1
                return
            self.arrivals.append(now)
            self.first_s = self.first_s or now
            self.last_s = now
            self.served += 1
            self.max_window = max(self.max_window, len(self.arrivals))
            await asyncio.sleep(random.uniform(*PROVIDER_LATENCY_S))
        finally:
            self.in_flight -= 1


async def run(
    limiter: RateLimiter, limit: RateLimit, *, seconds: float, workers: int, bursty: bool
) -> tuple[dict[str, ThrottledMailbox], list[float]]:
    """Returns each mailbox's provider view and the latency of every acquire call (s).

    Mailbox names get a fresh suffix per run, so no run inherits another's limiter state."""
    run_id = uuid.uuid4().hex[:6]
    provider = {m: ThrottledMailbox(limit) for m in MAILBOXES}
    latencies: list[float] = []
    start = time.monotonic()
    end = start + seconds

    async def worker(mailbox: str) -> None:
        while (now := time.monotonic()) < end:
            if bursty and (now - start) % (BURST_ON_S + BURST_OFF_S) >= BURST_ON_S:
                await asyncio.sleep(0.01)
                continue
            t0 = time.perf_counter()
            got = await limiter.acquire(f"{mailbox}#{run_id}", limit)
            latencies.append(time.perf_counter() - t0)
            if not isinstance(got, Lease):
                await asyncio.sleep(got)
                continue
            try:
                await provider[mailbox].call()
            finally:
                await limiter.release(got)

    await asyncio.gather(*(worker(MAILBOXES[i % len(MAILBOXES)]) for i in range(workers)))
    return provider, latencies


def report(
    name: str,
    limit: RateLimit,
    seconds: float,
    provider: dict[str, ThrottledMailbox],
    latencies: list[float],
) -> None:
    allowed = limit.requests / limit.per_s
    print(f"\n{name}: {len(latencies)} acquire calls, ", end="")
    cuts = statistics.quantiles(latencies, n=100)
    print(f"latency p50 {cuts[49] * 1e3:.2f} ms, p99 {cuts[98] * 1e3:.2f} ms")
    print(
        f"  {'mailbox':<15} {'served':>6} {'achieved/s':>10} {'steady/s':>8} {'allowed/s':>9} "
        f"{'ratio':>6} "
        f"{'max/window':>10} {'max conc':>8} {'429 share':>9}"
    )
    for mailbox, seen in provider.items():
        attempts = seen.served + seen.throttled
        print(
            f"  {mailbox:<15} {seen.served:>6} {seen.served / seconds:>10.1f} "
            f"{seen.steady_per_s:>8.1f} {allowed:>9.1f} "
            f"{seen.served / seconds / allowed:>6.3f} {seen.max_window:>6}/{limit.requests:<3} "
            f"{seen.max_in_flight:>4}/{limit.concurrency:<3} "
            f"{seen.throttled / max(attempts, 1):>9.2%}"
        )


@asynccontextmanager
async def redis_url() -> AsyncIterator[str]:
    """``SYNCSVC_REDIS_URL`` if set, else a throwaway redis-server of our own."""
    url = os.environ.get("SYNCSVC_REDIS_URL")
    if url:
        yield url
        return
    with (
        tempfile.TemporaryDirectory(prefix="bench-redis-") as folder,
        RedisServer(Path(folder)) as server,
    ):
        yield server.url


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--per-s", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    limit = RateLimit(args.requests, args.per_s, args.concurrency)
    print(
        f"{len(MAILBOXES)} mailboxes at {limit.requests} per {limit.per_s:g} s, "
        f"{limit.concurrency} at once (burst {limit.capacity}, sustained "
        f"{limit.refill_per_s:g}/s = {limit.refill_per_s * limit.per_s / limit.requests:.0%}); "
        f"{args.workers} workers, provider latency "
        f"{PROVIDER_LATENCY_S[0] * 1e3:g}–{PROVIDER_LATENCY_S[1] * 1e3:g} ms"
    )
    async with redis_url() as url:
        for bursty in (False, True):
            load = "steady"
            if bursty:
                on_share = BURST_ON_S / (BURST_ON_S + BURST_OFF_S)
                load = f"bursty, busy {BURST_ON_S:g} s / idle {BURST_OFF_S:g} s ({on_share:.0%})"
            memory = MemoryRateLimiter()
            provider, latencies = await run(
                memory, limit, seconds=args.seconds, workers=args.workers, bursty=bursty
            )
            report(f"memory, {load}", limit, args.seconds, provider, latencies)
            shared = RedisRateLimiter.from_url(url)
            try:
                provider, latencies = await run(
                    shared, limit, seconds=args.seconds, workers=args.workers, bursty=bursty
                )
            finally:
                await shared.aclose()
            report(f"redis, {load}", limit, args.seconds, provider, latencies)


if __name__ == "__main__":
    asyncio.run(main())
