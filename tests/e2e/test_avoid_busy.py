"""``avoid_busy`` reads each user's own calendar: a busy block written straight into the Graph
fake (``getSchedule``), the Google fake (``freeBusy``) and Radicale (a real event) takes the
slots it overlaps, in the preview and in the committed batch; a calendar that cannot be read
leaves the plan working, with a warning.

Europe/Copenhagen, June 2027 (CEST). Each user is busy on Monday 7 June 08:30–11:00, so the
default week's first two slots that day (09:00–10:00 and 10:15–11:15 with a 15-minute interval)
must be skipped.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select

from syncsvc.api.plans import CALENDARS
from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from syncsvc.store.models import Activity
from tests.fakes.google import FakeGoogle, running_fake
from tests.fakes.graph import FakeGraph, running_fake_graph
from tests.servers.radicale import RADICALE_PASSWORD, RADICALE_USER, new_calendar

CPH = ZoneInfo("Europe/Copenhagen")
DOMAIN = "brewery.example"
BUSY = (datetime(2027, 6, 7, 8, 30, tzinfo=CPH), datetime(2027, 6, 7, 11, 0, tzinfo=CPH))
USERS = ("graph1", "google1", "caldav1")


@dataclass(slots=True)
class World:
    client: TestClient[Any, Any]
    db: Database
    headers: dict[str, str]
    graph: FakeGraph
    google: FakeGoogle
    http: aiohttp.ClientSession
    mailbox: str
    google_user: str
    caldav_url: str

    async def put_user(self, user_id: str, calendar: dict[str, Any], email: str = "") -> None:
        answer = await self.client.put(
            f"/v1/users/{user_id}",
            headers=self.headers,
            json={
                "name": user_id,
                "email": email,
                "timezone": "Europe/Copenhagen",
                "calendar": calendar,
            },
        )
        assert answer.status == 200, await answer.text()


@pytest.fixture
async def world(
    tmp_path: Path, radicale_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[World]:
    async with running_fake_graph() as graph, running_fake() as google:
        assert graph.ca_bundle is not None
        monkeypatch.setenv("SSL_CERT_FILE", str(graph.ca_bundle))
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(graph.ca_bundle))
        key_file = tmp_path / "google-sa.json"
        sa_info = google.new_service_account(
            "syncsvc@proj.iam.gserviceaccount.com", delegated_domains=frozenset({DOMAIN})
        )
        key_file.write_text(json.dumps(sa_info), encoding="utf-8")
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'busy.db'}",
            secret_key="busy-secret-key-" + "x" * 30,
            graph_api_url=graph.graph_url,
            graph_authority_url=graph.authority_url,
            graph_client_id=graph.client_id,
            graph_client_secret=graph.client_secret,
            graph_tenant_id=graph.tenant_id,
            google_api_url=google.api_url,
            google_token_url=google.token_url,
            google_service_account_file=str(key_file),
        )
        db = Database(settings.database_url)
        await db.migrate()
        _, key = await create_tenant(db, "acme")
        mailbox = f"sales-{uuid.uuid4().hex[:8]}@contoso.example"
        graph.add_mailbox(mailbox, "Europe/Copenhagen")
        server = TestServer(build_app(settings, db), host="127.0.0.1")
        async with aiohttp.ClientSession() as http, TestClient(server) as client:
            yield World(
                client=client,
                db=db,
                headers={"Authorization": f"Bearer {key}"},
                graph=graph,
                google=google,
                http=http,
                mailbox=mailbox,
                google_user=f"g{uuid.uuid4().hex[:8]}@{DOMAIN}",
                caldav_url=await new_calendar(http, radicale_url),
            )
        await db.aclose()


async def _connect_busy(w: World) -> None:
    """The same busy block written into each calendar as its owner would, then the users."""
    w.graph.add_foreign_event(w.mailbox, "Dentist", *BUSY)
    w.google.add_event(
        w.google_user,
        {
            "summary": "Dentist",
            "start": {"dateTime": BUSY[0].isoformat(), "timeZone": "Europe/Copenhagen"},
            "end": {"dateTime": BUSY[1].isoformat(), "timeZone": "Europe/Copenhagen"},
        },
    )
    auth = {"Authorization": aiohttp.encode_basic_auth(RADICALE_USER, RADICALE_PASSWORD)}
    own = (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\n"
        "UID:dentist-1\r\nDTSTAMP:20270101T000000Z\r\n"
        "DTSTART:20270607T063000Z\r\nDTEND:20270607T090000Z\r\n"
        "SUMMARY:Dentist\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    async with w.http.put(w.caldav_url + "dentist-1.ics", data=own, headers=auth) as response:
        assert response.status == 201
    await w.put_user("graph1", {"provider": "graph", "mailbox": w.mailbox})
    await w.put_user(
        "google1", {"provider": "google", "calendar_id": w.google_user}, email=w.google_user
    )
    await w.put_user(
        "caldav1",
        {
            "provider": "caldav",
            "url": w.caldav_url,
            "username": RADICALE_USER,
            "password": RADICALE_PASSWORD,
        },
    )


def _body(users: tuple[str, ...], avoid_busy: bool = True) -> dict[str, Any]:
    return {
        "targets": [{"id": f"t{i}", "name": f"Brewery {i}"} for i in range(3 * len(users))],
        "template": {"kind": "meeting", "subject": "Visit"},
        "schedule": {
            "start_date": "2027-06-07",
            "duration": "01:00",
            "interval": "00:15",
            "avoid_busy": avoid_busy,
        },
        "assignment": {"mode": "users", "users": list(users)},
    }


def _overlaps_busy(start: datetime, end: datetime) -> bool:
    return start < BUSY[1] and BUSY[0] < end


def _slots(preview: dict[str, Any]) -> dict[str, list[tuple[datetime, datetime]]]:
    out: dict[str, list[tuple[datetime, datetime]]] = {}
    for a in preview["activities"]:
        slot = (datetime.fromisoformat(a["start"]), datetime.fromisoformat(a["end"]))
        out.setdefault(a["user_id"], []).append(slot)
    return out


@pytest.mark.timeout(120)
async def test_busy_blocks_in_each_calendar_take_their_slots(world: World) -> None:
    w = world
    await _connect_busy(w)

    # Without avoid_busy the first Monday slots are taken: the block really is in their way.
    blind = await w.client.post("/v1/plans", headers=w.headers, json=_body(USERS, False))
    assert blind.status == 200, await blind.text()
    for uid, slots in _slots(await blind.json()).items():
        assert any(_overlaps_busy(*s) for s in slots), uid

    answer = await w.client.post("/v1/plans", headers=w.headers, json=_body(USERS))
    assert answer.status == 200, await answer.text()
    preview = await answer.json()
    slots = _slots(preview)
    assert sorted(slots) == sorted(USERS)
    for uid, taken in slots.items():
        assert len(taken) == 3
        assert not any(_overlaps_busy(*s) for s in taken), (uid, taken)
    skipped = {w_["message"] for w_ in preview["warnings"] if w_["code"] == "busy_skipped"}
    for uid in USERS:
        assert any(f"({uid})" in m and "Mon 2027-06-07 09:00–10:00" in m for m in skipped), uid
    assert not [x for x in preview["warnings"] if x["code"] == "busy_unread"]

    # The commit plans the same way, with the calendars' answers cached by the preview.
    calendars = w.client.server.app[CALENDARS]
    reads = calendars.reads
    assert reads >= len(USERS)
    committed = await w.client.post("/v1/batches", headers=w.headers, json=_body(USERS))
    assert committed.status == 201, await committed.text()
    assert calendars.reads == reads
    async with w.db.session() as s:
        rows = (await s.execute(select(Activity.user_id, Activity.start, Activity.end))).all()
    assert len(rows) == 9
    for _, start, end in rows:
        assert not _overlaps_busy(start, end)


@pytest.mark.timeout(120)
async def test_a_calendar_that_cannot_be_read_warns_and_the_plan_still_works(
    world: World,
) -> None:
    w = world
    await _connect_busy(w)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/cal/"
    await w.put_user(
        "caldav2", {"provider": "caldav", "url": dead, "username": "u", "password": "p"}
    )
    await w.put_user("graph2", {"provider": "graph", "mailbox": "nobody@contoso.example"})

    answer = await w.client.post(
        "/v1/plans", headers=w.headers, json=_body(("caldav1", "caldav2", "graph2"))
    )
    assert answer.status == 200, await answer.text()
    preview = await answer.json()
    unread = [x["message"] for x in preview["warnings"] if x["code"] == "busy_unread"]
    assert len(unread) == 1
    assert "(caldav2)" in unread[0] and "(graph2)" in unread[0]
    assert "(caldav1)" not in unread[0]
    slots = _slots(preview)
    assert len(slots["caldav2"]) == 3
    assert not any(_overlaps_busy(*s) for s in slots["caldav1"])
