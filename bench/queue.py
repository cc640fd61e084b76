"""How close the real sync worker keeps mailboxes to a provider's limit, and how often it hits it.

Four mailboxes, each with a batch of creates, drained by the real ``Worker`` (claims, limiter,
reconcile, ledger writes) on a fresh SQLite file. The provider is in-process: an implementation
of the ``CalendarProvider`` Protocol that keeps a rolling window of arrivals and a concurrency
cap per mailbox and answers ``Throttled`` (with the exact Retry-After) when a call is over
either, as Graph does with 429. Printed per mailbox: calls accepted, the achieved rate between
its first and last accepted call and over the whole drain, the allowed rate and the ratio (goal
>= 0.95), the most calls in any window and at once, and the share of throttled answers (goal
<= 1 %).

    python -m bench.queue [--events 600] [--requests 50] [--per-s 1] [--concurrency 4]
                          [--latency-ms 10] [--batch 1] [--redis]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import func, select

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.errors import ProviderNotFound, Throttled
from syncsvc.limits import RateLimit
from syncsvc.providers.base import (
    BatchResult,
    BusyInterval,
    CalendarProvider,
    EventRef,
    EventSpec,
    TimeOff,
)
from syncsvc.queue.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from syncsvc.queue.worker import Worker
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from syncsvc.store.models import ExternalEvent, User

MAILBOXES = ("a", "b", "c", "d")
BENCH_SECRET_KEY = "bench-queue-secret-key-" + "b" * 20
#: Users need a calendar connection for the outbox; this address is never called.
FAKE_CALDAV_URL = "http://calendar.invalid/{user}/"


@dataclass(slots=True)
class ThrottledMailbox:
    """The provider's view of one mailbox: a rolling window and a concurrency cap (Graph's
    ``MailboxRequests`` and ``MailboxConcurrency``), with a record of what it saw."""

    requests: int
    window_s: float
    concurrency: int
    latency_s: float = 0.0
    events: dict[str, EventSpec] = field(default_factory=dict)
    window: deque[float] = field(default_factory=deque)
    in_flight: int = 0
    max_in_flight: int = 0
    accepted_at: list[float] = field(default_factory=list)
    throttled: int = 0

    async def call(self) -> None:
        """One metered call: raises ``Throttled`` when over the limit, else takes its time."""
        now = time.monotonic()
        while self.window and self.window[0] <= now - self.window_s:
            self.window.popleft()
        if len(self.window) >= self.requests:
            self.throttled += 1
            raise Throttled("MailboxRequests", self.window[0] + self.window_s - now)
        if self.in_flight >= self.concurrency:
            self.throttled += 1
            raise Throttled("MailboxConcurrency", 1.0)
        self.window.append(now)
        self.accepted_at.append(now)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency_s > 0:
                await asyncio.sleep(self.latency_s)
        finally:
            self.in_flight -= 1

    def busiest_window(self) -> int:
        times = self.accepted_at
        return max(
            (bisect.bisect_left(times, t + self.window_s) - i for i, t in enumerate(times)),
            default=0,
        )


class ThrottledCalendar:
    """A ``CalendarProvider`` over one ``ThrottledMailbox``: events keyed by ``spec.key``, so a
    repeated create returns the first event (idempotent, like Graph's ``transactionId``)."""

    def __init__(self, mailbox: ThrottledMailbox, batch_max: int = 1) -> None:
        self.mailbox = mailbox
        self.batch_max = batch_max

    async def create(self, spec: EventSpec) -> EventRef:
        await self.mailbox.call()
        self.mailbox.events.setdefault(spec.key, spec)
        return EventRef(spec.key, "1")

    async def update(self, ref: EventRef, spec: EventSpec) -> EventRef:
        await self.mailbox.call()
        if ref.event_id not in self.mailbox.events:
            raise ProviderNotFound(ref.event_id)
        self.mailbox.events[ref.event_id] = spec
        return EventRef(ref.event_id, str(spec.sequence + 1))

    async def delete(self, ref: EventRef) -> None:
        await self.mailbox.call()
        self.mailbox.events.pop(ref.event_id, None)

    async def find(self, key: str) -> EventRef | None:
        await self.mailbox.call()
        return EventRef(key, "1") if key in self.mailbox.events else None

    async def find_batch(self, batch_id: str) -> Sequence[EventRef]:
        await self.mailbox.call()
        return [EventRef(k, "1") for k, s in self.mailbox.events.items() if s.batch_id == batch_id]

    async def time_off(self, start: date, end: date) -> TimeOff:
        return TimeOff()

    async def busy(self, start: datetime, end: datetime) -> Sequence[BusyInterval]:
        return []

    async def create_many(self, specs: Sequence[EventSpec]) -> Sequence[BatchResult]:
        """Each item is metered on its own, and items are served ``concurrency`` at a time, as
        Graph serves the items of a ``$batch`` to one mailbox."""
        gate = asyncio.Semaphore(self.mailbox.concurrency)

        async def one(spec: EventSpec) -> BatchResult:
            async with gate:
                try:
                    return BatchResult(spec.key, ref=await self.create(spec))
                except Throttled as exc:
                    return BatchResult(spec.key, error=exc)

        return list(await asyncio.gather(*(one(s) for s in specs)))

    async def aclose(self) -> None:
        """Nothing to close: the mailbox lives in this process."""


def provider_factory(providers: Mapping[str, CalendarProvider]) -> Any:
    """The worker's provider factory: each user's calendar by user id."""

    async def factory(user: User) -> CalendarProvider:
        return providers[user.id]

    return factory


async def add_users(
    client: TestClient[Any, Any], headers: dict[str, str], users: Sequence[str]
) -> None:
    for user in users:
        answer = await client.put(
            f"/v1/users/{user}",
            headers=headers,
            json={
                "name": user,
                "timezone": "Europe/Copenhagen",
                "country": "DK",
                "calendar": {
                    "provider": "caldav",
                    "url": FAKE_CALDAV_URL.format(user=user),
                    "username": user,
                    "password": "unused",
                },
            },
        )
        assert answer.status == 200, await answer.text()


async def commit_batch(
    client: TestClient[Any, Any], headers: dict[str, str], users: Sequence[str], count: int
) -> str:
    body = {
        "targetgroup_name": "Bench",
        "targets": [{"id": f"t{i}", "name": f"Target {i}"} for i in range(count)],
        "template": {"kind": "meeting", "subject": "Visit $account-name$"},
        "schedule": {"start_date": "2027-06-07", "duration": "00:30", "interval": "00:15"},
        "assignment": {"mode": "users", "users": list(users)},
    }
    answer = await client.post("/v1/batches", headers=headers, json=body)
    assert answer.status == 201, await answer.text()
    return str((await answer.json())["id"])


@contextlib.asynccontextmanager
async def service(settings: Settings) -> AsyncIterator[tuple[TestClient[Any, Any], Database, Any]]:
    db = Database(settings.database_url)
    await db.migrate()
    _, key = await create_tenant(db, "bench")
    try:
        async with TestClient(TestServer(build_app(settings, db))) as client:
            yield client, db, {"Authorization": f"Bearer {key}"}
    finally:
        await db.aclose()


async def pending(db: Database) -> int:
    async with db.session() as s:
        return int(
            await s.scalar(
                select(func.count())
                .select_from(ExternalEvent)
                .where(ExternalEvent.state != "synced")
            )
            or 0
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=400, help="creates per mailbox")
    parser.add_argument("--requests", type=int, default=250)
    parser.add_argument("--per-s", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1, help="provider batch_max")
    parser.add_argument("--redis", action="store_true", help="the Redis limiter (own server)")
    parser.add_argument("--mailboxes", type=int, default=len(MAILBOXES))
    args = parser.parse_args()
    mailboxes = MAILBOXES[: args.mailboxes]
    limit = RateLimit(args.requests, args.per_s, args.concurrency)
    allowed = limit.requests / limit.per_s
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as folder:
        settings = Settings(
            database_url=f"sqlite:///{Path(folder) / 'bench.db'}",
            secret_key=BENCH_SECRET_KEY,
            limits={"caldav": limit},
        )
        boxes = {
            m: ThrottledMailbox(
                limit.requests, limit.per_s, limit.concurrency, args.latency_ms / 1000
            )
            for m in mailboxes
        }
        calendars = {m: ThrottledCalendar(box, args.batch) for m, box in boxes.items()}
        async with contextlib.AsyncExitStack() as stack:
            limiter: RateLimiter = MemoryRateLimiter()
            if args.redis:
                from tests.servers.redis import RedisServer

                server = stack.enter_context(RedisServer(Path(folder)))
                redis = RedisRateLimiter.from_url(server.url)
                stack.push_async_callback(redis.aclose)
                limiter = redis
            client, db, headers = await stack.enter_async_context(service(settings))
            await add_users(client, headers, mailboxes)
            t0 = time.monotonic()
            await commit_batch(client, headers, mailboxes, args.events * len(mailboxes))
            commit_s = time.monotonic() - t0
            worker = Worker(
                settings, db, limiter, provider_factory(calendars), embedded=not args.redis
            )
            stop = asyncio.Event()
            started = time.monotonic()
            task = asyncio.create_task(worker.run(stop))
            while True:  # the ledger is the truth: poll it until nothing is left to sync
                if not await pending(db):
                    break
                await asyncio.sleep(0.25)
            drain_s = time.monotonic() - started
            stop.set()
            await task
    print(
        f"{len(mailboxes)} mailboxes x {args.events} creates, provider limit "
        f"{limit.requests} per {limit.per_s:g} s and {limit.concurrency} at once "
        f"(limiter burst {limit.capacity}, sustained {limit.refill_per_s:g}/s), latency "
        f"{args.latency_ms:g} ms, batch_max {args.batch}, "
        f"{'Redis' if args.redis else 'in-process'} limiter; commit {commit_s:.1f} s, "
        f"drain {drain_s:.1f} s"
    )
    print(
        f"  {'mailbox':<8} {'calls':>6} {'steady/s':>9} {'overall/s':>9} {'allowed/s':>9} "
        f"{'ratio':>6} {'max/window':>10} {'max conc':>8} {'429 share':>9}"
    )
    for name, box in boxes.items():
        times = box.accepted_at
        span = times[-1] - times[0] if len(times) > 1 else 0.0
        steady = (len(times) - 1) / span if span > 0 else 0.0
        calls = len(times) + box.throttled
        print(
            f"  {name:<8} {len(times):>6} {steady:>9.2f} {len(times) / drain_s:>9.2f} "
            f"{allowed:>9.2f} {steady / allowed:>6.3f} "
            f"{box.busiest_window():>6}/{limit.requests:<3} "
            f"{box.max_in_flight:>4}/{limit.concurrency:<3} {box.throttled / calls:>9.2%}"
        )
        assert len(box.events) == args.events, "every create landed once"


if __name__ == "__main__":
    asyncio.run(main())
