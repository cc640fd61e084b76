"""Commit benchmark: ``POST /v1/batches`` of 1,000 / 10,000 / 100,000 targets through HTTP.

Runs the real application on a fresh SQLite file and on a PostgreSQL server started for the
run (``tests/servers/postgres.py``; or ``SYNCSVC_BENCH_PG_URL`` naming an empty database).
Prints, per size and database, the time until the batch is committed (the answer for a
``201``; the ``GET`` that first shows it ``syncing`` for a ``202``), the answer's own time, and
the longest event-loop stall seen meanwhile, next to the issue's goal.

    python bench/commit.py [--sizes 1000,10000,100000] [--no-pg]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time

from aiohttp.test_utils import TestClient, TestServer

from bench.api import USERS, body
from syncsvc import app as app_module
from syncsvc.config import Settings
from syncsvc.quiet_gc import collect_when_quiet
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from syncsvc.store.models import User

#: The issue's goals (seconds to committed) by (database, size).
GOAL_S = {
    ("postgresql", 10_000): 0.5,
    ("sqlite", 10_000): 1.0,
    ("postgresql", 100_000): 5.0,
    ("sqlite", 100_000): 5.0,
}
POLL_S = 0.02
PROBE_S = 0.005


async def _stalls(stop: asyncio.Event, worst: list[float]) -> None:
    """The longest a ``PROBE_S`` sleep overslept: how long the loop was held."""
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(PROBE_S)
        worst[0] = max(worst[0], time.perf_counter() - started - PROBE_S)


async def bench(url: str, label: str, sizes: list[int]) -> None:
    db = Database(url)
    await db.migrate()
    tenant, key = await create_tenant(db, f"bench-{time.time_ns()}")
    async with db.session() as session:
        for i in range(USERS):
            caldav = i % 2 == 0
            session.add(
                User(
                    tenant_id=tenant.id,
                    id=f"u{i}",
                    name=f"User Number{i}",
                    timezone="Europe/Copenhagen",
                    country="DK",
                    calendar_provider="caldav" if caldav else "none",
                    calendar_config={"url": f"http://127.0.0.1:9/u{i}/"} if caldav else {},
                )
            )
        await session.commit()
    settings = Settings(database_url=url, max_body_bytes=200 * 1024 * 1024)
    app = app_module.build_app(settings, db)
    headers = {"Authorization": f"Bearer {key}"}
    posting = {**headers, "Content-Type": "application/json"}
    # Full collections as ``syncsvc serve`` runs them (syncsvc/quiet_gc.py), not the
    # interpreter's automatic ones in the middle of a large plan.
    quiet = asyncio.Event()
    collector = asyncio.create_task(collect_when_quiet(quiet))
    async with TestClient(TestServer(app)) as client:
        # Caches, imports, and the processes that parse large bodies start on first use.
        warm = await client.post("/v1/plans", json=body(10_000), headers=headers)
        assert warm.status == 200, await warm.text()
        warm = await client.post("/v1/batches", json=body(100), headers=headers)
        assert warm.status == 201, await warm.text()
        for size in sizes:
            # Serialised ahead: the client shares the loop, and its json.dumps of 30 MB would
            # count as the server's stall.
            payload = json.dumps(body(size)).encode()
            stop, worst = asyncio.Event(), [0.0]
            probe = asyncio.create_task(_stalls(stop, worst))
            started = time.perf_counter()
            response = await client.post("/v1/batches", data=payload, headers=posting)
            answered = time.perf_counter() - started
            created = await response.json()
            assert response.status in (201, 202), created
            while created["state"] == "committing":
                await asyncio.sleep(POLL_S)
                got = await client.get(f"/v1/batches/{created['id']}", headers=headers)
                created = await got.json()
            committed = time.perf_counter() - started
            stop.set()
            await probe
            assert created["state"] in ("syncing", "synced"), created
            goal = GOAL_S.get((label, size))
            print(
                f"{label:<10} {size:>7} targets  {response.status}  answer {answered:6.2f} s"
                f"  committed {committed:6.2f} s  longest stall {worst[0] * 1000:6.0f} ms"
                f"  goal {f'<= {goal} s' if goal else '-'}",
                flush=True,
            )
    quiet.set()
    await collector
    await db.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--no-pg", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory() as folder:
            await bench(f"sqlite:///{folder}/bench.db", "sqlite", sizes)
    if args.no_pg:
        return
    pg_url = os.environ.get("SYNCSVC_BENCH_PG_URL")
    if pg_url:
        await bench(pg_url, "postgresql", sizes)
        return
    from tests.servers.postgres import start_postgres

    server = start_postgres()
    try:
        await bench(await server.create_database(), "postgresql", sizes)
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
