"""A batch edit that lands while a create is between the calendar and our commit is not lost.

The hook: the worker's record of a create's success is lost (as a kill -9 or a database outage
right after the provider answered would lose it), so the events are in Radicale while the
ledger still says ``pending_create``. The record is dropped rather than raised: a raise ends
the cycle and cancels its sibling creates, which makes how many events arrive a race. The batch
is then edited; its update operations are merged into the re-claimed creates, which find their
events (412) and must rewrite them to the edit.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.queue import worker as worker_module
from syncsvc.runtime import run_workers
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from tests.integration.test_sync_caldav import _events, _wait_state
from tests.servers.radicale import RADICALE_PASSWORD, RADICALE_USER, new_calendar

DEADLINE_S = 60.0


@pytest.mark.timeout(180)
async def test_an_edit_during_a_lost_create_commit_reaches_the_calendar(
    tmp_path: Any, radicale_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'lost.db'}", secret_key="k" * 40)
    db = Database(settings.database_url)
    await db.migrate()
    _, key = await create_tenant(db, "acme")
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with (
            TestClient(TestServer(build_app(settings, db))) as client,
            aiohttp.ClientSession() as http,
        ):
            url = await new_calendar(http, radicale_url)
            answer = await client.put(
                "/v1/users/u1",
                headers=headers,
                json={
                    "name": "U",
                    "timezone": "Europe/Copenhagen",
                    "calendar": {
                        "provider": "caldav",
                        "url": url,
                        "username": RADICALE_USER,
                        "password": RADICALE_PASSWORD,
                    },
                },
            )
            assert answer.status == 200, await answer.text()
            body = {
                "targetgroup_name": "Breweries",
                "targets": [{"id": f"t{i}", "name": f"Brewery {i}"} for i in range(3)],
                "template": {"kind": "meeting", "subject": "Visit $account-name$"},
                "schedule": {"start_date": "2027-06-07", "duration": "01:00", "interval": "00:15"},
                "assignment": {"mode": "users", "users": ["u1"]},
            }
            answer = await client.post("/v1/batches", headers=headers, json=body)
            assert answer.status == 201, await answer.text()
            batch = (await answer.json())["id"]

            async def lost(self: object, *args: object) -> None:
                """The creates' record never reaches the database."""

            with monkeypatch.context() as patch:
                patch.setattr(worker_module.Worker, "_succeeded", lost)
                stop = asyncio.Event()
                first = asyncio.create_task(run_workers(settings, db, stop))
                deadline = time.monotonic() + DEADLINE_S
                while len(await _events(http, url)) < 3:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
                stop.set()
                await first
            got = await (await client.get(f"/v1/batches/{batch}", headers=headers)).json()
            assert got["sync"]["synced"] == 0  # in the calendar, not in our ledger

            edit = {"template": {"subject": "Tour $account-name$"}}
            answer = await client.patch(f"/v1/batches/{batch}", headers=headers, json=edit)
            assert answer.status == 200, await answer.text()

            stop = asyncio.Event()
            second = asyncio.create_task(run_workers(settings, db, stop))
            try:
                await _wait_state(client, headers, batch, "synced")
            finally:
                stop.set()
                await second
            events = await _events(http, url)
            assert sorted(e.summary for e in events) == [f"Tour Brewery {i}" for i in range(3)]
    finally:
        await db.aclose()
