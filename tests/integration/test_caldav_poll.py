"""CalDAV change detection against real servers, Radicale and Xandikos, both started here.

First the adapter alone (``sync-collection``, the ``getctag`` fallback, what a poll costs), then
the service end to end: a batch lands through the worker, the user moves and retitles one event,
deletes another and adds a day off straight on the server, and one poll brings it all back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import aiohttp
import icalendar
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select, update

from syncsvc.app import build_app
from syncsvc.changes.caldav import (
    caldav_poll,
    enqueue_polls,
    next_due,
    poll_offset_s,
)
from syncsvc.config import Settings
from syncsvc.errors import SyncTokenExpired
from syncsvc.providers.base import EventSpec
from syncsvc.providers.caldav import CalDAVProvider
from syncsvc.queue.worker import TaskContext
from syncsvc.runtime import run_workers
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, ExternalEvent, Operation, Subscription, User
from syncsvc.store.states import OpKind
from syncsvc.store.types import utcnow
from tests.servers.caldav import NewCalendar
from tests.servers.proxy import caldav_proxy
from tests.servers.radicale import RADICALE_PASSWORD, RADICALE_USER

CPH = ZoneInfo("Europe/Copenhagen")
SYNC_TIMEOUT_S = 60.0
#: The worker's own poll loop is kept out of the way: these tests poll when they choose.
QUIET_POLL_MINUTES = 24 * 60


# --- Servers ---


AUTH = {"Authorization": aiohttp.encode_basic_auth(RADICALE_USER, RADICALE_PASSWORD)}


@dataclass
class Counted:
    """An aiohttp session that counts the requests made through it."""

    session: aiohttp.ClientSession
    requests: list[str]


@pytest_asyncio.fixture
async def counted() -> AsyncIterator[Counted]:
    requests: list[str] = []

    async def on_start(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
        requests.append(params.method)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        yield Counted(session, requests)


def _spec(key: str, start: datetime) -> EventSpec:
    return EventSpec(
        key=key,
        activity_id=f"activity-{key}",
        batch_id="batch-1",
        subject=f"Visit {key}",
        start=start,
        end=start + timedelta(hours=1),
        timezone="Europe/Copenhagen",
    )


async def _raw(session: aiohttp.ClientSession, url: str) -> tuple[str, bytes]:
    async with session.get(url, headers=AUTH) as response:
        assert response.status == 200
        return response.headers["ETag"], await response.read()


async def _put(session: aiohttp.ClientSession, url: str, body: bytes, etag: str | None) -> None:
    headers = {**AUTH, "Content-Type": "text/calendar; charset=utf-8"}
    headers.update({"If-Match": etag} if etag else {"If-None-Match": "*"})
    async with session.put(url, data=body, headers=headers) as response:
        assert response.status in (200, 201, 204), await response.text()


async def _delete(session: aiohttp.ClientSession, url: str) -> None:
    async with session.delete(url, headers=AUTH) as response:
        assert response.status in (200, 204), await response.text()


def _moved(body: bytes, start: datetime, summary: str) -> bytes:
    """The resource as a user's client saves it after moving and retitling the event."""
    calendar = icalendar.Calendar.from_ical(body)
    [event] = calendar.events
    duration = event.end - event.start
    for name in ("DTSTART", "DTEND", "SUMMARY", "SEQUENCE"):
        event.pop(name, None)
    event.add("DTSTART", start)
    event.add("DTEND", start + duration)
    event.add("SUMMARY", summary)
    event.add("SEQUENCE", 7)
    return bytes(calendar.to_ical())


def _day_off(uid: str, day: date) -> bytes:
    """An all-day out-of-office event, as Outlook-style clients write it."""
    lines = [
        "BEGIN:VCALENDAR",
        "VERSION:2.0",
        "PRODID:-//Test//Hand made//EN",
        "BEGIN:VEVENT",
        f"UID:{uid}",
        "DTSTAMP:20260101T000000Z",
        f"DTSTART;VALUE=DATE:{day:%Y%m%d}",
        f"DTEND;VALUE=DATE:{day + timedelta(days=1):%Y%m%d}",
        "SUMMARY:Vacation",
        "X-MICROSOFT-CDO-BUSYSTATUS:OOF",
        "END:VEVENT",
        "END:VCALENDAR",
        "",
    ]
    return "\r\n".join(lines).encode()


