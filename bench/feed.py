"""iCal feed benchmark (a script, not a test): one user with 5,000 activities.

``syncsvc api`` runs as its own process, as deployed (request logs included), on a fresh
SQLite file or on the empty PostgreSQL database ``SYNCSVC_BENCH_PG_URL`` names. This process
is the load generator (aiohttp, bounded by count and time, 127.0.0.1 only). Measured: the
first (cold) render with ``/healthz`` asked in a loop meanwhile (rendering runs off the event
loop, so other requests should barely wait), a re-render after one activity changed, full
feed GETs, conditional GETs answered ``304`` (settled, and within ``WRITE_SETTLE_S`` of a
change), and ``/healthz`` as the HTTP ceiling. For comparison, Radicale serves the very same
5,000 events (the CalDAV provider's resources, written straight into its filesystem storage
before it starts, as PUTs slow down past a few hundred) and answers a full collection GET.

    python -m bench.feed [--activities 5000] [--concurrency 8] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import select, update

from syncsvc.providers._ical import render_resource
from syncsvc.queue.reconcile import spec_for
from syncsvc.service.feeds import WRITE_SETTLE_S
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, User
from syncsvc.store.types import utcnow

BIN = Path(sys.executable).parent
USER_ID = "bench-user"
ZONE = "Europe/Copenhagen"
RADICALE_USER = "alice"
RADICALE_CALENDAR = "feed"
START_TIMEOUT_S = 30.0
MAX_REQUESTS = 100_000
GOAL_RATIO = 5.0
GOAL_304_PER_S = 2_000.0
SETTLED_AGO = timedelta(hours=1)
IDLE_ROUNDS = 50


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


def plan_body(n: int) -> dict[str, Any]:
    """``n`` half-hour meetings for one user, 24 a weekday from next Monday: 5,000 fit in 42
    weeks, inside the feed's default window (548 days ahead)."""
    day = [["07:00", "13:00"], ["13:00", "19:00"]]
    today = date.today()
    monday = today + timedelta(days=7 - today.weekday())
    return {
        "targets": [{"id": f"org-{i}", "name": f"Organisation {i}"} for i in range(n)],
        "template": {
            "kind": "meeting",
            "subject": "Visit $account-name$",
            "description": "Bring the new price list.",
            "location": "At the customer",
            "reminder_minutes": 15,
        },
        "schedule": {
            "start_date": monday.isoformat(),
            "week": {**{d: day for d in ("mon", "tue", "wed", "thu", "fri")}, "sat": [], "sun": []},
            "duration": "00:30",
            "skip_public_holidays": False,
        },
        "assignment": {"mode": "users", "users": [USER_ID]},
    }


@dataclass(frozen=True, slots=True)
class Rate:
    requests: int
    seconds: float
    body_bytes: int

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds


async def load(
    url: str, headers: dict[str, str], expect: int, concurrency: int, seconds: float
) -> Rate:
    """GETs ``url`` from ``concurrency`` workers until ``seconds`` or ``MAX_REQUESTS`` pass."""
    done = 0
    body_bytes = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal done, body_bytes
            while time.perf_counter() < deadline and done < MAX_REQUESTS:
                async with http.get(url, headers=headers) as response:
                    body = await response.read()
                    if response.status != expect:
                        raise RuntimeError(f"{url} answered {response.status}, not {expect}")
                done += 1
                body_bytes = len(body)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Rate(done, time.perf_counter() - started, body_bytes)


async def timed_get(url: str, headers: dict[str, str] | None = None) -> tuple[float, bytes, str]:
    async with aiohttp.ClientSession() as http:
        started = time.perf_counter()
        async with http.get(url, headers=headers) as response:
            body = await response.read()
            assert response.status == 200, response.status
        return time.perf_counter() - started, body, response.headers.get("ETag", "")


async def healthz_rounds(
    url: str, busy: asyncio.Future[Any] | None = None, at_least: int = 1
) -> list[float]:
    """Seconds of ``/healthz`` round trips, one after another, ``at_least`` of them and on
    until ``busy`` is done."""
    took: list[float] = []
    async with aiohttp.ClientSession() as http:
        while len(took) < at_least or (busy is not None and not busy.done()):
            started = time.perf_counter()
            async with http.get(url) as response:
                await response.read()
                assert response.status == 200, response.status
            took.append(time.perf_counter() - started)
    return took


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def seed(api: str, key: str, n: int) -> str:
    """User, batch of ``n`` meetings and a feed; returns the feed URL."""
    auth = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=auth) as http:
        user = {"name": "Bench User", "timezone": ZONE, "calendar": {"provider": "none"}}
        async with http.put(f"{api}/v1/users/{USER_ID}", json=user) as response:
            assert response.status == 200, await response.text()
        async with http.post(f"{api}/v1/batches", json=plan_body(n)) as response:
            assert response.status == 201, await response.text()
            assert (await response.json())["total"] == n
        async with http.post(f"{api}/v1/users/{USER_ID}/feed") as response:
            assert response.status == 200, await response.text()
            url: str = (await response.json())["url"]
            return url


async def edit_one(api: str, key: str, db: Database) -> None:
    async with db.session() as session:
        activity_id = await session.scalar(select(Activity.id).limit(1))
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http,
        http.patch(f"{api}/v1/activities/{activity_id}", json={"subject": "Edited"}) as response,
    ):
        assert response.status == 200, await response.text()


