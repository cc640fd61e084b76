"""Worker throughput by number of worker processes (1 → 2 → 4) on one PostgreSQL queue.

For each count a fresh database gets the same batch of creates over ``--mailboxes`` users;
then that many processes, each running the real ``Worker`` (claims, limiter, reconcile, ledger
writes) against in-process calendars that answer after ``--latency-ms`` and never throttle,
drain it together. Timed from the moment every process is ready (imports and connections
excluded) until no ledger row is left pending; printed as events per second and the ratio to
one process. On a machine with fewer cores than processes (plus the database server's own
share), the ratio is bounded by the cores, not by the queue: the figure to watch is that it
does not fall as processes are added (claims do not fight over rows: ``FOR UPDATE SKIP
LOCKED`` and one claim per mailbox at a time).

    .venv/bin/python -m bench.throughput [--mailboxes 200] [--events 25] [--latency-ms 5]
                                         [--processes 1,2,4]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

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
from syncsvc.store.db import Database

BENCH_SECRET_KEY = "bench-throughput-secret-key-" + "t" * 16
UNLIMITED = RateLimit(1_000_000_000, 1.0, 16)
POLL_S = 0.1  # ends the timing up to this late: runs last seconds


def _settings(database_url: str, mailboxes: int) -> Settings:
    return Settings(
        database_url=database_url,
        secret_key=BENCH_SECRET_KEY,
        limits={"caldav": UNLIMITED},
        max_plan_users=max(1000, mailboxes),
    )


def _drain(
    database_url: str,
    users: list[str],
    args: Any,
    ready: Any,
    go: MpEvent,
    done: MpEvent,
    spent: Any,
) -> None:
    """One worker process: ready, then work until the parent saw the queue drained."""

    async def run() -> None:
        db = Database(database_url)
        calendars = {
            user: ThrottledCalendar(
                ThrottledMailbox(1_000_000_000, 1.0, 1_000, args.latency_ms / 1000), args.batch
            )
            for user in users
        }
        worker = Worker(
            _settings(database_url, len(users)),
            db,
            MemoryRateLimiter(),
            provider_factory(calendars),
            embedded=False,
        )
        await db.ping()
        ready.put(os.getpid())
        await asyncio.to_thread(go.wait)
        cpu = time.process_time()
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await asyncio.to_thread(done.wait)
        spent.put(time.process_time() - cpu)
        stop.set()
        await running
        await db.aclose()

    asyncio.run(run())


async def one_count(database_url: str, processes: int, args: argparse.Namespace) -> float:
    users = [f"u{i}" for i in range(args.mailboxes)]
    total = args.mailboxes * args.events
    async with service(_settings(database_url, args.mailboxes)) as (client, _db, headers):
        await add_users(client, headers, users)
        await commit_batch(client, headers, users, total)
    mp = multiprocessing.get_context("spawn")
    ready, go, done, spent = mp.Queue(), mp.Event(), mp.Event(), mp.Queue()
    children = [
        mp.Process(target=_drain, args=(database_url, users, args, ready, go, done, spent))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    for _ in children:
        await asyncio.to_thread(ready.get, True, 120)
    watch = Database(database_url)
    started, db_cpu = time.perf_counter(), _postgres_cpu_s()
    go.set()
    # Polled rarely: counting the ledger is work for the database the workers share.
    while await pending(watch):  # noqa: ASYNC110 (the database is what is watched)
        await asyncio.sleep(POLL_S)
    elapsed, db_cpu = time.perf_counter() - started, _postgres_cpu_s() - db_cpu
    done.set()
    workers_cpu = sum([await asyncio.to_thread(spent.get, True, 60) for _ in children])
    await watch.aclose()
    for child in children:
        await asyncio.to_thread(child.join, 60)
        assert child.exitcode == 0, f"worker process exited {child.exitcode}"
    return Run(total / elapsed, workers_cpu / total * 1000, db_cpu / total * 1000)


@dataclass(frozen=True, slots=True)
class Run:
    events_per_s: float
    #: CPU per event of the worker processes together, and of the database server.
    workers_ms: float
    database_ms: float


def _postgres_cpu_s() -> float:
    """User and system CPU of every ``postgres`` process on the machine so far (the bench's
    own server is the only one)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)
        except OSError:
            continue  # gone meanwhile
        if fields[0].endswith("(postgres"):
            parts = fields[1].split()
            total += int(parts[11]) + int(parts[12])  # utime, stime
    return total / tick


async def run(args: argparse.Namespace) -> None:
    from tests.servers.postgres import start_postgres

    counts = [int(n) for n in args.processes.split(",")]
    server = start_postgres()
    try:
        runs: dict[int, Run] = {}
        for processes in counts:
            got = runs[processes] = await one_count(await server.create_database(), processes, args)
            print(
                f"{processes} worker process{'es' if processes > 1 else ''}: "
                f"{args.mailboxes * args.events:,} events over {args.mailboxes} mailboxes "
                f"(latency {args.latency_ms:g} ms, batch {args.batch}): "
                f"{got.events_per_s:,.0f} events/s, "
                f"{got.events_per_s / runs[counts[0]].events_per_s:.2f}× {counts[0]}; "
                f"CPU per event: workers {got.workers_ms:.2f} ms, "
                f"PostgreSQL {got.database_ms:.2f} ms (on {os.cpu_count()} cores)",
                flush=True,
            )
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mailboxes", type=int, default=200)
    parser.add_argument("--events", type=int, default=25, help="creates per mailbox")
    parser.add_argument("--batch", type=int, default=20, help="creates per provider call")
    parser.add_argument("--latency-ms", type=float, default=5.0, help="per provider call")
    parser.add_argument("--processes", default="1,2,4")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
