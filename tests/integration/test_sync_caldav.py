"""A batch lands in real CalDAV calendars (Radicale and Xandikos) through the worker, follows
edits and cancellations, and deleting it removes exactly its events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.providers._ical import parse_events
from syncsvc.runtime import run_workers
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, ExternalEvent, Operation, SyncCycle
from syncsvc.store.types import utcnow
from tests.servers.caldav import NewCalendar
from tests.servers.radicale import RADICALE_PASSWORD, RADICALE_USER, RadicaleServer, new_calendar

CPH = ZoneInfo("Europe/Copenhagen")
SYNC_TIMEOUT_S = 60.0


Service = tuple[TestClient[Any, Any], Database, dict[str, str]]


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Service]:
    """The API and the worker on ``settings``' database, with a tenant and its key."""
    db = Database(settings.database_url)
    await db.migrate()
    _, key = await create_tenant(db, "acme")
    stop = asyncio.Event()
    worker = asyncio.create_task(run_workers(settings, db, stop))
    async with TestClient(TestServer(build_app(settings, db))) as client:
        yield client, db, {"Authorization": f"Bearer {key}"}
    stop.set()
    await worker
    await db.aclose()


@pytest_asyncio.fixture
async def service(tmp_path: Any) -> AsyncIterator[Service]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'sync.db'}", secret_key="k" * 40)
    async with serving(settings) as running:
        yield running


async def _events(session: aiohttp.ClientSession, url: str) -> list[Any]:
    """Every event in the collection, read straight from the server."""
    auth = {"Authorization": aiohttp.encode_basic_auth(RADICALE_USER, RADICALE_PASSWORD)}
    body = (
        '<?xml version="1.0"?><C:calendar-query xmlns:D="DAV:" '
        'xmlns:C="urn:ietf:params:xml:ns:caldav"><D:prop><C:calendar-data/></D:prop>'
        '<C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT"/>'
        "</C:comp-filter></C:filter></C:calendar-query>"
    )
    async with session.request(
        "REPORT", url, data=body, headers={"Depth": "1", "Content-Type": "application/xml", **auth}
    ) as response:
        text = await response.text()
    found = []
    for chunk in text.split("BEGIN:VCALENDAR")[1:]:
        ics = "BEGIN:VCALENDAR" + chunk.split("END:VCALENDAR")[0] + "END:VCALENDAR\r\n"
        ics = ics.replace("&#13;", "").replace("&lt;", "<").replace("&gt;", ">")
        ics = ics.replace("&amp;", "&")
        found.extend(parse_events(ics))
    return found


async def _wait_state(
    client: TestClient[Any, Any], headers: dict[str, str], batch: str, state: str
) -> dict[str, Any]:
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while True:
        got = await (await client.get(f"/v1/batches/{batch}", headers=headers)).json()
        if got["state"] == state:
            return dict(got)
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.1)


