"""Activity export benchmark (a script, not a test): memory stays flat however many rows a
filter matches.

``syncsvc api`` runs as its own process on a fresh SQLite file (or on the empty PostgreSQL
database ``SYNCSVC_BENCH_PG_URL`` names). The tenant's activities are written straight into
the database (``--rows`` in all: 1 % for user ``small``, 10 % for ``medium``, the rest for
``big``), then ``GET /v1/activities?format=csv|xlsx`` exports 1 %, 10 % and 100 % of them while
this process samples the API process's resident memory (``/proc/<pid>/status``) every
``SAMPLE_S``. Flat means: the peak above the memory before the export does not grow with the
rows exported.

    python -m bench.activities_export [--rows 100000] [--formats csv,xlsx]

Measured (December 2026, a 2-core machine shared with other work, load ~5), SQLite:

    format     rows  seconds  MiB out  RSS before     peak   growth
    csv        1000      0.2      0.2     142.3 M  147.5 M    5.2 M   (user_id=small)
    csv       10000      1.0      2.1     147.5 M  148.9 M    1.3 M   (user_id=medium)
    csv      100000     10.6     21.3     148.9 M  148.9 M    0.0 M   (no filter)
    xlsx          -      0.3      0.1     148.9 M  149.7 M    0.9 M   (user_id=small)
    xlsx          -      3.7      0.9     149.7 M  149.9 M    0.1 M   (user_id=medium)
    xlsx          -     44.5      9.0     149.9 M  150.0 M    0.1 M   (no filter)

PostgreSQL 15 (same machine):

    format     rows  seconds  MiB out  RSS before     peak   growth
    csv        1000      0.3      0.2     144.3 M  146.9 M    2.7 M   (user_id=small)
    csv       10000      1.9      2.1     146.9 M  149.3 M    2.4 M   (user_id=medium)
    csv      100000     29.4     21.3     149.3 M  150.1 M    0.7 M   (no filter)
    xlsx          -      0.5      0.1     150.0 M  150.8 M    0.8 M   (user_id=small)
    xlsx          -      7.2      0.9     150.8 M  151.3 M    0.5 M   (user_id=medium)
    xlsx          -     59.6      9.0     151.3 M  151.4 M    0.0 M   (no filter)

Memory is flat (the 100,000-row exports add nothing over the 1,000-row ones). Time is linear;
XLSX costs ~4x CSV (openpyxl builds a cell object per value, with lxml writing the XML).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import insert, select

from syncsvc.queue.outbox import ACTIVITIES_TABLE
from syncsvc.store.db import Database
from syncsvc.store.models import Tenant, User
from syncsvc.store.types import utcnow

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 30.0
SAMPLE_S = 0.02
INSERT_CHUNK_ROWS = 5000
ZONE = "Europe/Copenhagen"
#: Share of the rows each user gets; a filter on one user exports that share.
SHARES = {"small": 0.01, "medium": 0.1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def wait_ready(url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url) as response:
                    await response.read()
                    return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {START_TIMEOUT_S} s")


async def seed(db: Database, rows: int) -> None:
    """Users and ``rows`` calls, written in chunks (the API would plan them much slower)."""
    async with db.session() as session, session.begin():
        tenant_id = await session.scalar(select(Tenant.id).where(Tenant.name == "bench"))
        assert tenant_id is not None
        for user_id in ("small", "medium", "big"):
            session.add(User(tenant_id=tenant_id, id=user_id, timezone=ZONE, name=user_id))
    counts = {uid: int(rows * share) for uid, share in SHARES.items()}
    counts["big"] = rows - sum(counts.values())
    first = datetime(2030, 6, 3, 7, 0, tzinfo=UTC)
    stamp = utcnow()
    batch: list[dict[str, Any]] = []
    n = 0
    for user_id, count in counts.items():
        for i in range(count):
            start = first + timedelta(minutes=30 * i)
            batch.append(
                {
                    "id": uuid.uuid4().hex,
                    "tenant_id": tenant_id,
                    "batch_id": None,
                    "seq": n,
                    "target_id": f"org-{n}",
                    "target_ids": [f"org-{n}"],
                    "user_id": user_id,
                    "kind": "call",
                    "start": start,
                    "end": start + timedelta(minutes=15),
                    "due": None,
                    "subject": f"Call Organisation {n}",
                    "description": "Ask about the new price list; bring up the autumn offer.",
                    "location": "",
                    "status": "planned",
                    "priority": "normal",
                    "reminder_minutes": 15,
                    "attendees": [],
                    "fields": {},
                    "follow_up_of": None,
                    "direction": "outgoing",
                    "phone": f"+45 {n:08d}",
                    "user_edited": False,
                    "version": 1,
                    "deleted": False,
                    "created_at": stamp,
                    "updated_at": stamp,
                }
            )
            n += 1
            if len(batch) == INSERT_CHUNK_ROWS:
                await _insert(db, batch)
                batch = []
    await _insert(db, batch)


async def _insert(db: Database, rows: list[dict[str, Any]]) -> None:
    if rows:
        async with db.session() as session, session.begin():
            await session.execute(insert(ACTIVITIES_TABLE), rows)


@dataclass(frozen=True, slots=True)
class Export:
    rows: int
    seconds: float
    body_bytes: int
    before_kib: int
    peak_kib: int

    @property
    def growth_kib(self) -> int:
        return self.peak_kib - self.before_kib


async def export(api: str, key: str, pid: int, query: str) -> Export:
    """One export, read and dropped chunk by chunk, while the API's memory is sampled."""
    before = rss_kib(pid)
    peak = before
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(pid))
            await asyncio.sleep(SAMPLE_S)

    sampler = asyncio.create_task(sample())
    size = 0
    lines = 0
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        started = time.perf_counter()
        async with http.get(
            f"{api}/v1/activities?{query}", headers={"Authorization": f"Bearer {key}"}
        ) as response:
            assert response.status == 200, await response.text()
            async for chunk in response.content.iter_chunked(64 * 1024):
                size += len(chunk)
                lines += chunk.count(b"\n")
        seconds = time.perf_counter() - started
    done.set()
    await sampler
    return Export(lines - 1, seconds, size, before, max(peak, rss_kib(pid)))


