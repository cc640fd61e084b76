"""A real subscriber: vdirsyncer's ``http`` storage syncs a user's feed into a folder.

The service runs on a real 127.0.0.1 port with a SQLite file; vdirsyncer runs as its own
process (``discover`` once, then ``sync``) before and after an edit and a cancellation, and
the test reads the ``.ics`` files it wrote.

vdirsyncer's http storage replaces each item's UID by a hash of its content (its
``_ignore_uids``), so the files are matched to activities by ``X-SYNCSVC-ACTIVITY``, and an
edited item arrives as a new file replacing the old one.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio
from aiohttp import web
from icalendar import Calendar, Component

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database

VDIRSYNCER = str(Path(sys.executable).with_name("vdirsyncer"))
VDIRSYNCER_TIMEOUT_S = 60
SECRET_KEY = "e2e-secret-key-" + "s" * 32
USER_ID = "ck"
ZONE = "Europe/Copenhagen"


@dataclass(frozen=True, slots=True)
class Service:
    base_url: str
    headers: dict[str, str]


@pytest_asyncio.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    """The API on a socket bound first, so its public base URL names the real port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'syncsvc.db'}",
        secret_key=SECRET_KEY,
        public_base_url=base_url,
        # The plan is on 2030-06-03, beyond the feed's default window (548 days ahead).
        feed_days_ahead=2_000,
    )
    db = Database(settings.database_url)
    await db.migrate()
    _, key = await create_tenant(db, "E2E")
    runner = web.AppRunner(build_app(settings, db))
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield Service(base_url, {"Authorization": f"Bearer {key}"})
    finally:
        await runner.cleanup()
        await db.aclose()


async def _call(
    http: aiohttp.ClientSession, service: Service, method: str, path: str, body: Any = None
) -> Any:
    async with http.request(
        method, service.base_url + path, json=body, headers=service.headers
    ) as response:
        assert response.status < 300, await response.text()
        return await response.json()


def _write_config(folder: Path, feed_url: str) -> Path:
    (folder / "calendar").mkdir()
    config = folder / "config"
    config.write_text(
        f"""[general]
status_path = "{folder / "status"}/"

[pair feed]
a = "feed_remote"
b = "feed_local"
collections = null
conflict_resolution = "a wins"

[storage feed_remote]
type = "http"
url = "{feed_url}"

[storage feed_local]
type = "filesystem"
path = "{folder / "calendar"}/"
fileext = ".ics"
"""
    )
    return config


async def _vdirsyncer(config: Path, command: str) -> None:
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    process = await asyncio.create_subprocess_exec(
        VDIRSYNCER,
        "-c",
        str(config),
        command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    output, _ = await asyncio.wait_for(process.communicate(), VDIRSYNCER_TIMEOUT_S)
    assert process.returncode == 0, output.decode()


def _local_items(folder: Path) -> dict[str, Component]:
    """The synced folder's items by activity id."""
    items: dict[str, Component] = {}
    for path in sorted((folder / "calendar").glob("*.ics")):
        calendar = Calendar.from_ical(path.read_bytes())
        (event,) = calendar.walk("VEVENT")
        assert [str(tz["TZID"]) for tz in calendar.walk("VTIMEZONE")] == [ZONE]
        items[str(event["X-SYNCSVC-ACTIVITY"])] = event
    return items


async def test_vdirsyncer_follows_edits_and_cancellations(service: Service, tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as http:
        await _call(
            http,
            service,
            "PUT",
            f"/v1/users/{USER_ID}",
            {"name": "Christine Kayser", "timezone": ZONE, "calendar": {"provider": "none"}},
        )
        plan = {
            "targets": [{"id": f"org-{n}", "name": f"Brewery {n}"} for n in (1, 2, 3)],
            "template": {"kind": "meeting", "subject": "Visit $account-name$"},
            "schedule": {
                "start_date": "2030-06-03",
                "week": {
                    "mon": [["09:00", "12:00"]],
                    **{day: [] for day in ("tue", "wed", "thu", "fri", "sat", "sun")},
                },
                "duration": "01:00",
            },
            "assignment": {"mode": "users", "users": [USER_ID]},
        }
        batch = await _call(http, service, "POST", "/v1/batches", plan)
        listed = await _call(http, service, "GET", f"/v1/batches/{batch['id']}/activities")
        first, second, third = (a["id"] for a in listed["items"])
        feed = await _call(http, service, "POST", f"/v1/users/{USER_ID}/feed")
        assert feed["url"].startswith(service.base_url + "/feeds/")

        config = _write_config(tmp_path, feed["url"])
        await _vdirsyncer(config, "discover")
        await _vdirsyncer(config, "sync")
        synced = _local_items(tmp_path)
        assert sorted(synced) == sorted([first, second, third])
        assert {str(e["SUMMARY"]) for e in synced.values()} == {
            "Visit Brewery 1",
            "Visit Brewery 2",
            "Visit Brewery 3",
        }
        assert {str(e["STATUS"]) for e in synced.values()} == {"CONFIRMED"}
        assert synced[first]["DTSTART"].to_ical().decode() == "20300603T090000"
        assert synced[first]["DTSTART"].params["TZID"] == ZONE

        await _call(
            http,
            service,
            "PATCH",
            f"/v1/activities/{first}",
            {"subject": "Tasting at Mikkeller", "start": "2030-06-03T15:00:00+02:00"},
        )
        await _call(http, service, "PATCH", f"/v1/activities/{second}", {"status": "cancelled"})
        await _vdirsyncer(config, "sync")

    after = _local_items(tmp_path)
    assert len(list((tmp_path / "calendar").glob("*.ics"))) == 3
    assert str(after[first]["SUMMARY"]) == "Tasting at Mikkeller"
    assert after[first]["DTSTART"].to_ical().decode() == "20300603T150000"
    assert after[first]["DTEND"].to_ical().decode() == "20300603T160000"
    assert after[first]["SEQUENCE"] == synced[first]["SEQUENCE"] + 1
    assert str(after[second]["STATUS"]) == "CANCELLED"
    assert after[third].to_ical() == synced[third].to_ical()
