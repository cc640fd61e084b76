"""An operator's bad night, seeded: real PostgreSQL, Redis and Radicale, ``syncsvc api`` and
three ``syncsvc worker`` processes, a CRM workload (batches, batch edits, single moves and
cancels, one batch deleted) while faults of every kind hit at seeded random moments: kill -9
of a worker and of the API, a Redis restart, ``pg_ctl restart -m immediate``, a PostgreSQL
outage, Radicale frozen (SIGSTOP/SIGCONT) and killed. Then the calendars are compared with
what the API says, exactly. ``tests/e2e/test_chaos.py`` runs one short seed; ``bench/chaos.py``
runs longer ones and prints the tallies and recovery times.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import func, select

from syncsvc.store.db import Database
from syncsvc.store.models import Operation
from syncsvc.store.types import utcnow
from tests.e2e.fleet import (
    Fleet,
    batch_body,
    fleet_env,
    put_own_event,
    read_calendar,
    settled,
    user_body,
)
from tests.servers.postgres import start_postgres
from tests.servers.radicale import RadicaleServer, new_calendar
from tests.servers.redis import RedisServer

FAULTS = (
    "kill_worker",
    "kill_api",
    "restart_redis",
    "restart_pg",
    "pg_outage",
    "freeze_radicale",
    "kill_radicale",
)
WORKERS = 3
CALDAV_RATE = "20/1"
START_DATES = ("2027-06-07", "2027-07-05", "2027-08-02", "2027-08-30", "2027-09-27")


@dataclass(frozen=True, slots=True)
class Scale:
    users: int = 4
    batches: int = 3
    per_batch: int = 40
    outage_s: float = 3.0
    freeze_s: float = 3.0
    moves: int = 4
    cancels: int = 3
    #: How long a fault's recovery is watched for; a slower one is reported, not waited out.
    recover_timeout_s: float = 40.0
    settle_timeout_s: float = 150.0


@dataclass(slots=True)
class Report:
    seed: int
    #: (fault, seconds after the start, seconds until the sync made progress again)
    faults: list[tuple[str, float, float]] = field(default_factory=list)
    expected: int = 0
    events: int = 0
    missing: list[str] = field(default_factory=list)
    doubles: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    deleted_left: int = 0
    own_events_ok: bool = False
    failed_ops: int = 0
    exited: list[int | None] = field(default_factory=list)
    settle_s: float = 0.0
    #: Each batch's state and sync counts when the settle wait ran out (empty when it settled).
    unsettled: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (
            self.missing
            or self.doubles
            or self.orphans
            or self.stale
            or self.deleted_left
            or self.failed_ops
            or self.exited
            or self.unsettled
            or not self.own_events_ok
        )


async def run_chaos(seed: int, folder: Path, scale: Scale = Scale()) -> Report:
    rng = random.Random(seed)
    report = Report(seed)
    pg = await asyncio.to_thread(start_postgres, durable=True)
    (folder / "redis").mkdir(parents=True, exist_ok=True)
    (folder / "radicale").mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    redis = RedisServer(folder / "redis")
    radicale = RadicaleServer(folder / "radicale")
    timeout = aiohttp.ClientTimeout(total=30)
    try:
        await asyncio.to_thread(redis.start)
        await asyncio.to_thread(radicale.start)
        env = fleet_env(
            dict(os.environ),
            await pg.create_database(),
            redis_url=redis.url,
            caldav_rate=CALDAV_RATE,
            # The night's CRM polls every batch again and again to see progress; the tenant
            # quota is not what this test is about (tests/security/test_tenant_quota.py).
            api_rate="100000/60",
        )
        async with aiohttp.ClientSession(timeout=timeout) as http:
            fleet = Fleet(env, folder / "logs", http)
            try:
                await _run(fleet, http, pg, redis, radicale, rng, scale, report)
            finally:
                await fleet.aclose()
    finally:
        radicale.stop()
        redis.stop()
        pg.stop()
    return report


async def _run(
    fleet: Fleet,
    http: aiohttp.ClientSession,
    pg: Any,
    redis: RedisServer,
    radicale: RadicaleServer,
    rng: random.Random,
    scale: Scale,
    report: Report,
) -> None:
    await fleet.create_tenant()
    await fleet.start_api()
    for _ in range(WORKERS):
        await fleet.start_worker()
    calendars = [await new_calendar(http, radicale.url) for _ in range(scale.users)]
    users = [f"u{n}" for n in range(scale.users)]
    for n, url in enumerate(calendars):
        await put_own_event(http, url, f"own-{n}")
        status, body = await fleet.call("PUT", f"/v1/users/{users[n]}", user_body(n, url))
        assert status == 200, body
    batches: list[str] = []
    for b in range(scale.batches):
        assigned = rng.sample(users, k=max(2, scale.users - 1))
        body = batch_body(f"B{b}", assigned, scale.per_batch, START_DATES[b % len(START_DATES)])
        status, answer = await fleet.call("POST", "/v1/batches", body)
        assert status == 201, answer
        batches.append(str(answer["id"]))
    deleted = batches[-1]
    started = time.monotonic()

    async def progress() -> int:
        total = 0
        for batch in batches:
            status, body = await fleet.call("GET", f"/v1/batches/{batch}")
            assert status == 200, body
            total += body["sync"]["synced"] + body["sync"]["deleted"]
        return total

    async def recovered_after() -> float:
        """Seconds until the sync moves again (or there is nothing left to do)."""
        t0 = time.monotonic()
        before = await progress()
        while time.monotonic() - t0 < scale.recover_timeout_s:
            if await progress() > before or await _all_settled(fleet, batches, deleted):
                break
            await asyncio.sleep(0.2)
        return time.monotonic() - t0

    async def fault(kind: str) -> None:
        if kind == "kill_worker":
            await fleet.kill_worker(rng.randrange(len(fleet.workers)))
        elif kind == "kill_api":
            await fleet.kill_api()
        elif kind == "restart_redis":
            await asyncio.to_thread(redis.restart)
        elif kind == "restart_pg":
            await asyncio.to_thread(pg.restart_immediate)
        elif kind == "pg_outage":
            await asyncio.to_thread(pg.crash)
            await asyncio.sleep(scale.outage_s)
            await asyncio.to_thread(pg.start)
        elif kind == "freeze_radicale":
            radicale.freeze()
            await asyncio.sleep(scale.freeze_s)
            radicale.thaw()
        elif kind == "kill_radicale":
            await asyncio.to_thread(radicale.kill9)
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            await asyncio.to_thread(radicale.start)

    async def faults() -> None:
        for kind in rng.sample(FAULTS, k=len(FAULTS)):
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            at = time.monotonic() - started
            await fault(kind)
            report.faults.append((kind, at, await recovered_after()))

    async def workload() -> None:
        actions: list[Callable[[], Awaitable[None]]] = []
        for b, batch in enumerate(batches[:-1]):
            actions.append(lambda batch=batch, b=b: _edit_batch(fleet, batch, f"Edited B{b}"))
        actions.append(lambda: _move_and_cancel(fleet, rng, batches[:-1], scale))
        actions.append(lambda: _delete_batch(fleet, deleted))
        actions.append(lambda: _edit_batch(fleet, batches[0], "Edited again B0"))
        rng.shuffle(actions)
        for action in actions:
            await asyncio.sleep(rng.uniform(0.2, 1.2))
            await action()

    await asyncio.gather(faults(), workload())
    t0 = time.monotonic()
    deadline = t0 + scale.settle_timeout_s
    while not await _all_settled(fleet, batches, deleted):
        if time.monotonic() > deadline:
            for batch in batches:
                _, body = await fleet.call("GET", f"/v1/batches/{batch}")
                report.unsettled.append(f"{batch} {body['state']} {body['sync']}")
            report.unsettled.extend(
                await _queue_summary(fleet.launcher.env["SYNCSVC_DATABASE_URL"])
            )
            break
        await asyncio.sleep(0.5)
    report.settle_s = time.monotonic() - t0
    report.exited = fleet.exited()
    await _verify(fleet, http, calendars, batches, deleted, report)


async def _queue_summary(database_url: str) -> list[str]:
    """The operations not done, by state, kind and mailbox: why the sync did not settle."""
    db = Database(database_url)
    try:
        async with db.session() as s:
            rows = await s.execute(
                select(
                    Operation.state,
                    Operation.kind,
                    Operation.mailbox,
                    func.count(),
                    func.min(Operation.not_before),
                    func.max(Operation.attempts),
                    func.max(Operation.last_error),
                )
                .where(Operation.state != "done")
                .group_by(Operation.state, Operation.kind, Operation.mailbox)
            )
            now = utcnow()
            return [
                f"ops {state} {kind} {mailbox[-12:]} n={n}"
                f" due_in={(due - now).total_seconds():.0f}s attempts<={attempts} error={error}"
                for state, kind, mailbox, n, due, attempts, error in rows
            ]
    finally:
        await db.aclose()


async def _edit_batch(fleet: Fleet, batch: str, subject: str) -> None:
    status, body = await fleet.call(
        "PATCH", f"/v1/batches/{batch}", {"template": {"subject": subject}}
    )
    assert status == 200, body


async def _delete_batch(fleet: Fleet, batch: str) -> None:
    status, body = await fleet.call("DELETE", f"/v1/batches/{batch}")
    assert status in (202, 409), body  # 409: a retried DELETE found it deleting already


async def _move_and_cancel(
    fleet: Fleet, rng: random.Random, batches: list[str], scale: Scale
) -> None:
    activities = [a for batch in batches for a in await _activities(fleet, batch)]
    picked = rng.sample(activities, k=scale.moves + scale.cancels)
    for activity in picked[: scale.moves]:
        start = datetime.fromisoformat(activity["start"]) + timedelta(days=1, hours=1)
        path = f"/v1/activities/{activity['id']}"
        status, body = await fleet.call("PATCH", path, {"start": start.isoformat()})
        assert status == 200, body
    for activity in picked[scale.moves :]:
        path = f"/v1/activities/{activity['id']}"
        status, body = await fleet.call("PATCH", path, {"status": "cancelled"})
        assert status == 200, body


async def _activities(fleet: Fleet, batch: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = f"?limit=200&cursor={cursor}" if cursor else "?limit=200"
        status, body = await fleet.call("GET", f"/v1/batches/{batch}/activities{query}")
        assert status == 200, body
        found.extend(body["items"])
        cursor = body["next_cursor"]
        if not cursor:
            return found


async def _all_settled(fleet: Fleet, batches: list[str], deleted: str) -> bool:
    for batch in batches:
        status, body = await fleet.call("GET", f"/v1/batches/{batch}")
        assert status == 200, body
        if batch == deleted:
            if body["state"] != "deleted":
                return False
        elif not settled(body) or body["sync"]["synced"] + body["sync"]["failed"] == 0:
            return False
    return True


async def _verify(
    fleet: Fleet,
    http: aiohttp.ClientSession,
    calendars: list[str],
    batches: list[str],
    deleted: str,
    report: Report,
) -> None:
    wanted: dict[str, dict[str, Any]] = {}
    for batch in batches[:-1]:
        _, body = await fleet.call("GET", f"/v1/batches/{batch}")
        report.failed_ops += body["sync"]["failed"]
        for activity in await _activities(fleet, batch):
            wanted[activity["id"]] = activity
    report.expected = len(wanted)
    seen: Counter[str] = Counter()
    own_ok = True
    for n, url in enumerate(calendars):
        events = await read_calendar(http, url)
        own = [e for e in events if e.batch_id is None]
        own_ok &= [(e.uid, e.summary) for e in own] == [(f"own-{n}", "Dentist")]
        for event in events:
            if event.batch_id is None:
                continue
            report.events += 1
            if event.batch_id == deleted:
                report.deleted_left += 1
                continue
            activity = wanted.get(event.activity_id or "")
            if activity is None or activity["batch_id"] != event.batch_id:
                report.orphans.append(event.uid)
                continue
            seen[activity["id"]] += 1
            start = datetime.fromisoformat(activity["start"])
            if (
                event.summary != activity["subject"]
                or event.cancelled != (activity["status"] == "cancelled")
                or event.start != start
            ):
                report.stale.append(
                    f"{activity['id']}: calendar {event.summary!r} {event.status} {event.start}"
                    f" != {activity['subject']!r} {activity['status']} {start}"
                )
    report.own_events_ok = own_ok
    report.missing = [a for a in wanted if seen[a] == 0]
    report.doubles = [a for a, count in seen.items() if count > 1]
