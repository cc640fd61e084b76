"""Table sizes stay flat while the service keeps working, because the workers prune history.

A long-ish run on a fresh database (SQLite, or a PostgreSQL of its own with ``--postgres``):
every round a batch is committed through the API with an ``Idempotency-Key``, the batch of a
few rounds ago is deleted, and a finished schedule run is recorded (as the scheduler would);
the real ``Worker`` syncs creates and deletes against an in-process calendar, recording its
cycles, and the real retention loop (``run_retention`` under ``supervised``, as the workers run
it) prunes with every age set to ``--age-s`` seconds instead of days. Printed every
``--sample-s``: the rows of each table. At the end, per table, the largest count of the last
third of the run against that of the middle third (goal: at most 1.25, flat); ``batches`` is
shown for comparison, nothing prunes it. Then the rows pruned per table and the longest
single ``DELETE`` (each is its own transaction; wall time seen by the event loop, waiting for
SQLite's write lock included), and the latency of the commits made meanwhile.
``--backlog N`` first inserts N done operations and N sync cycles older than every age, as a
database that never pruned before would have, for the first passes to work through.

    python -m bench.retention [--duration-s 120] [--age-s 15] [--targets 40] [--backlog 0]
                              [--postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, insert, select

from bench.queue import (
    BENCH_SECRET_KEY,
    MAILBOXES,
    ThrottledCalendar,
    ThrottledMailbox,
    add_users,
    provider_factory,
    service,
)
from syncsvc.config import Settings
from syncsvc.limits import RateLimit
from syncsvc.queue.ratelimit import MemoryRateLimiter
from syncsvc.queue.worker import Worker
from syncsvc.runtime import supervised
from syncsvc.service.retention import RetentionPolicy, run_retention
from syncsvc.store.db import Database
from syncsvc.store.models import (
    Activity,
    Batch,
    ExternalEvent,
    IdempotencyKey,
    Operation,
    Schedule,
    ScheduleRun,
    SyncCycle,
    Tenant,
)
from syncsvc.store.types import utcnow

#: Generous, so the provider never holds the worker back: this bench is about the database.
LIMIT = RateLimit(2000, 1.0, 8)
TABLES: dict[str, Any] = {
    "operations": Operation,
    "sync_cycles": SyncCycle,
    "idempotency_keys": IdempotencyKey,
    "schedule_runs": ScheduleRun,
    "activities": Activity,
    "external_events": ExternalEvent,
    "batches": Batch,
}
#: Largest count of the last third over that of the middle third that still counts as flat.
FLAT_RATIO_MAX = 1.25


async def sizes(db: Database) -> dict[str, int]:
    async with db.session() as s:
        return {
            name: int(await s.scalar(select(func.count()).select_from(model)) or 0)
            for name, model in TABLES.items()
        }


async def add_schedule(db: Database) -> tuple[str, str]:
    """A schedule whose runs the bench records itself (a cron fires every 15 minutes at most,
    too seldom for a run of minutes)."""
    async with db.session() as s, s.begin():
        tenant_id = str(await s.scalar(select(Tenant.id)))
        schedule = Schedule(
            id=uuid.uuid4().hex,
            tenant_id=tenant_id,
            name="bench",
            cron="0 6 * * mon",
            timezone="UTC",
            targets_url="https://crm.invalid/targets",
            next_run_at=utcnow() + timedelta(days=7),
        )
        s.add(schedule)
    return tenant_id, schedule.id


async def record_run(db: Database, tenant_id: str, schedule_id: str) -> None:
    now = utcnow()
    async with db.session() as s, s.begin():
        s.add(
            ScheduleRun(
                id=uuid.uuid4().hex,
                tenant_id=tenant_id,
                schedule_id=schedule_id,
                occurrence=now,
                state="ok",
                attempts=1,
                started_at=now,
                finished_at=now,
            )
        )


async def add_backlog(db: Database, tenant_id: str, rows: int, age: timedelta) -> None:
    """``rows`` done operations and cycles from before every age, oldest first."""
    start = utcnow() - 2 * age - timedelta(seconds=rows / 1000)
    chunk = 10_000
    for first in range(0, rows, chunk):
        stamps = [start + timedelta(milliseconds=n) for n in range(first, min(rows, first + chunk))]
        async with db.session() as s, s.begin():
            await s.execute(
                insert(Operation),
                [
                    {
                        "tenant_id": tenant_id,
                        "kind": "callback",
                        "mailbox": "crm:bench",
                        "state": "done",
                        "not_before": at,
                        "payload": {},
                        "created_at": at,
                        "updated_at": at,
                    }
                    for at in stamps
                ],
            )
            await s.execute(
                insert(SyncCycle),
                [{"provider": "caldav", "mailbox": "caldav:x", "started_at": at} for at in stamps],
            )


class Pruned(logging.Handler):
    """Sums the retention loop's ``event=retention.pruned`` lines by table."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.args and isinstance(record.args, tuple):
            table, count = str(record.args[0]), int(record.args[1])
            self.rows[table] = self.rows.get(table, 0) + count


