"""A mailbox's bulk lane never starves its interactive lane or other mailboxes.

A 5,000-event batch drains into one mailbox at a time-scaled limit (20 requests/s, so the whole
drain would take over four minutes); meanwhile a single change to one of that mailbox's still
unsynced activities, and one to another mailbox's activity, must each reach the provider
within a few seconds. The provider is the in-process throttled calendar of ``bench/queue.py``
(429-style ``Throttled`` when a call is over its window or concurrency).
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
from syncsvc.store.db import Database
from syncsvc.store.models import ExternalEvent

BULK_EVENTS = 5_000
LIMIT = RateLimit(20, 1.0, 4)
#: A single change must be at the provider this soon after the API answered: generous, so a
#: busy machine cannot fail it; that it overtook the drain is asserted by what is left of the
#: bulk batch. How soon it really is: ``bench/queue.py``.
INTERACTIVE_DEADLINE_S = 20.0
SETTLE_TIMEOUT_S = 30.0


async def ledger_row(db: Database, activity_id: str) -> ExternalEvent:
    async with db.session() as s:
        row = await s.scalar(select(ExternalEvent).where(ExternalEvent.activity_id == activity_id))
    assert row is not None
    return row


async def unsynced(db: Database, batch_id: str) -> int:
    async with db.session() as s:
        return int(
            await s.scalar(
                select(func.count())
                .select_from(ExternalEvent)
                .where(ExternalEvent.batch_id == batch_id, ExternalEvent.state != "synced")
            )
            or 0
        )


async def wait_until_synced(
    db: Database, mailbox: ThrottledMailbox, activity_id: str, subject: str
) -> float:
    """Seconds until the ledger row is synced and the provider holds the new subject."""
    started = time.monotonic()
    while True:
        row = await ledger_row(db, activity_id)
        event = mailbox.events.get(row.event_id or "")
        if row.state == "synced" and event is not None and event.subject == subject:
            return time.monotonic() - started
        assert time.monotonic() - started < SETTLE_TIMEOUT_S, row.state
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
async def test_single_changes_overtake_a_5000_event_drain(tmp_path: Any) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'fair.db'}",
        secret_key=BENCH_SECRET_KEY,
        limits={"caldav": LIMIT},
    )
    boxes = {
        user: ThrottledMailbox(LIMIT.requests, LIMIT.per_s, LIMIT.concurrency, 0.005)
        for user in ("busy", "quiet")
    }
    calendars = {user: ThrottledCalendar(box) for user, box in boxes.items()}
    async with service(settings) as (client, db, headers):
        await add_users(client, headers, list(boxes))
        worker = Worker(
            settings, db, MemoryRateLimiter(), provider_factory(calendars), embedded=True
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            quiet_batch = await commit_batch(client, headers, ["quiet"], 3)
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while await unsynced(db, quiet_batch):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)

            bulk = await commit_batch(client, headers, ["busy"], BULK_EVENTS)
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while len(boxes["busy"].events) < 2 * LIMIT.requests:  # the drain is under way
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)

            async with db.session() as s:
                waiting = await s.scalar(
                    select(ExternalEvent.activity_id)
                    .where(ExternalEvent.batch_id == bulk, ExternalEvent.state == "pending_create")
                    .order_by(ExternalEvent.id.desc())
                    .limit(1)
                )
                quiet_activity = await s.scalar(
                    select(ExternalEvent.activity_id).where(ExternalEvent.batch_id == quiet_batch)
                )
            assert waiting is not None and quiet_activity is not None

            for activity_id, user, subject in (
                (waiting, "busy", "Moved: last of the bulk batch"),
                (quiet_activity, "quiet", "Moved: another mailbox"),
            ):
                answer = await client.patch(
                    f"/v1/activities/{activity_id}", headers=headers, json={"subject": subject}
                )
                assert answer.status == 200, await answer.text()
                took_s = await wait_until_synced(db, boxes[user], activity_id, subject)
                assert took_s < INTERACTIVE_DEADLINE_S, (user, took_s)

            # The bulk batch is far from drained, and nothing was ever over the limit.
            assert await unsynced(db, bulk) > BULK_EVENTS - 30 * LIMIT.requests
            assert all(box.throttled == 0 for box in boxes.values())
            assert all(box.max_in_flight <= LIMIT.concurrency for box in boxes.values())
        finally:
            stop.set()
            await running