@pytest.mark.timeout(120)
async def test_batch_lands_follows_edits_and_is_deleted(
    service: tuple[TestClient[Any, Any], Database, dict[str, str]], caldav_server: NewCalendar
) -> None:
    client, _db, headers = service
    async with aiohttp.ClientSession() as http:
        calendars = [await caldav_server(http) for _ in range(3)]
        for n, url in enumerate(calendars):
            answer = await client.put(
                f"/v1/users/u{n}",
                headers=headers,
                json={
                    "name": f"User {n}",
                    "timezone": "Europe/Copenhagen",
                    "country": "DK",
                    "calendar": {
                        "provider": "caldav",
                        "url": url,
                        "username": RADICALE_USER,
                        "password": RADICALE_PASSWORD,
                    },
                },
            )
            assert answer.status == 200, await answer.text()
        # The user's own event, which the batch must never touch.
        own = (
            "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\n"
            "UID:own-1\r\nDTSTAMP:20270101T000000Z\r\nDTSTART:20270601T060000Z\r\n"
            "DTEND:20270601T070000Z\r\nSUMMARY:Dentist\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
        )
        auth = {"Authorization": aiohttp.encode_basic_auth(RADICALE_USER, RADICALE_PASSWORD)}
        async with http.put(calendars[0] + "own-1.ics", data=own, headers=auth) as response:
            assert response.status == 201

        body = {
            "targetgroup_name": "Breweries",
            "targets": [{"id": f"t{i}", "name": f"Brewery {i}"} for i in range(60)],
            "template": {"kind": "meeting", "subject": "Visit $account-name$"},
            "schedule": {"start_date": "2027-06-07", "duration": "01:00", "interval": "00:15"},
            "assignment": {"mode": "users", "users": ["u0", "u1", "u2"]},
        }
        answer = await client.post("/v1/batches", headers=headers, json=body)
        assert answer.status == 201, await answer.text()
        batch = (await answer.json())["id"]
        synced = await _wait_state(client, headers, batch, "synced")
        assert synced["sync"]["synced"] == 60

        per_user = [await _events(http, url) for url in calendars]
        assert [len(events) for events in per_user] == [21, 20, 20]  # + the user's own event
        ours = [e for e in per_user[1] if e.batch_id == batch]
        subjects = sorted(e.summary for e in ours)
        assert subjects == sorted(f"Visit Brewery {i}" for i in range(20, 40))
        first = min(ours, key=lambda e: e.start)
        # Monday 7 June 2027, first window 09:00 local (CEST, +02:00).
        assert first.start == datetime(2027, 6, 7, 9, 0, tzinfo=CPH)

        # A batch edit reaches every event.
        answer = await client.patch(
            f"/v1/batches/{batch}",
            headers=headers,
            json={"template": {"subject": "Tour $account-name$"}},
        )
        assert answer.status == 200, await answer.text()
        await _wait_state(client, headers, batch, "synced")
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while True:
            ours = [e for e in await _events(http, calendars[2]) if e.batch_id == batch]
            if all(e.summary.startswith("Tour ") for e in ours):
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)

        # A cancellation reaches its event.
        activities = await (
            await client.get(f"/v1/batches/{batch}/activities?limit=1", headers=headers)
        ).json()
        first_activity = activities["items"][0]
        answer = await client.patch(
            f"/v1/activities/{first_activity['id']}", headers=headers, json={"status": "cancelled"}
        )
        assert answer.status == 200, await answer.text()
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while True:
            cancelled = [
                e
                for e in await _events(http, calendars[0])
                if e.activity_id == first_activity["id"]
            ]
            if cancelled and cancelled[0].status == "CANCELLED":
                break
            assert time.monotonic() < deadline, cancelled
            await asyncio.sleep(0.2)

        # Deleting the batch removes all 60 and leaves the user's own event alone.
        answer = await client.delete(f"/v1/batches/{batch}", headers=headers)
        assert answer.status == 202
        gone = await _wait_state(client, headers, batch, "deleted")
        assert gone["sync"]["deleted"] == 60
        remaining = [await _events(http, url) for url in calendars]
        assert [[e.uid for e in events] for events in remaining] == [["own-1"], [], []]


@pytest.mark.timeout(120)
async def test_a_calendar_server_that_is_down_costs_no_attempts_and_loses_nothing(
    service: tuple[TestClient[Any, Any], Database, dict[str, str]], tmp_path: Path
) -> None:
    """A server that refuses connections is down, not the operation wrong: the worker keeps
    retrying (however long the outage) and gives nothing up, then syncs once it is back."""
    client, db, headers = service
    server = RadicaleServer(tmp_path / "radicale")
    server.folder.mkdir()
    server.start()
    try:
        async with aiohttp.ClientSession() as http:
            url = await new_calendar(http, server.url)
            user = {
                "name": "User 0",
                "timezone": "Europe/Copenhagen",
                "country": "DK",
                "calendar": {
                    "provider": "caldav",
                    "url": url,
                    "username": RADICALE_USER,
                    "password": RADICALE_PASSWORD,
                },
            }
            answer = await client.put("/v1/users/u0", headers=headers, json=user)
            assert answer.status == 200, await answer.text()
            server.kill9()
            body = {
                "targetgroup_name": "Breweries",
                "targets": [{"id": f"t{i}", "name": f"Brewery {i}"} for i in range(3)],
                "template": {"kind": "meeting", "subject": "Visit $account-name$"},
                "schedule": {"start_date": "2027-06-07", "duration": "01:00", "interval": "00:15"},
                "assignment": {"mode": "users", "users": ["u0"]},
            }
            answer = await client.post("/v1/batches", headers=headers, json=body)
            assert answer.status == 201, await answer.text()
            batch = (await answer.json())["id"]

            deadline = time.monotonic() + SYNC_TIMEOUT_S
            while await _refusals(db) <= 3:  # each create refused, one of them twice
                assert time.monotonic() < deadline, await _queue_state(db)
                await asyncio.sleep(0.1)
            async with db.session() as s:
                ops = (await s.execute(select(Operation))).scalars().all()
            creates = [op for op in ops if op.kind == "create"]
            assert len(creates) == 3
            assert all(op.state in ("pending", "running") and op.attempts == 0 for op in creates)

            server.start()
            synced = await _wait_state(client, headers, batch, "synced")
            assert synced["sync"] == {**synced["sync"], "synced": 3, "failed": 0}
            events = await _events(http, url)
            assert sorted(e.summary for e in events) == [f"Visit Brewery {i}" for i in range(3)]
    finally:
        server.stop()