def time_deletes(db: Database) -> list[float]:
    """Durations (s) of every DELETE statement the engine runs from now on."""
    durations: list[float] = []

    def before(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            conn.info.setdefault("delete_started", []).append(time.perf_counter())

    def after(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            durations.append(time.perf_counter() - conn.info["delete_started"].pop())

    event.listen(db.engine.sync_engine, "before_cursor_execute", before)
    event.listen(db.engine.sync_engine, "after_cursor_execute", after)
    return durations


async def commit(client: Any, headers: dict[str, str], targets: int, round_no: int) -> str:
    body = {
        "targetgroup_name": f"Round {round_no}",
        "targets": [{"id": f"r{round_no}t{i}", "name": f"Target {i}"} for i in range(targets)],
        "template": {"kind": "meeting", "subject": "Visit $account-name$"},
        "schedule": {"start_date": "2027-06-07", "duration": "00:30", "interval": "00:15"},
        "assignment": {"mode": "users", "users": list(MAILBOXES)},
    }
    keyed = {**headers, "Idempotency-Key": f"round-{round_no}"}
    answer = await client.post("/v1/batches", headers=keyed, json=body)
    assert answer.status == 201, await answer.text()
    return str((await answer.json())["id"])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument(
        "--age-s", type=float, default=15.0, help="every retention age (0: no pruning, a baseline)"
    )
    parser.add_argument("--interval-s", type=float, default=3.0, help="between pruning passes")
    parser.add_argument("--round-s", type=float, default=1.0, help="between commits")
    parser.add_argument("--targets", type=int, default=40, help="activities per batch")
    parser.add_argument("--delete-after", type=int, default=3, help="rounds a batch lives")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--backlog", type=int, default=0, help="old rows to start with")
    parser.add_argument("--postgres", action="store_true", help="a PostgreSQL of its own")
    args = parser.parse_args()
    age = timedelta(seconds=args.age_s)
    kept = age if args.age_s > 0 else None
    policy = RetentionPolicy(kept, kept, kept, kept, kept)
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as folder:
        async with contextlib.AsyncExitStack() as stack:
            url = f"sqlite:///{Path(folder) / 'bench.db'}"
            if args.postgres:
                from tests.servers.postgres import start_postgres

                server = start_postgres()
                stack.callback(server.stop)
                url = await server.create_database()
            settings = Settings(
                database_url=url, secret_key=BENCH_SECRET_KEY, limits={"caldav": LIMIT}
            )
            client, db, headers = await stack.enter_async_context(service(settings))
            await add_users(client, headers, MAILBOXES)
            tenant_id, schedule_id = await add_schedule(db)
            if args.backlog:
                await add_backlog(db, tenant_id, args.backlog, age)
            pruned = Pruned()
            retention_log = logging.getLogger("syncsvc.retention")
            retention_log.addHandler(pruned)
            retention_log.setLevel(logging.INFO)
            retention_log.propagate = False
            deletes = time_deletes(db)
            calendars = {
                m: ThrottledCalendar(ThrottledMailbox(LIMIT.requests, LIMIT.per_s, 8))
                for m in MAILBOXES
            }
            worker = Worker(
                settings, db, MemoryRateLimiter(), provider_factory(calendars), embedded=True
            )
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(worker.run(stop)),
                asyncio.create_task(
                    supervised(
                        "retention",
                        lambda s: run_retention(db, policy, s, interval_s=args.interval_s),
                        db,
                        stop,
                    )
                ),
            ]
            print(
                f"{'postgres' if args.postgres else 'sqlite'}: a batch of {args.targets} every "
                f"{args.round_s:g} s over {len(MAILBOXES)} mailboxes, deleted "
                f"{args.delete_after} rounds later; every age {args.age_s:g} s, a pass every "
                f"{args.interval_s / 2:g}-{args.interval_s:g} s; {args.duration_s:g} s"
            )
            print(f"  {'t/s':>5} " + " ".join(f"{name:>16}" for name in TABLES))
            samples: list[tuple[float, dict[str, int]]] = []
            live: list[str] = []
            started = time.monotonic()
            next_sample = started + args.sample_s
            round_no = 0
            commits: list[float] = []
            while (now := time.monotonic()) < started + args.duration_s:
                live.append(await commit(client, headers, args.targets, round_no))
                commits.append(time.monotonic() - now)
                await record_run(db, tenant_id, schedule_id)
                if len(live) > args.delete_after:
                    answer = await client.delete(f"/v1/batches/{live.pop(0)}", headers=headers)
                    assert answer.status == 202, await answer.text()
                round_no += 1
                if now >= next_sample:
                    counts = await sizes(db)
                    samples.append((now - started, counts))
                    print(
                        f"  {now - started:>5.0f} "
                        + " ".join(f"{counts[name]:>16}" for name in TABLES),
                        flush=True,
                    )
                    next_sample += args.sample_s
                await asyncio.sleep(
                    max(0.0, round_no * args.round_s - (time.monotonic() - started))
                )
            stop.set()
            await asyncio.gather(*tasks)
    third = max(1, len(samples) // 3)
    middle, last = samples[third : 2 * third], samples[-third:]
    print(f"  largest count, last third / middle third (goal <= {FLAT_RATIO_MAX:g}):")
    for name in TABLES:
        before = max((c[name] for _, c in middle), default=0)
        after = max((c[name] for _, c in last), default=0)
        ratio = after / before if before else float("inf") if after else 1.0
        verdict = "flat" if ratio <= FLAT_RATIO_MAX else "GROWS"
        print(f"    {name:<16} {before:>7} -> {after:>7}  {ratio:>5.2f}  {verdict}")
    print(
        "  pruned: " + ", ".join(f"{table} {count}" for table, count in sorted(pruned.rows.items()))
    )
    commits.sort()
    print(
        f"  POST /v1/batches while pruning: median {commits[len(commits) // 2] * 1000:.0f} ms, "
        f"longest {commits[-1] * 1000:.0f} ms"
    )
    deletes.sort()
    if deletes:
        print(
            f"  DELETE statements: {len(deletes)}, median {deletes[len(deletes) // 2] * 1000:.1f} "
            f"ms, longest {deletes[-1] * 1000:.1f} ms"
        )


if __name__ == "__main__":
    asyncio.run(main())
