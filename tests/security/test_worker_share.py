"""One tenant's drain over many mailboxes does not keep another tenant's single change waiting.

The worker has four mailbox slots; tenant "big" has twelve mailboxes of 40 creates each behind
a slow provider (one call at a time, 50 ms each), so every one of its cycles lasts two seconds
or more and all four slots are taken by its first wave. A change by tenant "small" then has to
get a slot: with slots handed out longest-waiting-first it waits until a first-wave cycle ends
(after that mailbox's 40 events, 160 in all); shared between tenants, one of "big"'s cycles
ends after its work in hand and "small" is served. What is asserted is how much of the drain
happened before the change landed, not how long it took: the how-soon is ``bench/tenants.py``.
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
from syncsvc.limits import RateLimit
from syncsvc.queue.ratelimit import MemoryRateLimiter
from syncsvc.queue.worker import Worker
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from syncsvc.store.models import ExternalEvent

LIMIT = RateLimit(1000, 1.0, 1)
BIG_MAILBOXES = 12
EVENTS_EACH = 40
SLOTS = 4
SETTLE_TIMEOUT_S = 60.0


async def synced(db: Database, tenant: str) -> int:
    async with db.session() as s:
        return int(
            await s.scalar(
                select(func.count())
                .select_from(ExternalEvent)
                .where(ExternalEvent.tenant_id == tenant, ExternalEvent.state == "synced")
            )
            or 0
        )


async def until(check: Any, what: str) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


@pytest.mark.timeout(180)
async def test_a_second_tenants_change_overtakes_the_first_tenants_drain(tmp_path: Any) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'tenants.db'}",
        secret_key=BENCH_SECRET_KEY,
        limits={"caldav": LIMIT},
    )
    big_users = [f"big-{i}" for i in range(BIG_MAILBOXES)]
    boxes = {
        user: ThrottledMailbox(LIMIT.requests, LIMIT.per_s, LIMIT.concurrency, 0.05)
        for user in [*big_users, "small-0"]
    }
    calendars = {user: ThrottledCalendar(box) for user, box in boxes.items()}
    async with service(settings) as (client, db, big):
        small_tenant, small_key = await create_tenant(db, "small")
        small = {"Authorization": f"Bearer {small_key}"}
        await add_users(client, big, big_users)
        await add_users(client, small, ["small-0"])
        worker = Worker(
            settings,
            db,
            MemoryRateLimiter(),
            provider_factory(calendars),
            embedded=True,
            slots=SLOTS,
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            small_batch = await commit_batch(client, small, ["small-0"], 1)

            async def small_synced() -> bool:
                return bool(await synced(db, small_tenant.id))

            await until(small_synced, "the small tenant's first event")

            big_batch = await commit_batch(client, big, big_users, BIG_MAILBOXES * EVENTS_EACH)
            async with db.session() as s:
                big_tenant_id = await s.scalar(
                    select(ExternalEvent.tenant_id).where(ExternalEvent.batch_id == big_batch)
                )
            assert big_tenant_id is not None

            async def first_wave_under_way() -> bool:
                return await synced(db, big_tenant_id) >= SLOTS

            await until(first_wave_under_way, "the big tenant's drain")

            async with db.session() as s:
                activity_id = await s.scalar(
                    select(ExternalEvent.activity_id).where(ExternalEvent.batch_id == small_batch)
                )
            answer = await client.patch(
                f"/v1/activities/{activity_id}", headers=small, json={"subject": "Moved"}
            )
            assert answer.status == 200, await answer.text()
            at_change = await synced(db, big_tenant_id)

            async def landed() -> bool:
                return any(e.subject == "Moved" for e in boxes["small-0"].events.values())

            await until(landed, "the small tenant's change")
            at_landing = await synced(db, big_tenant_id)
            # The first wave was far from over when the change was made, and it still was when
            # the change landed (without sharing, it lands only after a first-wave mailbox's
            # 40 events, when the four slots have done about 160).
            assert at_change < SLOTS * EVENTS_EACH // 2, at_change
            assert at_landing < SLOTS * EVENTS_EACH // 2, (at_change, at_landing)

            # ... and the big tenant's drain goes on to the end, each create once.
            async def drained() -> bool:
                return await synced(db, big_tenant_id) == BIG_MAILBOXES * EVENTS_EACH

            await until(drained, "the big tenant's drain to finish")
            assert all(len(boxes[u].events) == EVENTS_EACH for u in big_users)
            assert all(box.throttled == 0 for box in boxes.values())
        finally:
            stop.set()
            await running
