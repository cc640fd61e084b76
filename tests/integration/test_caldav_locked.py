"""A 423 storm: a real Radicale behind a proxy that answers ``423 Locked`` to every second PUT
that overlaps another, as a locking server does under our concurrency. A batch's creates,
its edit and a cancellation go through the real service and worker; each lands once, none
gives up, and the locks cost the operations no attempt (the calendar's writes narrow to one
at a time instead, ``syncsvc/providers/_adaptive.py``)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from sqlalchemy import select

from syncsvc.config import Settings
from syncsvc.limits import DEFAULT_LIMITS, RateLimit
from syncsvc.store.models import Operation
from tests.integration.test_sync_caldav import Service, _events, _wait_state, serving
from tests.servers.proxy import caldav_proxy
from tests.servers.radicale import RADICALE_PASSWORD, RADICALE_USER, new_calendar

EVENTS = 40
SYNC_TIMEOUT_S = 60.0
#: Fast enough that the worker's 4 writes at once really overlap.
FAST_CALDAV = RateLimit(1000, 1.0, 4)


@pytest_asyncio.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'sync.db'}",
        secret_key="k" * 40,
        limits={**DEFAULT_LIMITS, "caldav": FAST_CALDAV},
    )
    async with serving(settings) as running:
        yield running


async def _until(what: Any, message: Any) -> None:
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while not await what():
        assert time.monotonic() < deadline, await message()
        await asyncio.sleep(0.2)


@pytest.mark.timeout(150)
async def test_a_423_storm_lands_every_operation_once_and_none_dies(
    service: Service, radicale_url: str
) -> None:
    client, db, headers = service
    in_flight: Counter[str] = Counter()
    overlapping = Counter[str]()

    async def storm(request: web.Request, _: bytes) -> web.StreamResponse | None:
        if request.method != "PUT" or in_flight["PUT"] == 0:
            return None
        overlapping["PUT"] += 1
        if overlapping["PUT"] % 2:
            overlapping["423"] += 1
            return web.Response(status=423, text="collection is locked")
        return None

    async with (
        aiohttp.ClientSession() as http,
        caldav_proxy(radicale_url, storm, in_flight) as proxy,
    ):
        calendar = await new_calendar(http, radicale_url)
        user = {
            "name": "U",
            "timezone": "Europe/Copenhagen",
            "calendar": {
                "provider": "caldav",
                "url": proxy + calendar[len(radicale_url) - 1 :],
                "username": RADICALE_USER,
                "password": RADICALE_PASSWORD,
            },
        }
        assert (await client.put("/v1/users/u0", headers=headers, json=user)).status == 200
        plan = {
            "targetgroup_name": "Breweries",
            "targets": [{"id": f"t{i}", "name": f"Brewery {i}"} for i in range(EVENTS)],
            "template": {"kind": "meeting", "subject": "Visit $account-name$"},
            "schedule": {"start_date": "2027-06-07", "duration": "00:30", "interval": "00:15"},
            "assignment": {"mode": "users", "users": ["u0"]},
        }
        answer = await client.post("/v1/batches", headers=headers, json=plan)
        assert answer.status == 201, await answer.text()
        batch = (await answer.json())["id"]
        synced = await _wait_state(client, headers, batch, "synced")
        assert synced["sync"]["synced"] == EVENTS and synced["sync"]["failed"] == 0

        edit = {"template": {"subject": "Tour $account-name$"}}
        assert (
            await client.patch(f"/v1/batches/{batch}", headers=headers, json=edit)
        ).status == 200
        activities = await (
            await client.get(f"/v1/batches/{batch}/activities?limit=1", headers=headers)
        ).json()
        cancelled_id = activities["items"][0]["id"]
        cancel = {"status": "cancelled"}
        answer = await client.patch(f"/v1/activities/{cancelled_id}", headers=headers, json=cancel)
        assert answer.status == 200, await answer.text()

        async def ops() -> list[Operation]:
            async with db.session() as s:
                return list((await s.scalars(select(Operation))).all())

        async def settled() -> bool:
            events = await _events(http, calendar)
            return (
                all(e.summary.startswith("Tour ") for e in events)
                and any(e.status == "CANCELLED" for e in events)
                and all(op.state == "done" for op in await ops())
            )

        async def state() -> Any:
            return [(o.kind, o.state, o.attempts, o.last_error) for o in await ops()], overlapping

        await _until(settled, state)
        events = await _events(http, calendar)

    assert overlapping["423"] >= 3, overlapping  # the storm really hit
    assert len(events) == EVENTS
    assert max(Counter(e.uid for e in events).values()) == 1
    assert sorted(e.summary for e in events) == sorted(f"Tour Brewery {i}" for i in range(EVENTS))
    assert [e.activity_id for e in events if e.status == "CANCELLED"] == [cancelled_id]
    done = await ops()
    assert {op.kind for op in done} >= {"create", "update"}
    assert [(op.kind, op.state) for op in done if op.state != "done"] == []
    assert all(op.attempts == 0 for op in done), await state()