async def settle(db: Database) -> None:
    """Stamp every change an hour back: the state of a feed polled long after its last
    change, which the service answers from the newest stamp alone (see WRITE_SETTLE_S)."""
    async with db.session() as session, session.begin():
        await session.execute(update(Activity).values(updated_at=utcnow() - SETTLED_AGO))


async def write_radicale_collection(db: Database, root: Path) -> int:
    """The CalDAV provider's resource for every activity, as Radicale's storage files."""
    folder = root / "collection-root" / RADICALE_USER / RADICALE_CALENDAR
    folder.mkdir(parents=True)
    (root / "collection-root" / RADICALE_USER / ".Radicale.props").write_text("{}")
    props = {
        "tag": "VCALENDAR",
        "D:displayname": "feed",
        "C:supported-calendar-component-set": "VEVENT",
    }
    (folder / ".Radicale.props").write_text(json.dumps(props))
    async with db.session() as session:
        user = await session.get(User, (await session.scalar(select(User.tenant_id)), USER_ID))
        assert user is not None
        activities = (await session.scalars(select(Activity))).all()
    for activity in activities:
        spec = spec_for(activity, user)
        (folder / f"{spec.key}.ics").write_bytes(render_resource(spec))
    return len(activities)


async def main(n: int, concurrency: int, seconds: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-feed-"))
    db_url = os.environ.get("SYNCSVC_BENCH_PG_URL") or f"sqlite:///{tmp / 'syncsvc.db'}"
    port, radicale_port = free_port(), free_port()
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
    server = [str(BIN / "syncsvc"), "api", "--host", "127.0.0.1", "--port", str(port)]
    with process(server, tmp / "api.log", env):
        await wait_ready(f"{api}/healthz")
        started = time.perf_counter()
        feed = await seed(api, key, n)
        print(f"seeded {n} activities through the API in {time.perf_counter() - started:.1f} s")

        idle = sorted(await healthz_rounds(f"{api}/healthz", at_least=IDLE_ROUNDS))
        cold = asyncio.ensure_future(timed_get(feed))
        during = sorted(await healthz_rounds(f"{api}/healthz", cold))
        cold_s, body, etag = await cold
        print(f"feed: {len(body) / 1e6:.2f} MB, {body.count(b'BEGIN:VEVENT')} VEVENTs")
        print(f"first (cold) render: {cold_s * 1000:.0f} ms")
        print(
            f"/healthz during it: {len(during)} requests, median {ms(during[len(during) // 2])},"
            f" max {ms(during[-1])} (idle: median {ms(idle[len(idle) // 2])})"
        )
        full = await load(feed, {}, 200, concurrency, seconds)
        recent = await load(feed, {"If-None-Match": etag}, 304, concurrency, seconds)
        ceiling = await load(f"{api}/healthz", {}, 200, concurrency, seconds)
        db = Database(db_url)
        try:
            await edit_one(api, key, db)
            rerender_s, _, _ = await timed_get(feed)
            print(f"re-render after one activity changed: {rerender_s * 1000:.0f} ms")
            await settle(db)
            _, _, etag = await timed_get(feed)
            settled = await load(feed, {"If-None-Match": etag}, 304, concurrency, seconds)
            collection = tmp / "radicale"
            written = await write_radicale_collection(db, collection)
        finally:
            await db.aclose()

    radicale = [
        str(BIN / "radicale"),
        "--config",
        "",
        "--server-hosts",
        f"127.0.0.1:{radicale_port}",
        "--auth-type",
        "none",
        "--storage-filesystem-folder",
        str(collection),
        "--logging-level",
        "warning",
    ]
    radicale_url = f"http://127.0.0.1:{radicale_port}/{RADICALE_USER}/{RADICALE_CALENDAR}/"
    basic = {"Authorization": aiohttp.encode_basic_auth(RADICALE_USER, "x")}
    with process(radicale, tmp / "radicale.log"):
        await wait_ready(f"http://127.0.0.1:{radicale_port}/.web/")
        first_s, radicale_body, _ = await timed_get(radicale_url, basic)
        assert radicale_body.count(b"BEGIN:VEVENT") == written, "Radicale lost events"
        print(
            f"radicale: {written} events, first GET {first_s * 1000:.0f} ms"
            f" ({len(radicale_body) / 1e6:.2f} MB)"
        )
        radicale_rate = await load(radicale_url, basic, 200, concurrency, seconds)

    ratio = full.per_s / radicale_rate.per_s
    backend = db_url.split(":", 1)[0]
    print(f"concurrency {concurrency}, up to {seconds:.0f} s per run, one API process, {backend}")
    print(f"syncsvc full feed:  {full.per_s:8.1f} req/s ({full.requests} requests)")
    print(f"syncsvc 304:        {settled.per_s:8.1f} req/s ({settled.requests} requests)")
    print(
        f"syncsvc 304 within {WRITE_SETTLE_S} s of a change: {recent.per_s:8.1f} req/s"
        f" ({recent.requests} requests; counts every activity)"
    )
    print(f"syncsvc /healthz:   {ceiling.per_s:8.1f} req/s (no database: the HTTP ceiling)")
    print(f"radicale full GET:  {radicale_rate.per_s:8.1f} req/s ({radicale_rate.requests})")
    print(
        f"full feed vs radicale: {ratio:.1f}x (goal >= {GOAL_RATIO:.0f}x)"
        f"; 304 goal >= {GOAL_304_PER_S:.0f}/s: "
        f"{'met' if settled.per_s >= GOAL_304_PER_S else 'NOT met'}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--activities", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(main(args.activities, args.concurrency, args.seconds))
