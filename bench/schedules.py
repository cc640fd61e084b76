"""A hostile tenant's slow schedules against another tenant's: how late the other tenant's run
is, and how many of the slow tenant's runs the CRM sees at once.

Tenant A has ``--slow`` schedules due at one instant whose ``targets_url`` answers after
``--delay-s``; tenant B has one schedule due at the same instant on a fast URL. The real
``run_scheduler`` loop runs them on a fresh SQLite file (an injected clock, 127.0.0.1 only).
Printed: B's run from the loop's start to done, A's most requests at once and the time until
all of A's runs are done, with the caps used. Goal: B done within a second, A at its cap.

    python -m bench.schedules [--slow 40] [--delay-s 2] [--concurrency 16] [--tenant-concurrency 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer
from sqlalchemy import select

from syncsvc.config import Settings
from syncsvc.scheduler import run_scheduler
from syncsvc.service import schedules as service
from syncsvc.service.tenants import create_tenant_with_secret
from syncsvc.service.users import UserSpec, put_user
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import ScheduleRun

SECRET_KEY = "bench-schedules-secret-key-" + "k" * 32
DUE = datetime(2030, 1, 7, 4, 0, tzinfo=UTC)
TARGETS = json.dumps({"targets": [{"id": "org-1", "name": "Alko Oy"}]}).encode()
PLAN = {
    "template": {"kind": "task", "subject": "Call $account-name$", "due_days": 0},
    "schedule": {"duration": "00:30"},
    "assignment": {"mode": "users", "users": ["u1"]},
}


@dataclass(slots=True)
class Crm:
    delay_s: float
    now: int = 0
    most: int = 0

    async def slow(self, request: web.Request) -> web.Response:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.now -= 1
        return web.Response(body=TARGETS, content_type="application/json")

    async def fast(self, request: web.Request) -> web.Response:
        return web.Response(body=TARGETS, content_type="application/json")


async def tenant(db: Database, name: str) -> str:
    box = SecretBox(SECRET_KEY)
    row, _, _ = await create_tenant_with_secret(db, name, box)
    user = UserSpec(
        name="Aino Virtanen",
        email="aino@example.fi",
        mobile="",
        timezone="Europe/Helsinki",
        country=None,
        subdivision=None,
        days_off=[],
        calendar={"provider": "none"},
    )
    async with db.session() as session, session.begin():
        await put_user(session, box, row.id, "u1", user)
    return row.id


async def schedule(db: Database, tenant_id: str, url: str) -> str:
    spec = service.ScheduleSpec("bench", "0 6 * * *", "Europe/Helsinki", url, PLAN)
    created = DUE - timedelta(hours=1)
    async with db.session() as session, session.begin():
        row = await service.create(session, tenant_id, spec, created, min_interval=timedelta())
    return row.id


async def done(db: Database, schedule_ids: set[str]) -> bool:
    async with db.session() as session:
        query = select(ScheduleRun.schedule_id).where(ScheduleRun.state == "ok")
        return schedule_ids <= set(await session.scalars(query))


async def seconds_until(db: Database, schedule_ids: set[str], started: float) -> float:
    """Polls the database every 10 ms until the schedules' runs are ``ok``."""
    while True:
        if await done(db, schedule_ids):
            return time.perf_counter() - started
        await asyncio.sleep(0.01)


async def bench(args: argparse.Namespace) -> None:
    crm = Crm(args.delay_s)
    app = web.Application()
    app.router.add_get("/slow/{n}", crm.slow)
    app.router.add_get("/fast", crm.fast)
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'bench.db'}")
        await db.migrate()
        async with TestServer(app, host="127.0.0.1") as server:
            base = str(server.make_url("")).rstrip("/")
            slow, fast = await tenant(db, "Slow CRM"), await tenant(db, "Fast CRM")
            slow_ids = {await schedule(db, slow, f"{base}/slow/{n}") for n in range(args.slow)}
            fast_ids = {await schedule(db, fast, f"{base}/fast")}
            settings = Settings(
                secret_key=SECRET_KEY,
                scheduler_concurrency=args.concurrency,
                scheduler_tenant_concurrency=args.tenant_concurrency,
            )
            stop = asyncio.Event()
            started = time.perf_counter()
            loop = asyncio.create_task(
                run_scheduler(settings, db, stop, clock=lambda: DUE + timedelta(seconds=1))
            )
            fast_s = await seconds_until(db, fast_ids, started)
            slow_s = await seconds_until(db, slow_ids, started)
            stop.set()
            await loop
        await db.aclose()
    print(
        f"caps: {args.concurrency} at once, {args.tenant_concurrency} per tenant; "
        f"A: {args.slow} schedules answering in {args.delay_s} s"
    )
    print(f"B's run done after {fast_s * 1000:.0f} ms (goal: under 1000 ms)")
    print(f"A's requests at once: at most {crm.most}; all of A's runs done after {slow_s:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--slow", type=int, default=40)
    parser.add_argument("--delay-s", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=Settings().scheduler_concurrency)
    parser.add_argument(
        "--tenant-concurrency", type=int, default=Settings().scheduler_tenant_concurrency
    )
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
