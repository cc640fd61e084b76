"""A ledger row whose work died (``failed``) takes the next change of its activity with a
fresh attempt budget, instead of swallowing it and every later one (issue: one dead update on
a server answering 423 kept a later cancel from ever reaching the calendar)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import select, update

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
from syncsvc.store.db import Database
from syncsvc.store.models import ExternalEvent, Operation

LIMIT = RateLimit(100, 1.0, 4)


async def unsettled(db: Database) -> int:
    async with db.session() as s:
        states = await s.scalars(select(ExternalEvent.state))
        return sum(state.startswith("pending") for state in states)


async def drain(db: Database, settings: Settings, calendar: ThrottledCalendar) -> None:
    worker = Worker(
        settings, db, MemoryRateLimiter(), provider_factory({"ann": calendar}), embedded=True
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        deadline = time.monotonic() + 30
        while await unsettled(db):
            assert time.monotonic() < deadline, "the queue did not drain"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await running


async def fail_all(db: Database) -> None:
    """What the worker leaves when an operation runs out of attempts."""
    async with db.session() as s, s.begin():
        await s.execute(
            update(Operation).where(Operation.ledger_id.is_not(None)).values(state="dead")
        )
        await s.execute(update(ExternalEvent).values(state="failed", attempts=8))


@pytest.mark.parametrize("made", [False, True], ids=["create died", "update died"])
async def test_a_change_after_dead_work_reaches_the_calendar(tmp_path: Any, made: bool) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'failed.db'}",
        secret_key=BENCH_SECRET_KEY,
        limits={"caldav": LIMIT},
    )
    box = ThrottledMailbox(LIMIT.requests, LIMIT.per_s, LIMIT.concurrency)
    calendar = ThrottledCalendar(box)
    async with service(settings) as (client, db, headers):
        await add_users(client, headers, ["ann"])
        batch = await commit_batch(client, headers, ["ann"], 2)
        if made:
            await drain(db, settings, calendar)  # the events exist; a later update died
        await fail_all(db)
        async with db.session() as s:
            first, second = list(
                await s.scalars(
                    select(ExternalEvent.activity_id)
                    .where(ExternalEvent.batch_id == batch)
                    .order_by(ExternalEvent.id)
                )
            )
        moved = await client.patch(
            f"/v1/activities/{first}", headers=headers, json={"subject": "Moved"}
        )
        assert moved.status == 200, await moved.text()
        cancelled = await client.delete(f"/v1/activities/{second}", headers=headers)
        assert cancelled.status == 200, await cancelled.text()
        await drain(db, settings, calendar)
        async with db.session() as s:
            rows = {
                r.activity_id: r
                for r in await s.scalars(
                    select(ExternalEvent).where(ExternalEvent.batch_id == batch)
                )
            }
            dead = await s.scalars(select(Operation.id).where(Operation.state == "dead"))
            assert list(dead) == []  # superseded by the changes that followed
    assert rows[first].state == "synced" and rows[second].state == "deleted"
    assert [e.subject for e in box.events.values()] == ["Moved"]  # the other one is gone
