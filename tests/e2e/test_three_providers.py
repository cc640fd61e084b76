"""One batch over three users at once — Outlook (the Graph fake over https), Google (the Google
fake) and CalDAV (Radicale) — served by the real app and workers on a real port, with each
user's days off read from their own calendar. The batch is edited, one activity per user is
cancelled, users move meetings in their own calendars, the batch is edited again and finally
deleted; after each step every external calendar holds exactly what it should.

Times are Europe/Copenhagen in June 2027 (CEST, UTC+2). With ``max_per_day: 1`` and the default
week every user gets one meeting a day at 09:00 from Monday 7 June, skipping their day off:

=========  ==========  =====================  ======================
user       day off     meetings (targets)     days
=========  ==========  =====================  ======================
graph1     Tue 8 (oof)  Brewery 0, 1, 2        Mon 7, Wed 9, Thu 10
google1    Wed 9 (OOO)  Brewery 3, 4, 5        Mon 7, Tue 8, Thu 10
caldav1    Thu 10       Brewery 6, 7, 8        Mon 7, Tue 8, Wed 9
=========  ==========  =====================  ======================
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select, update

from syncsvc.app import build_app
from syncsvc.changes.apply import refresh_days_off
from syncsvc.changes.google import enqueue_channel_checks
from syncsvc.changes.graph import enqueue_subscription_checks
from syncsvc.config import Settings
from syncsvc.providers._ical import ParsedEvent, parse_events
from syncsvc.providers.graph import CANCELLED_SUBJECT_PREFIX
from syncsvc.runtime import run_workers
from syncsvc.service.connections import UserProviders
from syncsvc.service.tenants import create_tenant
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, Subscription, Tenant, User
from tests.fakes.google import FakeGoogle, running_fake
from tests.fakes.graph import FakeGraph, running_fake_graph
from tests.servers.radicale import RADICALE_PASSWORD, RADICALE_USER, new_calendar

CPH = ZoneInfo("Europe/Copenhagen")
WAIT_S = 30.0
DOMAIN = "brewery.example"


def at(day: int, hour: int = 9) -> datetime:
    return datetime(2027, 6, day, hour, tzinfo=CPH)


class Crm:
    """The tenant's CRM callback endpoint."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/callbacks", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/callbacks"

    async def _hook(self, request: web.Request) -> web.Response:
        self.received.append(json.loads(await request.read()))
        return web.Response(status=204)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass(slots=True)
class World:
    client: TestClient[Any, Any]
    db: Database
    settings: Settings
    headers: dict[str, str]
    tenant_id: str
    crm: Crm
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

    async def caldav_events(self) -> list[ParsedEvent]:
        auth = {"Authorization": aiohttp.encode_basic_auth(RADICALE_USER, RADICALE_PASSWORD)}
        async with self.http.get(self.caldav_url, headers=auth) as response:
            assert response.status == 200
            return parse_events(await response.read())

    async def activities(self, batch: str) -> dict[str, Activity]:
        async with self.db.session() as s:
            rows = await s.execute(select(Activity).where(Activity.batch_id == batch))
            return {a.target_id: a for a in rows.scalars()}

    async def batch_state(self, batch: str) -> str:
        got = await (await self.client.get(f"/v1/batches/{batch}", headers=self.headers)).json()
        return str(got["state"])


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def world(
    tmp_path: Path, radicale_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[World]:
    async with running_fake_graph() as graph, running_fake() as google:
        assert graph.ca_bundle is not None
        # The operator's CA bundle, so that Graph's https (a test CA) is trusted.
        monkeypatch.setenv("SSL_CERT_FILE", str(graph.ca_bundle))
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(graph.ca_bundle))
        key_file = tmp_path / "google-sa.json"
        sa_info = google.new_service_account(
            "syncsvc@proj.iam.gserviceaccount.com", delegated_domains=frozenset({DOMAIN})
        )
        key_file.write_text(json.dumps(sa_info), encoding="utf-8")
        port = _free_port()
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'e2e.db'}",
            secret_key="e2e-secret-key-" + "x" * 30,
            public_base_url=f"http://127.0.0.1:{port}",
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
        crm = Crm()
        await crm.start()
        tenant, key = await create_tenant(db, "acme")
        async with db.session() as s, s.begin():
            await s.execute(
                update(Tenant).where(Tenant.id == tenant.id).values(callback_url=crm.url)
            )
        mailbox = f"sales-{uuid.uuid4().hex[:8]}@contoso.example"
        graph.add_mailbox(mailbox, "Europe/Copenhagen")
        stop = asyncio.Event()
        workers = asyncio.create_task(run_workers(settings, db, stop))
        server = TestServer(build_app(settings, db), host="127.0.0.1", port=port)
        async with aiohttp.ClientSession() as http, TestClient(server) as client:
            yield World(
                client=client,
                db=db,
                settings=settings,
                headers={"Authorization": f"Bearer {key}"},
                tenant_id=tenant.id,
                crm=crm,
                graph=graph,
                google=google,
                http=http,
                mailbox=mailbox,
                google_user=f"g{uuid.uuid4().hex[:8]}@{DOMAIN}",
                caldav_url=await new_calendar(http, radicale_url),
            )
        stop.set()
        await workers
        await crm.close()
        await db.aclose()