# --- The adapter ---


async def test_sync_collection_sees_an_edit_and_a_delete_and_nothing_else(
    caldav_server: NewCalendar, counted: Counted
) -> None:
    url = await caldav_server(counted.session)
    provider = CalDAVProvider(url, RADICALE_USER, RADICALE_PASSWORD, counted.session)
    start = datetime(2027, 6, 14, 9, 0, tzinfo=CPH)
    kept = await provider.create(_spec("kept", start))
    edited = await provider.create(_spec("edited", start + timedelta(hours=2)))
    gone = await provider.create(_spec("gone", start + timedelta(hours=4)))

    first = await provider.changes(None)
    assert first.method == "sync-collection" and first.full
    assert dict(first.changed) == {r.event_id: r.etag for r in (kept, edited, gone)}

    del counted.requests[:]
    quiet = await provider.changes(first.state)
    assert counted.requests == ["REPORT"]
    assert (dict(quiet.changed), quiet.removed, quiet.full) == ({}, (), False)

    etag, body = await _raw(counted.session, url + edited.event_id)
    moved = datetime(2027, 6, 15, 12, 0, tzinfo=UTC)
    await _put(counted.session, url + edited.event_id, _moved(body, moved, "Moved"), etag)
    await _delete(counted.session, url + gone.event_id)

    later = await provider.changes(quiet.state)
    assert list(later.changed) == [edited.event_id] and later.removed == (gone.event_id,)
    [read] = await provider.fetch(list(later.changed))
    assert read.etag == later.changed[edited.event_id]
    [event] = read.events
    assert (event.summary, event.start, event.activity_id) == ("Moved", moved, "activity-edited")


async def test_a_forgotten_sync_token_asks_for_a_full_listing(
    caldav_server: NewCalendar, counted: Counted
) -> None:
    url = await caldav_server(counted.session)
    provider = CalDAVProvider(url, RADICALE_USER, RADICALE_PASSWORD, counted.session)
    first = await provider.changes(None)
    bogus = first.state.replace('"}', 'x-forgotten"}')

    with pytest.raises(SyncTokenExpired):
        await provider.changes(bogus)


async def test_the_ctag_fallback_costs_one_request_unchanged_and_lists_what_moved(
    caldav_server: NewCalendar, counted: Counted
) -> None:
    url = await caldav_server(counted.session)
    provider = CalDAVProvider(url, RADICALE_USER, RADICALE_PASSWORD, counted.session)
    start = datetime(2027, 6, 14, 9, 0, tzinfo=CPH)
    edited = await provider.create(_spec("edited", start))
    gone = await provider.create(_spec("gone", start + timedelta(hours=2)))
    first = await provider.changes_by_ctag(None)
    assert first.method == "ctag" and first.full
    assert set(first.changed) == {edited.event_id, gone.event_id}

    del counted.requests[:]
    quiet = await provider.changes(first.state)
    assert counted.requests == ["PROPFIND"]
    assert (dict(quiet.changed), quiet.removed, quiet.state) == ({}, (), first.state)

    etag, body = await _raw(counted.session, url + edited.event_id)
    await _put(counted.session, url + edited.event_id, _moved(body, start, "Retitled"), etag)
    await _delete(counted.session, url + gone.event_id)
    later = await provider.changes(quiet.state)
    assert list(later.changed) == [edited.event_id] and later.removed == (gone.event_id,)
    assert later.method == "ctag" and not later.full


async def _no_sync_collection(request: web.Request, body: bytes) -> web.Response | None:
    """501 to ``sync-collection``, like a server without RFC 6578; the rest passes."""
    if request.method == "REPORT" and b"sync-collection" in body:
        return web.Response(status=501, text="REPORT sync-collection not implemented")
    return None


