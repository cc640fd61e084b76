"""API benchmark: preview 1,000 targets and commit 10,000, through HTTP, in-process.

Runs the real application (middlewares, validation, planner, one-transaction commit) on a
fresh SQLite file, and on PostgreSQL too when ``SYNCSVC_BENCH_PG_URL`` names an empty database.
Prints the median and p95 wall time per request.

    python bench/api.py [--plan-runs 30] [--batch-runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from syncsvc import app as app_module
from syncsvc.config import Settings
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from syncsvc.store.models import User

PLAN_TARGETS = 1_000
BATCH_TARGETS = 10_000
USERS = 10
#: Half the users have a CalDAV calendar (ledger + outbox rows), half have none.
CALDAV_EVERY = 2
ROUTES = ("plans", "batches", "activities")


def body(targets: int) -> dict[str, Any]:
    return {
        "targetgroup_name": "Bench",
        "targets": [
            {
                "id": f"org-{i}",
                "name": f"Organisation {i}",
                "email": f"org{i}@example.com",
                "postcode": f"{1000 + i % 8000}",
                "contacts": [
                    {
                        "id": f"p{i}",
                        "first_name": "Anne",
                        "last_name": "Jensen",
                        "email": f"p{i}@example.com",
                    }
                ],
            }
            for i in range(targets)
        ],
        "template": {
            "kind": "meeting",
            "subject": "Visit $account-name$ with $user-firstname$",
            "description": "Ask $contact-firstname$ about $targetgroup-name$",
        },
        "schedule": {"start_date": "2031-01-06", "duration": "01:00", "interval": "00:15"},
        "assignment": {"mode": "users", "users": [f"u{i}" for i in range(USERS)]},
    }


async def timed(runs: int, call: Callable[[], Awaitable[None]]) -> list[float]:
    samples: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


def summary(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (
        f"{name:<36} runs={len(samples):<3} median={statistics.median(ordered) * 1000:8.1f} ms"
        f"  p95={p95 * 1000:8.1f} ms"
    )


async def bench(url: str, label: str, plan_runs: int, batch_runs: int) -> None:
    db = Database(url)
    await db.migrate()
    tenant, key = await create_tenant(db, f"bench-{time.time_ns()}")
    async with db.session() as session:
        for i in range(USERS):
            caldav = i % CALDAV_EVERY == 0
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
    app_module.API_MODULES = tuple(dict.fromkeys((*app_module.API_MODULES, *ROUTES)))
    app = app_module.build_app(Settings(database_url=url), db)
    headers = {"Authorization": f"Bearer {key}"}
    plan_body, batch_body = body(PLAN_TARGETS), body(BATCH_TARGETS)
    async with TestClient(TestServer(app)) as client:

        async def preview() -> None:
            response = await client.post("/v1/plans", json=plan_body, headers=headers)
            assert response.status == 200, await response.text()
            await response.read()

        async def commit() -> None:
            response = await client.post("/v1/batches", json=batch_body, headers=headers)
            assert response.status == 201, await response.text()
            await response.read()

        await preview()  # warm caches (holidays, zones, imports)
        print(summary(f"{label} POST /v1/plans {PLAN_TARGETS}", await timed(plan_runs, preview)))
        print(summary(f"{label} POST /v1/batches {BATCH_TARGETS}", await timed(batch_runs, commit)))
    await db.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan-runs", type=int, default=30)
    parser.add_argument("--batch-runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        await bench(f"sqlite:///{folder}/bench.db", "sqlite", args.plan_runs, args.batch_runs)
    pg_url = os.environ.get("SYNCSVC_BENCH_PG_URL")
    if pg_url:
        await bench(pg_url, "postgresql", args.plan_runs, args.batch_runs)


if __name__ == "__main__":
    asyncio.run(main())