async def _days_off(w: World, user_id: str) -> list[str]:
    async with w.db.session() as s:
        user = await s.get(User, (w.tenant_id, user_id))
        assert user is not None
        return list(user.provider_days_off)


async def _connect(w: World) -> None:
    """Three users, each with a day off in their own calendar, read by the service."""
    w.graph.add_foreign_event(w.mailbox, "Off", date(2027, 6, 8), date(2027, 6, 9), show_as="oof")
    w.google.add_event(
        w.google_user,
        {
            "summary": "Out of office",
            "eventType": "outOfOffice",
            "start": {"dateTime": "2027-06-09T00:00:00+02:00", "timeZone": "Europe/Copenhagen"},
            "end": {"dateTime": "2027-06-10T00:00:00+02:00", "timeZone": "Europe/Copenhagen"},
        },
    )
    auth = {"Authorization": aiohttp.encode_basic_auth(RADICALE_USER, RADICALE_PASSWORD)}
    own = (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\n"
        "UID:away-1\r\nDTSTAMP:20270101T000000Z\r\nDTSTART;VALUE=DATE:20270610\r\n"
        "DTEND;VALUE=DATE:20270611\r\nSUMMARY:Away\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    async with w.http.put(w.caldav_url + "away-1.ics", data=own, headers=auth) as response:
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
    # Graph and Google: subscribing is followed by a full sync, which reads the days off.
    await enqueue_subscription_checks(w.db)
    await enqueue_channel_checks(w.db)

    async def read() -> bool:
        return "2027-06-08" in await _days_off(w, "graph1") and "2027-06-09" in await _days_off(
            w, "google1"
        )

    await eventually(read, "Graph's and Google's days off")
    # CalDAV has no push: its days off are read as a CalDAV poll would read them.
    registry = UserProviders(w.settings, SecretBox(w.settings.secret_key), w.db)
    async with w.db.session() as s:
        caldav_user = await s.get(User, (w.tenant_id, "caldav1"))
    assert caldav_user is not None
    await refresh_days_off(w.db, caldav_user, await registry(caldav_user))
    await registry.aclose()
    assert await _days_off(w, "caldav1") == ["2027-06-10"]
    async with w.db.session() as s:
        subs = (await s.execute(select(Subscription.provider))).scalars().all()
    assert sorted(subs) == ["google", "graph"]


def _graph_ours(w: World) -> dict[str, tuple[str, datetime]]:
    """Our Graph events by activity id: (subject, start)."""
    out = {}
    for event in w.graph.mailbox_events(w.mailbox):
        activity = event.extended_value("syncsvcActivity")
        if activity is not None:
            out[activity] = (event.subject, event.start.astimezone(CPH))
    return out


def _google_ours(w: World) -> dict[str, tuple[str, datetime | None, str]]:
    """Our Google events by activity id: (summary, start, status)."""
    out = {}
    for event in w.google.events(w.google_user):
        private = (event.get("extendedProperties") or {}).get("private") or {}
        if "syncsvcActivity" in private:
            start = event.get("start", {}).get("dateTime")
            out[private["syncsvcActivity"]] = (
                str(event.get("summary")),
                datetime.fromisoformat(start).astimezone(CPH) if start else None,
                str(event["status"]),
            )
    return out


async def _caldav_ours(w: World) -> dict[str, tuple[str, Any, str | None]]:
    return {
        e.activity_id: (e.summary, e.start, e.status)
        for e in await w.caldav_events()
        if e.activity_id is not None
    }


@pytest.mark.timeout(180)
async def test_one_batch_over_graph_google_and_caldav(world: World) -> None:
    w = world
    await _connect(w)

    body = {
        "targetgroup_name": "Breweries",
        "targets": [{"id": f"t{i}", "name": f"Brewery {i}"} for i in range(9)],
        "template": {"kind": "meeting", "subject": "Visit $account-name$"},
        "schedule": {
            "start_date": "2027-06-07",
            "duration": "01:00",
            "interval": "00:15",
            "max_per_day": 1,
        },
        "assignment": {"mode": "users", "users": ["graph1", "google1", "caldav1"]},
    }
    answer = await w.client.post("/v1/batches", headers=w.headers, json=body)
    assert answer.status == 201, await answer.text()
    batch = str((await answer.json())["id"])

    async def synced() -> bool:
        return await w.batch_state(batch) == "synced"

    await eventually(synced, "the batch to sync")
    acts = await w.activities(batch)
    ids = {target: a.id for target, a in acts.items()}
    assert {t: a.start for t, a in acts.items()} == {
        "t0": at(7), "t1": at(9), "t2": at(10),  # graph1: Tue 8 off
        "t3": at(7), "t4": at(8), "t5": at(10),  # google1: Wed 9 off
        "t6": at(7), "t7": at(8), "t8": at(9),  # caldav1: Thu 10 off
    }  # fmt: skip
    assert _graph_ours(w) == {
        ids["t0"]: ("Visit Brewery 0", at(7)),
        ids["t1"]: ("Visit Brewery 1", at(9)),
        ids["t2"]: ("Visit Brewery 2", at(10)),
    }
    assert _google_ours(w) == {
        ids["t3"]: ("Visit Brewery 3", at(7), "confirmed"),
        ids["t4"]: ("Visit Brewery 4", at(8), "confirmed"),
        ids["t5"]: ("Visit Brewery 5", at(10), "confirmed"),
    }
    assert await _caldav_ours(w) == {
        ids["t6"]: ("Visit Brewery 6", at(7), "CONFIRMED"),
        ids["t7"]: ("Visit Brewery 7", at(8), "CONFIRMED"),
        ids["t8"]: ("Visit Brewery 8", at(9), "CONFIRMED"),
    }

    # 1. A batch edit reaches every calendar.
    answer = await w.client.patch(
        f"/v1/batches/{batch}",
        headers=w.headers,
        json={"template": {"subject": "Tour $account-name$"}},
    )
    assert answer.status == 200, await answer.text()

    async def toured() -> bool:
        subjects = [s for s, _ in _graph_ours(w).values()]
        subjects += [s for s, _, _ in _google_ours(w).values()]
        subjects += [s for s, _, _ in (await _caldav_ours(w)).values()]
        return len(subjects) == 9 and all(s.startswith("Tour ") for s in subjects)

    await eventually(toured, "the edit in all calendars")

    # 2. One cancelled activity per user, each shown the provider's way.
    for target in ("t1", "t4", "t7"):
        answer = await w.client.patch(
            f"/v1/activities/{ids[target]}", headers=w.headers, json={"status": "cancelled"}
        )
        assert answer.status == 200, await answer.text()

    async def cancelled() -> bool:
        return (
            _graph_ours(w)[ids["t1"]][0] == CANCELLED_SUBJECT_PREFIX + "Tour Brewery 1"
            and _google_ours(w)[ids["t4"]][2] == "cancelled"
            and (await _caldav_ours(w))[ids["t7"]][2] == "CANCELLED"
        )

    await eventually(cancelled, "the cancellations in all calendars")

    # 3. Users move a meeting in their own Outlook and Google calendars.
    graph_event = next(
        e.id
        for e in w.graph.mailbox_events(w.mailbox)
        if e.extended_value("syncsvcActivity") == ids["t2"]
    )
    await w.graph.user_move_event(w.mailbox, graph_event, at(11, 10), at(11, 11))
    google_event = next(
        e["id"]
        for e in w.google.events(w.google_user)
        if (e.get("extendedProperties") or {}).get("private", {}).get("syncsvcActivity")
        == ids["t5"]
    )
    w.google.user_patch_event(
        w.google_user,
        google_event,
        {
            "start": {"dateTime": at(11, 13).isoformat(), "timeZone": "Europe/Copenhagen"},
            "end": {"dateTime": at(11, 14).isoformat(), "timeZone": "Europe/Copenhagen"},
        },
    )

    async def moved() -> bool:
        acts = await w.activities(batch)
        return acts["t2"].start == at(11, 10) and acts["t5"].start == at(11, 13)

    await eventually(moved, "the users' moves to reach their activities")
    acts = await w.activities(batch)
    assert acts["t2"].user_edited and acts["t5"].user_edited

    async def reported() -> bool:
        moves = {c["activity_id"] for c in w.crm.received if c["type"] == "activity.changed"}
        return moves == {ids["t2"], ids["t5"]}

    await eventually(reported, "the CRM to hear of both moves")
    assert not [c for c in w.crm.received if c["type"] == "activity.deleted"]

    # 4. A second edit leaves what the users changed alone (their change wins).
    answer = await w.client.patch(
        f"/v1/batches/{batch}",
        headers=w.headers,
        json={"template": {"subject": "Final $account-name$"}},
    )
    assert answer.status == 200, await answer.text()

    async def final() -> bool:
        return (
            _graph_ours(w)[ids["t0"]][0] == "Final Brewery 0"
            and _google_ours(w)[ids["t3"]][0] == "Final Brewery 3"
            and (await _caldav_ours(w))[ids["t8"]][0] == "Final Brewery 8"
            and await w.batch_state(batch) == "synced"
        )

    await eventually(final, "the second edit")
    graph_now = _graph_ours(w)
    assert graph_now[ids["t0"]] == ("Final Brewery 0", at(7))
    assert graph_now[ids["t2"]] == ("Tour Brewery 2", at(11, 10))
    assert graph_now[ids["t1"]][0].startswith(CANCELLED_SUBJECT_PREFIX)
    google_now = _google_ours(w)
    assert google_now[ids["t3"]] == ("Final Brewery 3", at(7), "confirmed")
    assert google_now[ids["t5"]] == ("Tour Brewery 5", at(11, 13), "confirmed")
    assert google_now[ids["t4"]][2] == "cancelled"
    caldav_now = await _caldav_ours(w)
    assert caldav_now[ids["t6"]] == ("Final Brewery 6", at(7), "CONFIRMED")
    assert caldav_now[ids["t8"]] == ("Final Brewery 8", at(9), "CONFIRMED")
    assert caldav_now[ids["t7"]][2] == "CANCELLED"

    # 5. Deleting the batch removes exactly its events; the users' days off stay.
    answer = await w.client.delete(f"/v1/batches/{batch}", headers=w.headers)
    assert answer.status == 202

    async def deleted() -> bool:
        return await w.batch_state(batch) == "deleted"

    await eventually(deleted, "the batch to be deleted")
    assert [e.subject for e in w.graph.mailbox_events(w.mailbox)] == ["Off"]
    assert [e["summary"] for e in w.google.events(w.google_user) if e["status"] != "cancelled"] == [
        "Out of office"
    ]
    assert [e.uid for e in await w.caldav_events()] == ["away-1"]
    # Our own deletions were never mistaken for the users'.
    assert not [c for c in w.crm.received if c["type"] == "activity.deleted"]