async def main(rows: int, formats: list[str]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    db_url = os.environ.get("SYNCSVC_BENCH_PG_URL") or f"sqlite:///{tmp / 'syncsvc.db'}"
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SYNCSVC_DATABASE_URL": db_url,
        "SYNCSVC_PUBLIC_BASE_URL": api,
        "SYNCSVC_SECRET_KEY": "bench-secret-key-" + "s" * 32,
    }
    created = await asyncio.create_subprocess_exec(
        str(BIN / "syncsvc"), "tenants", "create", "bench", env=env, stdout=subprocess.PIPE
    )
    out, _ = await created.communicate()
    assert created.returncode == 0, "syncsvc tenants create failed"
    key = out.decode().strip().splitlines()[-1]
    db = Database(db_url)
    started = time.perf_counter()
    await seed(db, rows)
    await db.aclose()
    print(f"seeded {rows} activities in {time.perf_counter() - started:.1f} s ({db_url})")
    with (tmp / "api.log").open("wb") as log:
        server = await asyncio.create_subprocess_exec(
            *(str(BIN / "syncsvc"), "api", "--host", "127.0.0.1", "--port", str(port)),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        await wait_ready(f"{api}/healthz")
        print(
            f"{'format':6} {'rows':>8} {'seconds':>8} {'MiB out':>8} {'RSS before':>11} "
            f"{'peak':>8} {'growth':>8}"
        )
        for fmt in formats:
            for filt in ("user_id=small", "user_id=medium", ""):
                got = await export(api, key, server.pid, f"format={fmt}&{filt}")
                shown = got.rows if fmt == "csv" else "-"
                print(
                    f"{fmt:6} {shown:>8} {got.seconds:8.1f} {got.body_bytes / 2**20:8.1f} "
                    f"{got.before_kib / 1024:9.1f} M {got.peak_kib / 1024:6.1f} M "
                    f"{got.growth_kib / 1024:6.1f} M   ({filt or 'no filter'})"
                )
    finally:
        server.terminate()
        await server.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--formats", default="csv,xlsx")
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.formats.split(",")))