async def test_a_server_without_sync_collection_is_polled_by_ctag(
    caldav_server: NewCalendar, counted: Counted
) -> None:
    url = urlsplit(await caldav_server(counted.session))
    async with caldav_proxy(f"{url.scheme}://{url.netloc}", _no_sync_collection) as proxy:
        provider = CalDAVProvider(
            proxy + url.path, RADICALE_USER, RADICALE_PASSWORD, counted.session
        )
        ref = await provider.create(_spec("a", datetime(2027, 6, 14, 9, 0, tzinfo=CPH)))

        first = await provider.changes(None)
        assert (first.method, first.full, dict(first.changed)) == (
            "ctag",
            True,
            {ref.event_id: ref.etag},
        )
        del counted.requests[:]
        quiet = await provider.changes(first.state)
        assert counted.requests == ["PROPFIND"]
        assert (dict(quiet.changed), quiet.removed) == ({}, ())


def test_polls_keep_their_phase() -> None:
    due = datetime(2027, 1, 1, 12, 0, 7, tzinfo=UTC)
    assert next_due(due, due, 300) == due + timedelta(seconds=300)
    assert next_due(due, due + timedelta(seconds=1000), 300) == due + timedelta(seconds=1200)
    assert next_due(due, due - timedelta(seconds=10), 300) == due + timedelta(seconds=300)


def test_polls_of_many_calendars_spread_over_the_interval() -> None:
    offsets = [poll_offset_s("t", f"u{n}", f"https://dav.example/{n}/", 300) for n in range(1000)]
    assert all(0 <= offset < 300 for offset in offsets)
    per_tenth = [sum(1 for o in offsets if k * 30 <= o < (k + 1) * 30) for k in range(10)]
    assert min(per_tenth) > 60 and max(per_tenth) < 140  # about 100 each
    assert poll_offset_s("t", "u1", "https://dav.example/1/", 300) == offsets[1]


async def test_one_poll_per_due_calendar_and_none_for_users_who_left(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'polls.db'}")
    await db.migrate()
    tenant, _ = await create_tenant(db, "acme")
    async with db.session() as s, s.begin():
        for n in range(3):
            s.add(
                User(
                    tenant_id=tenant.id,
                    id=f"u{n}",
                    timezone="Europe/Copenhagen",
                    calendar_provider="caldav",
                    calendar_config={"url": f"http://127.0.0.1:9/u{n}/", "username": "x"},
                )
            )
    now = datetime(2027, 1, 1, 12, 0, tzinfo=UTC)
    interval_s = 300.0

    assert await enqueue_polls(db, interval_s, now) == 0  # rows made, first polls spread
    async with db.session() as s:
        subs = (await s.execute(select(Subscription))).scalars().all()
    dues = sorted(sub.expires_at.replace(tzinfo=UTC) for sub in subs)
    assert len(dues) == 3 and all(now <= due < now + timedelta(seconds=300) for due in dues)

    later = now + timedelta(seconds=interval_s)
    assert await enqueue_polls(db, interval_s, later) == 3
    assert await enqueue_polls(db, interval_s, later + timedelta(seconds=interval_s)) == 0
    async with db.session() as s, s.begin():
        ops = (await s.execute(select(Operation))).scalars().all()
        assert sorted(op.mailbox for op in ops) == [
            f"caldav:http://127.0.0.1:9/u{n}/" for n in range(3)
        ]
        await s.execute(update(Operation).values(state="done"))
        await s.execute(update(User).where(User.id == "u0").values(calendar_provider="none"))
    assert await enqueue_polls(db, interval_s, later + 2 * timedelta(seconds=interval_s)) == 2
    async with db.session() as s:
        left = (await s.execute(select(Subscription.user_id))).scalars().all()
    assert sorted(left) == ["u1", "u2"]

    # A poll that gave up is not queued again until the user's connection changes.
    u1 = "caldav:http://127.0.0.1:9/u1/"
    async with db.session() as s, s.begin():
        await s.execute(update(Operation).values(state="done"))
        await s.execute(update(Operation).where(Operation.mailbox == u1).values(state="dead"))
    at = later + 3 * timedelta(seconds=interval_s)
    assert await enqueue_polls(db, interval_s, at) == 1
    async with db.session() as s, s.begin():
        await s.execute(update(Operation).where(Operation.state == "pending").values(state="done"))
        await s.execute(
            update(User).where(User.id == "u1").values(updated_at=utcnow() + timedelta(seconds=1))
        )
    assert await enqueue_polls(db, interval_s, at + timedelta(seconds=interval_s)) == 2
    await db.aclose()