async def _refusals(db: Database) -> int:
    """Operations the worker found the server down for, summed over its cycles."""
    async with db.session() as s:
        cycles = (await s.execute(select(SyncCycle))).scalars().all()
    return sum(cycle.throttled for cycle in cycles)


async def _queue_state(db: Database) -> Any:
    """The operations and cycles, for a failing assertion's message."""
    async with db.session() as s:
        ops = (await s.execute(select(Operation))).scalars().all()
        cycles = (await s.execute(select(SyncCycle))).scalars().all()
    return [(o.kind, o.state, o.attempts, o.not_before, o.last_error) for o in ops], [
        (c.mailbox, c.done, c.failed, c.throttled) for c in cycles
    ]


@pytest.mark.timeout(120)
async def test_an_activity_an_adapter_cannot_take_fails_alone(
    service: tuple[TestClient[Any, Any], Database, dict[str, str]],
    radicale_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stored attendee address with a CR/LF (from before the API refused them) makes
    icalendar raise: that operation records the error and ends dead after its attempts, while
    the mailbox's other work goes on."""
    client, db, headers = service
    async with aiohttp.ClientSession() as http:
        url = await new_calendar(http, radicale_url)
        calendar = {
            "provider": "caldav",
            "url": url,
            "username": RADICALE_USER,
            "password": RADICALE_PASSWORD,
        }
        body = {"name": "U", "timezone": "Europe/Copenhagen", "calendar": calendar}
        assert (await client.put("/v1/users/u0", headers=headers, json=body)).status == 200
        contact = {"id": "c1", "first_name": "Bo", "email": "bo\r\nX-INJECTED:1@x.example"}
        plan = {
            "targetgroup_name": "Breweries",
            "targets": [{"id": "t0", "name": "Brewery 0", "contacts": [contact]}],
            "template": {"kind": "meeting", "subject": "Visit"},
            "schedule": {"start_date": "2027-06-07", "duration": "01:00"},
            "assignment": {"mode": "users", "users": ["u0"]},
        }
        refused = await client.post("/v1/batches", headers=headers, json=plan)
        assert refused.status == 422, await refused.text()
        assert "control characters" in await refused.text()

        plan["targets"] = [{"id": f"t{i}", "name": f"Brewery {i}"} for i in range(3)]
        answer = await client.post("/v1/batches", headers=headers, json=plan)
        assert answer.status == 201, await answer.text()
        batch = (await answer.json())["id"]
        await _wait_state(client, headers, batch, "synced")
        async with db.session() as s, s.begin():
            bad = (
                await s.scalars(
                    select(Activity).where(Activity.batch_id == batch).order_by(Activity.start)
                )
            ).first()
            assert bad is not None
            bad.attendees = [{"contact_id": "c1", "name": "Bo", "email": contact["email"]}]
        edit = {"template": {"subject": "Tour"}}
        assert (
            await client.patch(f"/v1/batches/{batch}", headers=headers, json=edit)
        ).status == 200

        async def bad_op() -> Operation | None:
            async with db.session() as s:
                return (
                    await s.scalars(
                        select(Operation)
                        .join(ExternalEvent, ExternalEvent.id == Operation.ledger_id)
                        .where(ExternalEvent.activity_id == bad.id, Operation.kind == "update")
                    )
                ).first()

        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while True:
            op = await bad_op()
            tours = [e.summary for e in await _events(http, url)]
            if op is not None and op.attempts >= 1 and tours.count("Tour") == 2:
                break
            assert time.monotonic() < deadline, (op, tours)
            await asyncio.sleep(0.2)
        assert op.state == "pending" and "unexpected ValueError" in (op.last_error or ""), op
        assert "CR or LF" in (op.last_error or "")
        assert "sync.op.unexpected" in caplog.text

        # Its last attempt (moved up instead of waiting out the backoff) gives up.
        async with db.session() as s, s.begin():
            row = await s.get(Operation, op.id)
            assert row is not None
            row.attempts, row.not_before = 7, utcnow()
        failed = await _wait_state(client, headers, batch, "failed")
        assert failed["sync"]["failed"] == 1 and failed["sync"]["synced"] == 2, failed
        done = await bad_op()
        assert done is not None and done.state == "dead"
