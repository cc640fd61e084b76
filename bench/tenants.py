"""How soon a second tenant's single change reaches its calendar while a first tenant drains.

Tenant "big" commits one batch of ``--mailboxes`` x ``--events`` creates (default 500 x 20 =
10,000); tenant "small" has one user with one synced event. While the real ``Worker`` drains
the big batch, "small" changes its activity's subject every ``--every-ms`` through the API and
the time until the in-process provider holds the new subject is recorded. Printed: the drain's
length and rate, and the changes' p50 / p95 / max (goal: p95 <= 2 s). The provider is
``bench/queue.py``'s throttled calendar (Graph's 10,000 requests per 10 minutes and 4 at once
per mailbox, ``--latency-ms`` per call); the database a fresh SQLite file, or PostgreSQL.

    python -m bench.tenants [--mailboxes 500] [--events 20] [--latency-ms 50] [--every-ms 500]
                            [--slots 64] [--postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

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
from syncsvc.queue.ratelimit import MemoryRateLimiter
from syncsvc.queue.worker import Worker
from syncsvc.service.tenants import create_tenant
from syncsvc.store.models import ExternalEvent

GRAPH_MAILBOX = RateLimit(10_000, 600.0, 4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mailboxes", type=int, default=500)
    parser.add_argument("--events", type=int, default=20, help="creates per mailbox")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--every-ms", type=float, default=500.0, help="between small's changes")
    parser.add_argument("--slots", type=int, help="the worker's cycles at once (64; SQLite 16)")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL (own server)")


async def run(args: argparse.Namespace) -> None:
    limit = GRAPH_MAILBOX
    big_users = [f"big-{i}" for i in range(args.mailboxes)]
    boxes = {
        user: ThrottledMailbox(
            limit.requests, limit.per_s, limit.concurrency, args.latency_ms / 1000
        )
        for user in [*big_users, "small-0"]
    }
    calendars = {user: ThrottledCalendar(box, 20) for user, box in boxes.items()}
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tenants-"))
        database_url = f"sqlite:///{Path(folder) / 'bench.db'}"
        if args.postgres:
            from tests.servers.postgres import start_postgres

            server = start_postgres()
            stack.callback(server.stop)
            database_url = await server.create_database()
        settings = Settings(
            database_url=database_url,
            secret_key=BENCH_SECRET_KEY,
            limits={"caldav": limit},
        )
        async with service(settings) as (client, db, big):
            _, small_key = await create_tenant(db, "small")
            small = {"Authorization": f"Bearer {small_key}"}
            await add_users(client, big, big_users)
            await add_users(client, small, ["small-0"])
            small_batch = await commit_batch(client, small, ["small-0"], 1)
            worker = Worker(
                settings,
                db,
                MemoryRateLimiter(),
                provider_factory(calendars),
                embedded=True,
                slots=args.slots,
            )
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            while True:  # the small tenant's event first
                if not await pending(db):
                    break
                await asyncio.sleep(0.05)
            async with db.session() as s:
                activity_id = await s.scalar(
                    select(ExternalEvent.activity_id).where(ExternalEvent.batch_id == small_batch)
                )
            t0 = time.monotonic()
            await commit_batch(client, big, big_users, args.mailboxes * args.events)
            commit_s = time.monotonic() - t0
            started = time.monotonic()
            waits: list[float] = []
            small_box = boxes["small-0"]
            while True:
                left = await pending(db)
                if not left:
                    break
                subject = f"Change {len(waits)}"
                answer = await client.patch(
                    f"/v1/activities/{activity_id}", headers=small, json={"subject": subject}
                )
                assert answer.status == 200, await answer.text()
                asked = time.monotonic()
                while True:
                    if any(e.subject == subject for e in small_box.events.values()):
                        break
                    await asyncio.sleep(0.01)
                waits.append(time.monotonic() - asked)
                await asyncio.sleep(args.every_ms / 1000)
            drain_s = time.monotonic() - started
            stop.set()
            await running
    total = args.mailboxes * args.events
    assert sum(len(boxes[u].events) for u in big_users) == total, "every create landed once"
    cuts = statistics.quantiles(waits, n=20, method="inclusive") if len(waits) > 1 else waits * 19
    print(
        f"big: {args.mailboxes} mailboxes x {args.events} creates (commit {commit_s:.1f} s), "
        f"drained in {drain_s:.1f} s ({total / drain_s:.0f} events/s), latency "
        f"{args.latency_ms:g} ms per call, {worker.slots} mailbox cycles at once, "
        f"{'PostgreSQL' if args.postgres else 'SQLite'}"
    )
    print(
        f"small: {len(waits)} single changes during the drain: p50 "
        f"{statistics.median(waits) * 1000:.0f} ms, p95 {cuts[18] * 1000:.0f} ms, max "
        f"{max(waits) * 1000:.0f} ms (goal p95 <= 2000 ms)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    await run(parser.parse_args())


if __name__ == "__main__":
    asyncio.run(main())