# --- The service, end to end ---


@pytest_asyncio.fixture
async def service(
    tmp_path: Path,
) -> AsyncIterator[tuple[TestClient[Any, Any], Database, dict[str, str], Settings]]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'sync.db'}",
        secret_key="k" * 40,
        caldav_poll_minutes=QUIET_POLL_MINUTES,
    )
    db = Database(settings.database_url)
    await db.migrate()
    _, key = await create_tenant(db, "acme")
    stop = asyncio.Event()
    worker = asyncio.create_task(run_workers(settings, db, stop))
    async with TestClient(TestServer(build_app(settings, db))) as client:
        yield client, db, {"Authorization": f"Bearer {key}"}, settings
    stop.set()
    await worker
    await db.aclose()


async def _wait_for(what: Callable[[], Awaitable[bool]], message: str) -> None:
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while not await what():
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.1)


async def _poll_through_the_worker(db: Database) -> None:
    """Makes every CalDAV calendar's poll due, queues them, and waits until the worker ran
    them all."""
    await enqueue_polls(db, QUIET_POLL_MINUTES * 60)
    async with db.session() as s, s.begin():
        await s.execute(
            update(Subscription)
            .where(Subscription.provider == "caldav")
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    await enqueue_polls(db, QUIET_POLL_MINUTES * 60)

    async def finished() -> bool:
        async with db.session() as s:
            states = (
                (
                    await s.execute(
                        select(Operation.state).where(Operation.kind == OpKind.CALDAV_POLL)
                    )
                )
                .scalars()
                .all()
            )
        return bool(states) and all(state in ("done", "dead") for state in states)

    await _wait_for(finished, "the polls did not finish")
    async with db.session() as s:
        states = (
            (await s.execute(select(Operation.state).where(Operation.kind == OpKind.CALDAV_POLL)))
            .scalars()
            .all()
        )
    assert set(states) == {"done"}


@pytest.mark.timeout(180)
async def test_one_poll_brings_the_users_move_delete_and_day_off_back(
    service: tuple[TestClient[Any, Any], Database, dict[str, str], Settings],
    caldav_server: NewCalendar,
    counted: Counted,
) -> None:
    client, db, headers, settings = service
    http = counted.session
    url = await caldav_server(http)
    answer = await client.put(
        "/v1/users/u0",
        headers=headers,
        json={
            "name": "User 0",
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
    body = {
        "targetgroup_name": "Breweries",
        "targets": [{"id": f"t{i}", "name": f"Brewery {i}"} for i in range(4)],
        "template": {"kind": "meeting", "subject": "Visit $account-name$"},
        "schedule": {"start_date": "2027-06-07", "duration": "01:00", "interval": "00:15"},
        "assignment": {"mode": "users", "users": ["u0"]},
    }
    answer = await client.post("/v1/batches", headers=headers, json=body)
    assert answer.status == 201, await answer.text()
    batch = (await answer.json())["id"]

    async def synced() -> bool:
        got = await (await client.get(f"/v1/batches/{batch}", headers=headers)).json()
        return bool(got["state"] == "synced")

    await _wait_for(synced, "the batch did not sync")
    async with db.session() as s:
        ledger = (await s.execute(select(ExternalEvent).order_by(ExternalEvent.id))).scalars()
        rows = [(row.activity_id, str(row.event_id)) for row in ledger]
    (early_id, early_name), (moved_id, moved_name), (gone_id, gone_name), (kept_id, kept_name) = (
        rows
    )
    # Deleted before the first poll: the full listing misses it, which is a deletion too.
    await _delete(http, url + early_name)

    # The first poll lists the calendar as it is: our own writes are no user's edits.
    await _poll_through_the_worker(db)
    async with db.session() as s:
        edited = (await s.execute(select(Activity.id).where(Activity.user_edited))).all()
        assert [activity_id for (activity_id,) in edited] == [early_id]
        early = await s.get(Activity, early_id)
        assert early is not None and early.status == "cancelled"

    etag, raw = await _raw(http, url + moved_name)
    moved_start = datetime(2027, 6, 9, 13, 0, tzinfo=UTC)
    await _put(http, url + moved_name, _moved(raw, moved_start, "Moved by me"), etag)
    await _delete(http, url + gone_name)
    vacation = datetime.now(CPH).date() + timedelta(days=30)
    await _put(http, url + "vacation.ics", _day_off("vacation-1", vacation), None)

    await _poll_through_the_worker(db)

    async with db.session() as s:
        moved = await s.get(Activity, moved_id)
        gone = await s.get(Activity, gone_id)
        kept = await s.get(Activity, kept_id)
        user = (await s.execute(select(User).where(User.id == "u0"))).scalar_one()
        callbacks = (
            (await s.execute(select(Operation).where(Operation.kind == OpKind.CALLBACK)))
            .scalars()
            .all()
        )
    assert moved is not None and gone is not None and kept is not None
    assert (moved.user_edited, moved.subject, moved.start) == (True, "Moved by me", moved_start)
    assert moved.end == moved_start + timedelta(hours=1)
    assert (gone.user_edited, gone.status) == (True, "cancelled")
    assert not kept.user_edited
    by_activity = {op.payload["activity_id"]: op.payload for op in callbacks}
    assert sorted(by_activity) == sorted([early_id, moved_id, gone_id]) and len(callbacks) == 3
    assert by_activity[moved_id]["type"] == "activity.changed"
    assert by_activity[moved_id]["changes"]["subject"]["to"] == "Moved by me"
    assert by_activity[gone_id]["type"] == "activity.deleted"
    assert by_activity[early_id]["type"] == "activity.deleted"
    assert vacation.isoformat() in user.provider_days_off

    # Nothing changed since: the poll costs one request and reports nothing.
    async with db.session() as s:
        sub = (
            await s.execute(select(Subscription).where(Subscription.provider == "caldav"))
        ).scalar_one()
    provider = CalDAVProvider(url, RADICALE_USER, RADICALE_PASSWORD, http)

    async def providers(_: User) -> CalDAVProvider:
        return provider

    del counted.requests[:]
    op = Operation(
        tenant_id=sub.tenant_id,
        kind=OpKind.CALDAV_POLL,
        mailbox=f"caldav:{sub.calendar}",
        payload={"subscription_id": sub.id},
    )
    await caldav_poll(TaskContext(settings, db, providers), op)
    assert counted.requests == ["REPORT"]

    # A batch edit leaves the user's version alone; the poll after it sees only our writes.
    answer = await client.patch(
        f"/v1/batches/{batch}",
        headers=headers,
        json={"template": {"subject": "Tour $account-name$"}},
    )
    assert answer.status == 200, await answer.text()

    async def retitled() -> bool:
        _, raw = await _raw(http, url + kept_name)
        return b"SUMMARY:Tour Brewery" in raw

    await _wait_for(retitled, "the batch edit did not reach the calendar")
    await _wait_for(synced, "the batch did not sync after the edit")
    await _poll_through_the_worker(db)
    _, raw = await _raw(http, url + moved_name)
    assert b"SUMMARY:Moved by me" in raw
    async with db.session() as s:
        now_edited = (await s.execute(select(Activity.id).where(Activity.user_edited))).scalars()
        assert sorted(now_edited) == sorted([early_id, moved_id, gone_id])
        callbacks = (
            (await s.execute(select(Operation).where(Operation.kind == OpKind.CALLBACK)))
            .scalars()
            .all()
        )
    assert len(callbacks) == 3
