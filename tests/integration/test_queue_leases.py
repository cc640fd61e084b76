"""Claims are short leases the holder renews: a slow call is never run twice at once, and a
worker that stops hands its claims back instead of leaving them for the lease to run out."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from bench.queue import (
    BENCH_SECRET_KEY,
    ThrottledCalendar,
    ThrottledMailbox,
    add_users,
    commit_batch,
    pending,
    provider_factory,
    service,
)
from syncsvc.config import Settings
from syncsvc.limits import RateLimit
from syncsvc.providers.base import EventRef, EventSpec
from syncsvc.queue import worker as worker_module
from syncsvc.queue.ratelimit import MemoryRateLimiter
from syncsvc.queue.worker import Worker
from syncsvc.store.models import Operation
from syncsvc.store.types import utcnow

LIMIT = RateLimit(1000, 1.0, 4)
SETTLE_TIMEOUT_S = 60.0


class GatedCalendar(ThrottledCalendar):
    """Creates wait at a gate (a provider call that takes as long as the test wants); every
    call is counted by event key, so a second concurrent run of one create shows."""

    def __init__(self, mailbox: ThrottledMailbox, calls: Counter[str]) -> None:
        super().__init__(mailbox)
        self.gate = asyncio.Event()
        self.calls = calls
        self.started = 0

    async def create(self, spec: EventSpec) -> EventRef:
        self.calls[spec.key] += 1
        self.started += 1
        await self.gate.wait()
        return await super().create(spec)


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'leases.db'}",
        secret_key=BENCH_SECRET_KEY,
        limits={"caldav": LIMIT},
    )


async def _until(predicate: object, what: str) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while not await predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
async def test_a_stopping_worker_hands_its_claims_back_at_once(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    box = ThrottledMailbox(LIMIT.requests, LIMIT.per_s, LIMIT.concurrency)
    calls: Counter[str] = Counter()
    stuck = GatedCalendar(box, calls)  # never opens: the worker is stopped mid-call
    async with service(settings) as (client, db, headers):
        await add_users(client, headers, ["u1"])
        await commit_batch(client, headers, ["u1"], 3)
        first = Worker(
            settings, db, MemoryRateLimiter(), provider_factory({"u1": stuck}), embedded=False
        )
        stop = asyncio.Event()
        running = asyncio.create_task(first.run(stop))

        async def all_in_flight() -> bool:
            return stuck.started == 3

        await _until(all_in_flight, "three creates in flight")
        stop.set()
        await running

        async with db.session() as s:
            ops = (await s.scalars(select(Operation).where(Operation.kind == "create"))).all()
        # Back to pending right away, no attempt spent: nobody waits for the lease.
        assert [(op.state, op.attempts) for op in ops] == [("pending", 0)] * 3
        assert all(op.not_before <= utcnow() for op in ops)

        second = Worker(
            settings,
            db,
            MemoryRateLimiter(),
            provider_factory({"u1": ThrottledCalendar(box)}),
            embedded=False,
        )
        stop = asyncio.Event()
        running = asyncio.create_task(second.run(stop))
        try:

            async def drained() -> bool:
                return await pending(db) == 0

            await _until(drained, "the second worker syncs everything")
        finally:
            stop.set()
            await running
        assert len(box.events) == 3


@pytest.mark.timeout(120)
async def test_a_renewed_lease_outlives_a_slow_call_and_no_create_runs_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Leases of three seconds renewed every 0.3 s; the calls take three lease lengths.
    monkeypatch.setattr(worker_module, "CLAIM_TTL_S", 3.0)
    monkeypatch.setattr(worker_module, "HEARTBEAT_S", 0.3)
    settings = _settings(tmp_path)
    box = ThrottledMailbox(LIMIT.requests, LIMIT.per_s, LIMIT.concurrency)
    calls: Counter[str] = Counter()
    calendars = [GatedCalendar(box, calls), GatedCalendar(box, calls)]
    async with service(settings) as (client, db, headers):
        await add_users(client, headers, ["u1"])
        await commit_batch(client, headers, ["u1"], 4)
        stop = asyncio.Event()
        workers = [
            Worker(settings, db, MemoryRateLimiter(), provider_factory({"u1": cal}), embedded=False)
            for cal in calendars
        ]
        runs = [asyncio.create_task(w.run(stop)) for w in workers]
        try:

            async def started() -> bool:
                return sum(c.started for c in calendars) >= 4

            await _until(started, "all four creates in flight")
            await asyncio.sleep(9.0)  # three lease lengths
            for cal in calendars:
                cal.gate.set()

            async def drained() -> bool:
                return await pending(db) == 0

            await _until(drained, "everything synced")
        finally:
            stop.set()
            await asyncio.gather(*runs)
        assert sorted(calls.values()) == [1, 1, 1, 1]  # each create ran once, by one worker
        assert len(box.events) == 4
