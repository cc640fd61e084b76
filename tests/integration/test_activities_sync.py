"""Deletes and quick closes of activities reach real calendars: Radicale (CalDAV) and the
Graph fake, driven by the service's own workers, on SQLite and on PostgreSQL.

Exactly the deleted activities' events leave the calendars (the others, and the user's own
event, stay); a quick close with a follow-up changes the closed event and adds the
follow-up's, both from one request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import func, select

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.runtime import run_workers
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from syncsvc.store.models import Operation
from tests.fakes.graph import FakeGraph, running_fake_graph
from tests.integration.test_sync_caldav import _events as caldav_events
from tests.servers.radicale import RADICALE_PASSWORD, RADICALE_USER, new_calendar

SECRET_KEY = "activities-sync-secret-" + "a" * 20
SYNC_TIMEOUT_S = 60.0
OWN_EVENT = (
    "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\n"
    "UID:own-1\r\nDTSTAMP:20300101T000000Z\r\nDTSTART:20300605T060000Z\r\n"
    "DTEND:20300605T070000Z\r\nSUMMARY:Dentist\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
)


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeGraph]:
    async with running_fake_graph() as server:
        yield server


@dataclass(slots=True)
class Svc:
    client: TestClient[Any, Any]
    db: Database
    headers: dict[str, str]
    http: aiohttp.ClientSession
    fake: FakeGraph
    calendar: str
    mailbox: str

    async def call(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        response = await self.client.request(method, path, json=json, headers=self.headers)
        return response.status, await response.json()

    async def caldav(self) -> dict[str | None, Any]:
        return {e.activity_id: e for e in await caldav_events(self.http, self.calendar)}

    def graph(self) -> dict[str | None, Any]:
        return {
            e.extended_value("syncsvcActivity"): e for e in self.fake.mailbox_events(self.mailbox)
        }


@pytest_asyncio.fixture
async def svc(
    fake: FakeGraph, database_url: str, radicale_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Svc]:
    assert fake.ca_bundle is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(fake.ca_bundle))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(fake.ca_bundle))
    settings = Settings(
        database_url=database_url,
        secret_key=SECRET_KEY,
        graph_api_url=fake.graph_url,
        graph_authority_url=fake.authority_url,
        graph_client_id=fake.client_id,
        graph_client_secret=fake.client_secret,
        graph_tenant_id=fake.tenant_id,
    )
    db = Database(settings.database_url)
    await db.migrate()
    _, key = await create_tenant(db, "acme")
    stop = asyncio.Event()
    workers = asyncio.create_task(run_workers(settings, db, stop))
    try:
        async with (
            aiohttp.ClientSession() as http,
            TestClient(TestServer(build_app(settings, db))) as client,
        ):
            calendar = await new_calendar(http, radicale_url)
            auth = {"Authorization": aiohttp.encode_basic_auth(RADICALE_USER, RADICALE_PASSWORD)}
            async with http.put(calendar + "own-1.ics", data=OWN_EVENT, headers=auth) as put:
                assert put.status == 201
            mailbox = f"sales-{id(client)}@contoso.example"
            fake.add_mailbox(mailbox, "Europe/Copenhagen")
            service = Svc(
                client, db, {"Authorization": f"Bearer {key}"}, http, fake, calendar, mailbox
            )
            for user_id, connection in (
                (
                    "cal",
                    {
                        "provider": "caldav",
                        "url": calendar,
                        "username": RADICALE_USER,
                        "password": RADICALE_PASSWORD,
                    },
                ),
                ("box", {"provider": "graph", "mailbox": mailbox}),
            ):
                status, body = await service.call(
                    "PUT",
                    f"/v1/users/{user_id}",
                    {"name": user_id, "timezone": "Europe/Copenhagen", "calendar": connection},
                )
                assert status == 200, body
            yield service
    finally:
        stop.set()
        await workers
        await db.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def idle(svc: Svc) -> bool:
    async with svc.db.session() as session:
        left = await session.scalar(
            select(func.count())
            .select_from(Operation)
            .where(Operation.state.in_(("pending", "running")))
        )
    return left == 0


async def listed(svc: Svc, query: str = "") -> list[dict[str, Any]]:
    status, body = await svc.call("GET", f"/v1/activities?limit=500&{query}")
    assert status == 200, body
    items: list[dict[str, Any]] = body["items"]
    return items


@pytest.mark.timeout(180)
async def test_deletes_remove_exactly_their_events_and_a_close_lands_both_changes(
    svc: Svc,
) -> None:
    body = {
        "targets": [{"id": f"t{i}", "name": f"Brewery {i}"} for i in range(8)],
        "template": {"kind": "meeting", "subject": "Visit $account-name$"},
        "schedule": {"start_date": "2030-06-05", "duration": "01:00", "interval": "00:15"},
        "assignment": {"mode": "users", "users": ["cal", "box"]},
    }
    status, batch = await svc.call("POST", "/v1/batches", body)
    assert status == 201, batch
    await eventually(lambda: idle(svc), "the batch to sync")
    cal = [a["id"] for a in await listed(svc, "user_id=cal")]
    box = [a["id"] for a in await listed(svc, "user_id=box")]
    assert len(cal) == len(box) == 4
    assert set(await svc.caldav()) == {None, *cal}  # None: the user's own event
    assert set(svc.graph()) == set(box)

    # One by id, two by ids (with an unknown one), one by the list's filter.
    status, answer = await svc.call("DELETE", f"/v1/activities/{cal[0]}")
    assert (status, answer) == (200, {"deleted": 1, "not_found": []})
    status, answer = await svc.call("DELETE", "/v1/activities", {"ids": [box[0], cal[1], "x"]})
    assert (status, answer) == (200, {"deleted": 2, "not_found": ["x"]})
    status, patched = await svc.call("PATCH", f"/v1/activities/{box[1]}", {"subject": "Drop me"})
    assert status == 200, patched
    status, answer = await svc.call("DELETE", "/v1/activities", {"filter": {"q": "drop me"}})
    assert (status, answer) == (200, {"deleted": 1, "not_found": []})

    # Quick close: unanswered with a follow-up on Graph, cancelled with one on CalDAV.
    status, closed = await svc.call(
        "POST", f"/v1/activities/{box[2]}/close", {"status": "unanswered", "follow_up": {}}
    )
    assert status == 200, closed
    assert closed["activity"]["status"] == "unanswered"
    box_follow_up = closed["follow_up"]
    assert (box_follow_up["follow_up_of"], box_follow_up["kind"]) == (box[2], "call")
    status, closed = await svc.call(
        "POST",
        f"/v1/activities/{cal[2]}/close",
        {"status": "cancelled", "follow_up": {"subject": "Try again"}},
    )
    assert status == 200, closed
    cal_follow_up = closed["follow_up"]

    await eventually(lambda: idle(svc), "the deletes and closes to reach the calendars")
    caldav = await svc.caldav()
    graph = svc.graph()
    assert set(caldav) == {None, cal[2], cal[3], cal_follow_up["id"]}
    assert set(graph) == {box[2], box[3], box_follow_up["id"]}
    assert caldav[None].summary == "Dentist"
    assert caldav[cal[2]].cancelled and not caldav[cal[3]].cancelled
    assert caldav[cal_follow_up["id"]].summary == "Try again"
    assert graph[box[2]].extended_value("syncsvcStatus") == "unanswered"
    assert graph[box_follow_up["id"]].extended_value("syncsvcStatus") == "planned"
    assert graph[box_follow_up["id"]].start.isoformat(timespec="seconds") == box_follow_up["start"]
    # What the list shows is what the calendars hold.
    live = {a["id"] for a in await listed(svc)}
    assert live == (set(caldav) - {None}) | set(graph)
