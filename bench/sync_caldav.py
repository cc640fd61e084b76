"""Push speed into a real CalDAV server: syncsvc against vdirsyncer (a script, not a test).

``syncsvc serve`` runs as deployed (one process, SQLite file) and pushes a 200-activity batch
into one Radicale calendar; measured from the API call to the batch reading ``synced``, then
from ``DELETE`` to ``deleted``. vdirsyncer then syncs the very same 200 events (the resources
syncsvc wrote, rendered from the same activities) from a folder of ``.ics`` files into another
collection of the same Radicale (``vdirsyncer discover``, then a timed ``vdirsyncer sync``),
and removes them again (files deleted, timed ``sync``). vdirsyncer's start-up is measured by a
``sync`` with nothing to do and shown apart.

The CalDAV limit defaults to 20 requests/s per calendar, a polite figure for shared servers;
a local Radicale has no limit of its own, so the run raises it (``SYNCSVC_CALDAV_RATE``,
default here ``1000/1`` with 4 at once) to measure the engine rather than the politeness.

    python -m bench.sync_caldav [--events 200] [--rate 1000/1] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import select

from bench.feed import BIN, free_port, process, wait_ready
from syncsvc.providers._ical import render_resource
from syncsvc.queue.reconcile import spec_for
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, User
from tests.servers.radicale import RADICALE_PASSWORD, RADICALE_USER, new_calendar

GOAL_RATIO = 2.0
#: syncsvc's create throughput over Radicale's own raw-PUT ceiling (same resources, as many at
#: once): what the engine costs on top of the server's own work.
CEILING_GOAL_RATIO = 0.95
#: How often the batch's state is read while it syncs (each read is an API call to the service).
POLL_S = 0.1
TIMEOUT_S = 300.0
VDIRSYNCER = str(BIN / "vdirsyncer")


async def call(
    http: aiohttp.ClientSession, method: str, url: str, key: str, body: Any = None
) -> Any:
    async with http.request(
        method, url, json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        assert response.status < 300, await response.text()
        return await response.json()


async def wait_state(
    http: aiohttp.ClientSession, api: str, key: str, batch: str, state: str
) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while (await call(http, "GET", f"{api}/v1/batches/{batch}", key))["state"] != state:
        assert time.monotonic() < deadline, f"batch not {state} after {TIMEOUT_S} s"
        await asyncio.sleep(POLL_S)


async def count_events(http: aiohttp.ClientSession, url: str) -> int:
    auth = {"Authorization": aiohttp.encode_basic_auth(RADICALE_USER, RADICALE_PASSWORD)}
    async with http.request("PROPFIND", url, headers={"Depth": "1", **auth}) as response:
        text = await response.text()
    return text.count(".ics</")


def vdirsyncer_config(folder: Path, collection_url: str) -> Path:
    config = folder / "vdirsyncer.conf"
    config.write_text(
        f"""[general]
status_path = "{folder / "status"}/"

[pair push]
a = "local"
b = "radicale"
collections = null
conflict_resolution = "a wins"

[storage local]
type = "filesystem"
path = "{folder / "ics"}/"
fileext = ".ics"

