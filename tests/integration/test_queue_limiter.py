"""An unreachable limiter costs time, never outcomes.

The worker runs against a limiter that fails (``Transient``, as the Redis limiter does while
Redis restarts) on every other release and pause, and against a provider that throttles now
and then. Every create still lands once and is recorded, no operation is given up, and every
concurrency slot is handed back once the limiter answers again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import func, select

from bench.queue import (
    BENCH_SECRET_KEY,
    ThrottledCalendar,
    ThrottledMailbox,
    add_users,
    commit_batch,
    provider_factory,
    service,
)
from syncsvc.config import Settings
from syncsvc.errors import Transient
from syncsvc.limits import RateLimit
from syncsvc.queue.ratelimit import Lease, MemoryRateLimiter
from syncsvc.queue.worker import Worker
from syncsvc.store.models import ExternalEvent, Operation

EVENTS = 60
#: The limiter allows 100 per 10 s; the provider only 6 per 1 s, so it throttles now and then.
LIMIT = RateLimit(100, 10.0, 4)
PROVIDER_REQUESTS, PROVIDER_WINDOW_S = 6, 1.0
TIMEOUT_S = 60.0


class FlakyLimiter(MemoryRateLimiter):
    """Every other ``release`` and ``pause`` fails as an unreachable Redis would."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.failures = 0

    def _flaky(self) -> None:
        self.calls += 1
        if self.calls % 2 == 0:
            self.failures += 1
            raise Transient("redis unavailable during rate-limit release", retry_after_s=0.5)

    async def release(self, lease: Lease) -> None:
        self._flaky()
        await super().release(lease)

    async def pause(self, mailbox: str, seconds: float) -> None:
        self._flaky()
        await super().pause(mailbox, seconds)

    def slots_held(self) -> int:
        return sum(len(held) for held in self._state.leases.values())


@pytest.mark.timeout(90)
async def test_failing_release_and_pause_lose_no_outcome(tmp_path: Any) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'limiter.db'}",
        secret_key=BENCH_SECRET_KEY,
        limits={"caldav": LIMIT},
    )
    box = ThrottledMailbox(PROVIDER_REQUESTS, PROVIDER_WINDOW_S, LIMIT.concurrency, 0.01)
    limiter = FlakyLimiter()
    async with service(settings) as (client, db, headers):
        await add_users(client, headers, ["u0"])
        batch = await commit_batch(client, headers, ["u0"], EVENTS)
        worker = Worker(
            settings, db, limiter, provider_factory({"u0": ThrottledCalendar(box)}), embedded=True
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while True:
                async with db.session() as s:
                    states = dict(
                        (
                            await s.execute(
                                select(ExternalEvent.state, func.count())
                                .where(ExternalEvent.batch_id == batch)
                                .group_by(ExternalEvent.state)
                            )
                        ).all()
                    )
                if states == {"synced": EVENTS}:
                    break
                assert time.monotonic() < deadline, states
                await asyncio.sleep(0.1)
            # Failed releases are retried in the background until the limiter answers.
            while limiter.slots_held():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await running
        async with db.session() as s:
            ops = dict(
                (
                    await s.execute(select(Operation.state, func.count()).group_by(Operation.state))
                ).all()
            )
    assert ops == {"done": EVENTS}
    assert len(box.events) == EVENTS
    assert box.throttled > 0  # the provider did push back, so pauses were asked for
    assert limiter.failures >= EVENTS // 2
