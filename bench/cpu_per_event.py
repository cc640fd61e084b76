"""Worker CPU per synced event, provider latency excluded (issue 15's goal: ≤ 1 ms, so that one
worker process keeps ≥ 200 Graph mailboxes at their limit).

A batch of creates over ``--mailboxes`` users is drained by the real ``Worker`` (claims, limiter,
reconcile, ledger writes) against in-process calendars that answer at once and never throttle.
What is measured is this process's CPU time (``time.process_time``) from the worker's start to
the last event synced, divided by the events: the database server's own CPU is not in it on
PostgreSQL, SQLite's is (it runs in this process). ``--profile`` prints where the time goes.

    .venv/bin/python -m bench.cpu_per_event [--mailboxes 200] [--events 10] [--batch 20]
                                            [--postgres] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

from bench.queue import (
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

BENCH_SECRET_KEY = "bench-cpu-per-event-secret-key-" + "c" * 16
GOAL_MS = 1.0
#: Graph's per-mailbox limit, 10,000 requests per 10 minutes.
GRAPH_MAILBOX_PER_S = 10_000 / 600
GOAL_MAILBOXES = 200
UNLIMITED = RateLimit(1_000_000_000, 1.0, 16)


async def run(args: argparse.Namespace) -> None:
    users = [f"u{i}" for i in range(args.mailboxes)]
    calendars = {
        user: ThrottledCalendar(ThrottledMailbox(1_000_000_000, 1.0, 1_000), args.batch)
        for user in users
    }
    total = args.mailboxes * args.events
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-cpu-"))
        database_url = f"sqlite:///{Path(folder) / 'bench.db'}"
        if args.postgres:
            from tests.servers.postgres import start_postgres

            server = start_postgres()
            stack.callback(server.stop)
            database_url = await server.create_database()
        settings = Settings(
            database_url=database_url,
            secret_key=BENCH_SECRET_KEY,
            limits={"caldav": UNLIMITED},
            max_plan_users=max(1000, args.mailboxes),
        )
        async with service(settings) as (client, db, headers):
            await add_users(client, headers, users)
            await commit_batch(client, headers, users, total)
            worker = Worker(
                settings, db, MemoryRateLimiter(), provider_factory(calendars), embedded=True
            )
            profile = cProfile.Profile() if args.profile else None
            stop = asyncio.Event()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            if profile:
                profile.enable()
            running = asyncio.create_task(worker.run(stop))
            while await pending(db):  # noqa: ASYNC110 (the database is what is watched)
                await asyncio.sleep(0.25)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            if profile:
                profile.disable()
            stop.set()
            await running
    per_event_ms = cpu / total * 1000
    mailboxes = 1000 / per_event_ms / GRAPH_MAILBOX_PER_S
    print(
        f"{'PostgreSQL' if args.postgres else 'SQLite'}: {total:,} events over "
        f"{args.mailboxes} mailboxes (batch {args.batch}): {cpu:.1f} s CPU in {wall:.1f} s, "
        f"{per_event_ms:.2f} ms CPU per event (goal ≤ {GOAL_MS:g} ms); "
        f"one process would keep {mailboxes:.0f} Graph mailboxes at their limit "
        f"(goal ≥ {GOAL_MAILBOXES})"
    )
    if profile:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mailboxes", type=int, default=200)
    parser.add_argument("--events", type=int, default=10, help="creates per mailbox")
    parser.add_argument("--batch", type=int, default=20, help="creates per provider call")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL (own server)")
    parser.add_argument("--profile", action="store_true")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
