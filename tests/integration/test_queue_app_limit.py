"""A provider's per-app limit holds over all mailboxes together, each under its own limit."""

from __future__ import annotations

import asyncio
import bisect
import time
from typing import Any

import pytest

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
from syncsvc.limits import APP_CONCURRENCY, RateLimit
from syncsvc.queue.ratelimit import MemoryRateLimiter
from syncsvc.queue.worker import Worker

MAILBOX_LIMIT = RateLimit(40, 1.0, 4)
#: Three mailboxes could do 3 × 40/s; the app may do 30/s in all.
APP_LIMIT = RateLimit(30, 1.0, APP_CONCURRENCY)
EVENTS_PER_MAILBOX = 40
USERS = ("a", "b", "c")


@pytest.mark.timeout(60)
async def test_the_app_limit_holds_across_mailboxes(tmp_path: Any) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'app.db'}",
        secret_key=BENCH_SECRET_KEY,
        limits={"caldav": MAILBOX_LIMIT},
        app_limits={"caldav": APP_LIMIT},
    )
    boxes = {
        user: ThrottledMailbox(
            MAILBOX_LIMIT.requests, MAILBOX_LIMIT.per_s, MAILBOX_LIMIT.concurrency, 0.002
        )
        for user in USERS
    }
    calendars = {user: ThrottledCalendar(box) for user, box in boxes.items()}
    async with service(settings) as (client, db, headers):
        await add_users(client, headers, list(USERS))
        await commit_batch(client, headers, list(USERS), EVENTS_PER_MAILBOX * len(USERS))
        worker = Worker(
            settings, db, MemoryRateLimiter(), provider_factory(calendars), embedded=True
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            deadline = time.monotonic() + 40
            while await pending(db):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await running

    assert [len(box.events) for box in boxes.values()] == [EVENTS_PER_MAILBOX] * len(USERS)
    assert all(box.throttled == 0 for box in boxes.values())
    together = sorted(t for box in boxes.values() for t in box.accepted_at)
    busiest = max(
        bisect.bisect_left(together, t + APP_LIMIT.per_s) - i for i, t in enumerate(together)
    )
    assert busiest <= APP_LIMIT.requests
    # Without the app limit the three mailboxes would have run at up to 3 × 40/s.
    spread_s = together[-1] - together[0]
    assert spread_s >= (len(together) - APP_LIMIT.requests) / APP_LIMIT.requests * 0.9