[storage radicale]
type = "caldav"
url = "{collection_url}"
username = "{RADICALE_USER}"
password = "{RADICALE_PASSWORD}"
"""
    )
    return config


async def vdirsyncer(config: Path, *command: str) -> float:
    """Runs one vdirsyncer command; returns its wall time (s)."""
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        VDIRSYNCER,
        "-c",
        str(config),
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()
    return time.perf_counter() - started


async def raw_puts(
    http: aiohttp.ClientSession, url: str, files: dict[str, bytes], at_once: int
) -> float:
    """Radicale's own ceiling: the same resources PUT from a tight loop, ``at_once`` in flight;
    returns the wall time (s)."""
    auth = {"Authorization": aiohttp.encode_basic_auth(RADICALE_USER, RADICALE_PASSWORD)}
    headers = {"If-None-Match": "*", "Content-Type": "text/calendar; charset=utf-8", **auth}
    gate = asyncio.Semaphore(at_once)

    async def put(name: str, body: bytes) -> None:
        async with gate, http.put(url + name, data=body, headers=headers) as response:
            assert response.status == 201, response.status

    started = time.perf_counter()
    await asyncio.gather(*(put(name, body) for name, body in files.items()))
    return time.perf_counter() - started


async def write_ics_folder(db_url: str, folder: Path) -> dict[str, bytes]:
    """The resources syncsvc pushed, rendered from the same activities, one file each."""
    db = Database(db_url)
    try:
        async with db.session() as session:
            users = {(u.tenant_id, u.id): u for u in (await session.scalars(select(User))).all()}
            activities = (await session.scalars(select(Activity))).all()
    finally:
        await db.aclose()
    files = {}
    for activity in activities:
        spec = spec_for(activity, users[(activity.tenant_id, activity.user_id)])
        files[f"{spec.key}.ics"] = render_resource(spec)
    await asyncio.to_thread(write_files, folder, files)
    return files


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def plan(events: int) -> dict[str, Any]:
    return {
        "targetgroup_name": "Bench",
        "targets": [{"id": f"t{i}", "name": f"Target {i}"} for i in range(events)],
        "template": {"kind": "meeting", "subject": "Visit $account-name$"},
        "schedule": {"start_date": "2027-06-07", "duration": "00:30", "interval": "00:15"},
        "assignment": {"mode": "users", "users": ["u0"]},
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--rate", default="1000/1", help="SYNCSVC_CALDAV_RATE for the run")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sync-caldav-"))
    radicale_port, port = free_port(), free_port()
    radicale_root = f"http://127.0.0.1:{radicale_port}/"
    api = f"http://127.0.0.1:{port}"
    db_url = f"sqlite:///{tmp / 'syncsvc.db'}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SYNCSVC_")},
        "SYNCSVC_DATABASE_URL": db_url,
        "SYNCSVC_SECRET_KEY": "bench-secret-key-" + "s" * 32,
        "SYNCSVC_CALDAV_RATE": args.rate,
        "SYNCSVC_CALDAV_CONCURRENCY": str(args.concurrency),
        # The local Radicale is on loopback, which the egress policy refuses unless allowed.
        "SYNCSVC_EGRESS_ALLOW": "127.0.0.1/32",
    }
    created = await asyncio.create_subprocess_exec(
        str(BIN / "syncsvc"), "tenants", "create", "bench", env=env, stdout=subprocess.PIPE
    )
    out, _ = await created.communicate()
    assert created.returncode == 0, "syncsvc tenants create failed"
    key = out.decode().strip().splitlines()[-1]
    radicale = [
        str(BIN / "radicale"),
        "--config",
        "",
        "--server-hosts",
        f"127.0.0.1:{radicale_port}",
        "--auth-type",
        "none",
        "--storage-filesystem-folder",
        str(tmp / "collections"),
        "--logging-level",
        "warning",
    ]
    serve = [str(BIN / "syncsvc"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    try:
        with (
            process(radicale, tmp / "radicale.log"),
            process(serve, tmp / "serve.log", env),
        ):
            await wait_ready(f"{radicale_root}.web/")
            await wait_ready(f"{api}/healthz")
            async with aiohttp.ClientSession() as http:
                ours = await new_calendar(http, radicale_root)
                theirs = await new_calendar(http, radicale_root)
                raw = await new_calendar(http, radicale_root)
                await call(
                    http,
                    "PUT",
                    f"{api}/v1/users/u0",
                    key,
                    {
                        "name": "Bench",
                        "timezone": "Europe/Copenhagen",
                        "country": "DK",
                        "calendar": {
                            "provider": "caldav",
                            "url": ours,
                            "username": RADICALE_USER,
                            "password": RADICALE_PASSWORD,
                        },
                    },
                )
                started = time.perf_counter()
                batch = (await call(http, "POST", f"{api}/v1/batches", key, plan(args.events)))[
                    "id"
                ]
                committed_s = time.perf_counter() - started
                await wait_state(http, api, key, batch, "synced")
                push_s = time.perf_counter() - started
                assert await count_events(http, ours) == args.events
                files = await write_ics_folder(db_url, tmp / "vdir" / "ics")
                written = len(files)

                started = time.perf_counter()
                await call(http, "DELETE", f"{api}/v1/batches/{batch}", key)
                await wait_state(http, api, key, batch, "deleted")
                delete_s = time.perf_counter() - started
                assert await count_events(http, ours) == 0

                config = vdirsyncer_config(tmp / "vdir", theirs)
                await vdirsyncer(config, "discover")
                vdir_push_s = await vdirsyncer(config, "sync")
                assert await count_events(http, theirs) == written
                idle_s = await vdirsyncer(config, "sync")
                await asyncio.to_thread(shutil.rmtree, tmp / "vdir" / "ics")
                await asyncio.to_thread((tmp / "vdir" / "ics").mkdir)
                # Emptying a whole side is refused unless forced (vdirsyncer's safety check).
                vdir_delete_s = await vdirsyncer(config, "sync", "--force-delete")
                assert await count_events(http, theirs) == 0
                raw_s = await raw_puts(http, raw, files, args.concurrency)
                assert await count_events(http, raw) == written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = args.events
    print(
        f"{n} events into one Radicale calendar; syncsvc serve on SQLite, "
        f"SYNCSVC_CALDAV_RATE={args.rate}, concurrency {args.concurrency}"
    )
    print(
        f"  syncsvc   create: {push_s:6.2f} s  {n / push_s:7.1f} events/s  "
        f"(API commit {committed_s * 1000:.0f} ms included)"
    )
    print(f"  syncsvc   delete: {delete_s:6.2f} s  {n / delete_s:7.1f} events/s")
    print(
        f"  vdirsyncer sync (create): {vdir_push_s:6.2f} s  {n / vdir_push_s:7.1f} events/s  "
        f"(net of {idle_s:.2f} s start-up: {n / max(vdir_push_s - idle_s, 1e-9):.1f}/s)"
    )
    print(f"  vdirsyncer sync (delete): {vdir_delete_s:6.2f} s  {n / vdir_delete_s:7.1f} events/s")
    print(
        f"  Radicale ceiling (same resources, raw PUTs, {args.concurrency} at once): "
        f"{raw_s:6.2f} s  {n / raw_s:7.1f} events/s"
    )
    print(
        f"  create ratio syncsvc/Radicale ceiling: {raw_s / push_s:.2f} "
        f"(goal >= {CEILING_GOAL_RATIO:g})"
    )
    ratio = vdir_push_s / push_s
    net = (vdir_push_s - idle_s) / push_s
    print(
        f"  create ratio syncsvc/vdirsyncer: {ratio:.2f}x (vs vdirsyncer net of start-up: "
        f"{net:.2f}x; goal >= {GOAL_RATIO:g}x); delete ratio {vdir_delete_s / delete_s:.2f}x"
    )


if __name__ == "__main__":
    asyncio.run(main())
