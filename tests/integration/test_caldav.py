"""What only CalDAV has: the stored resource itself, etags, UIDs, days off read from iCalendar.

Runs against the session's real Radicale (``tests/servers/radicale.py``); error mapping runs
against a small local aiohttp server that answers the statuses real servers send.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import icalendar
import pytest
from aiohttp import web

from syncsvc.errors import (
    AuthFailed,
    Permanent,
    ProviderConflict,
    ProviderError,
    ProviderNotFound,
    Throttled,
    Transient,
)
from syncsvc.providers._ical import parse_event, render_resource
from syncsvc.providers.base import BusyInterval, EventAttendee, EventRef, EventSpec
from syncsvc.providers.caldav import CalDAVProvider, resource_name
from tests.contract.backend_caldav import CalDAVHarness, open_caldav_harness
from tests.fakes._tls import make_self_signed

CPH = ZoneInfo("Europe/Copenhagen")
NOW = datetime(2027, 6, 1, 8, 0, tzinfo=UTC)


def make_spec(key: str, batch_id: str | None = "batch-1", **changes: object) -> EventSpec:
    spec = EventSpec(
        key=key,
        activity_id=f"activity-{key}",
        batch_id=batch_id,
        subject=f"Besøg {key}",
        start=datetime(2027, 6, 14, 9, 30, tzinfo=CPH),
        end=datetime(2027, 6, 14, 10, 15, tzinfo=CPH),
        timezone="Europe/Copenhagen",
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


def vcalendar(*lines: str) -> bytes:
    """A hand-written resource with one VEVENT, as another client would store it."""
    body = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//Test//Hand made//EN", "BEGIN:VEVENT"]
    body += ["DTSTAMP:20260101T000000Z", *lines, "END:VEVENT", "END:VCALENDAR", ""]
    return "\r\n".join(body).encode()


@pytest.fixture
async def caldav(radicale_url: str) -> AsyncIterator[CalDAVHarness]:
    async with open_caldav_harness(radicale_url) as harness:
        yield harness


# --- The stored resource ---


async def test_the_resource_is_one_valid_vevent_with_its_vtimezone(caldav: CalDAVHarness) -> None:
    spec = make_spec(
        "act-1",
        reminder_minutes=15,
        sequence=3,
        attendees=(EventAttendee("Åse Ørsted", "aase@example.dk"),),
        description="Medbring tilbud, 2 stk.; ring først",
        location="Torvet 3, Odense",
    )
    ref = await caldav.provider.create(spec)

    assert ref.event_id == "act-1.ics"
    raw = await caldav.raw(ref.event_id)
    assert b"METHOD" not in raw
    assert b"DTSTART;TZID=Europe/Copenhagen:20270614T093000" in raw
    calendar = icalendar.Calendar.from_ical(raw)
    assert [str(tz["TZID"]) for tz in calendar.walk("VTIMEZONE")] == ["Europe/Copenhagen"]
    [event] = calendar.events
    assert str(event["UID"]) == "act-1@syncsvc"
    assert event["SEQUENCE"] == 3
    assert str(event["STATUS"]) == "CONFIRMED"
    assert str(event["DESCRIPTION"]) == "Medbring tilbud, 2 stk.; ring først"
    assert str(event["LOCATION"]) == "Torvet 3, Odense"
    assert str(event["X-SYNCSVC-BATCH"]) == "batch-1"
    assert str(event["X-SYNCSVC-ACTIVITY"]) == "activity-act-1"
    assert event.start == datetime(2027, 6, 14, 7, 30, tzinfo=UTC)
    assert event.end == datetime(2027, 6, 14, 8, 15, tzinfo=UTC)
    attendee = event["ATTENDEE"]
    assert str(attendee) == "mailto:aase@example.dk"
    assert attendee.params["CN"] == "Åse Ørsted"
    [alarm] = event.walk("VALARM")
    assert str(alarm["ACTION"]) == "DISPLAY"
    assert alarm["TRIGGER"].dt == timedelta(minutes=-15)
    assert "DTSTAMP" in event
    assert "LAST-MODIFIED" in event


async def test_a_cancelled_event_stays_visible_as_cancelled(caldav: CalDAVHarness) -> None:
    spec = make_spec("act-1")
    ref = await caldav.provider.create(spec)

    await caldav.provider.update(ref, replace(spec, status="cancelled", sequence=1))

    [event] = icalendar.Calendar.from_ical(await caldav.raw(ref.event_id)).events
    assert (str(event["STATUS"]), event["SEQUENCE"]) == ("CANCELLED", 1)


async def test_a_task_is_an_all_day_transparent_event(caldav: CalDAVHarness) -> None:
    task = make_spec("task-1", start=None, end=None, due=date(2027, 6, 16), kind="task")
    ref = await caldav.provider.create(task)

    [event] = icalendar.Calendar.from_ical(await caldav.raw(ref.event_id)).events
    assert event.start == date(2027, 6, 16)
    assert event.end == date(2027, 6, 17)
    assert str(event["TRANSP"]) == "TRANSPARENT"


async def test_radicale_refuses_a_second_resource_with_our_uid(caldav: CalDAVHarness) -> None:
    spec = make_spec("act-1")
    await caldav.provider.create(spec)

    status = await caldav.put_raw("copy.ics", render_resource(spec))

    assert status == 409
    assert await caldav.resource_names() == ["act-1.ics"]


async def test_keys_unsafe_in_a_url_still_make_one_findable_event(caldav: CalDAVHarness) -> None:
    spec = make_spec("crm:42/ø x?y#z")
    ref = await caldav.provider.create(spec)

    assert ref.event_id == resource_name("crm:42/ø x?y#z")
    assert ref.event_id.startswith("h~") and ref.event_id.endswith(".ics")
    assert await caldav.provider.create(spec) == ref
    assert await caldav.provider.find(spec.key) == ref
    await caldav.provider.delete(ref)
    assert await caldav.resource_names() == []


# --- Etags and exactly-once ---


async def test_a_repeated_create_returns_the_current_etag(caldav: CalDAVHarness) -> None:
    spec = make_spec("act-1")
    created = await caldav.provider.create(spec)

    # The process crashed before recording ``created``: the retry finds the same resource
    # (and rewrites it to the activity as it is now, so its etag may move on: DTSTAMP).
    again = await caldav.provider.create(spec)

    assert again.event_id == created.event_id
    assert [event.subject for event in await caldav.server_events()] == ["Besøg act-1"]
    # ``again`` carries the current etag: an If-Match update with it is accepted.
    updated = await caldav.provider.update(again, replace(spec, subject="Flyttet", sequence=1))
    assert updated.etag not in (None, created.etag)


async def test_update_after_someone_else_changed_it_is_a_conflict(caldav: CalDAVHarness) -> None:
    spec = make_spec("act-1")
    stale = await caldav.provider.create(spec)
    await caldav.provider.update(stale, replace(spec, subject="Ændret af brugeren", sequence=1))

    with pytest.raises(ProviderConflict):
        await caldav.provider.update(stale, replace(spec, subject="Vores", sequence=2))

    assert [event.subject for event in await caldav.server_events()] == ["Ændret af brugeren"]


async def test_update_without_an_etag_overwrites_but_never_recreates(
    caldav: CalDAVHarness,
) -> None:
    spec = make_spec("act-1")
    ref = await caldav.provider.create(spec)

    await caldav.provider.update(EventRef(ref.event_id), replace(spec, subject="Ny", sequence=1))
    assert [event.subject for event in await caldav.server_events()] == ["Ny"]

    await caldav.provider.delete(ref)
    with pytest.raises(ProviderNotFound):
        await caldav.provider.update(EventRef(ref.event_id), spec)
    assert await caldav.server_events() == []


# --- Recovery by batch leaves the user's own events alone ---


async def test_deleting_a_found_batch_leaves_everything_else(caldav: CalDAVHarness) -> None:
    ours = [await caldav.provider.create(make_spec(f"act-{n}", "batch-1")) for n in range(3)]
    # "batch-10" contains "batch-1": the server's substring match must not fool us.
    other = await caldav.provider.create(make_spec("act-9", "batch-10"))
    assert (
        await caldav.put_raw(
            "user.ics",
            vcalendar(
                "UID:user-1",
                "DTSTART:20270614T100000Z",
                "DTEND:20270614T110000Z",
                "SUMMARY:batch-1 noter",
                "DESCRIPTION:X-SYNCSVC-BATCH:batch-1",
            ),
        )
        == 201
    )

    found = await caldav.provider.find_batch("batch-1")
    assert sorted(ref.event_id for ref in found) == sorted(ref.event_id for ref in ours)
    for ref in found:
        await caldav.provider.delete(ref)

    assert sorted(await caldav.resource_names()) == sorted([other.event_id, "user.ics"])


# --- Days off and busy time from the user's own events ---


async def test_time_off_follows_the_documented_rule(caldav: CalDAVHarness) -> None:
    resources = {
        # A two-day holiday running past the asked range: only the days inside count.
        "holiday.ics": ["UID:h", "DTSTART;VALUE=DATE:20270619", "DTEND;VALUE=DATE:20270622"],
        # A day off every Friday, made once: the server expands it.
        "fridays.ics": [
            "UID:f",
            "DTSTART;VALUE=DATE:20270604",
            "DTEND;VALUE=DATE:20270605",
            "RRULE:FREQ=WEEKLY;COUNT=3",
            "X-MICROSOFT-CDO-BUSYSTATUS:OOF",
        ],
        # Out of office for a working day, as Outlook writes it.
        "oof.ics": [
            "UID:o",
            "DTSTART;TZID=Europe/Copenhagen:20270608T080000",
            "DTEND;TZID=Europe/Copenhagen:20270608T170000",
            "X-MICROSOFT-CDO-BUSYSTATUS:OOF",
        ],
        # Not days off: a birthday marked free, a cancelled day off, a long meeting.
        "birthday.ics": [
            "UID:b",
            "DTSTART;VALUE=DATE:20270609",
            "DTEND;VALUE=DATE:20270610",
            "TRANSP:TRANSPARENT",
        ],
        "cancelled.ics": [
            "UID:c",
            "DTSTART;VALUE=DATE:20270615",
            "DTEND;VALUE=DATE:20270616",
            "STATUS:CANCELLED",
        ],
        "meeting.ics": ["UID:m", "DTSTART:20270616T060000Z", "DTEND:20270616T150000Z"],
    }
    for name, lines in resources.items():
        assert await caldav.put_raw(name, vcalendar(*lines, f"SUMMARY:{name}")) == 201

    time_off = await caldav.provider.time_off(date(2027, 6, 1), date(2027, 6, 20))

    assert sorted(time_off.days) == [
        date(2027, 6, 4),
        date(2027, 6, 8),
        date(2027, 6, 11),
        date(2027, 6, 18),
        date(2027, 6, 19),
        date(2027, 6, 20),
    ]


async def test_busy_is_opaque_timed_events_with_recurrences(caldav: CalDAVHarness) -> None:
    resources = {
        "weekly.ics": [
            "UID:w",
            # UTC: a TZID without its VTIMEZONE would be resolved from whatever definition
            # of that zone the server met first (Radicale caches them process-wide).
            "DTSTART:20270607T070000Z",
            "DTEND:20270607T073000Z",
            "RRULE:FREQ=WEEKLY;COUNT=4",
        ],
        "free.ics": [
            "UID:f",
            "DTSTART:20270608T120000Z",
            "DTEND:20270608T130000Z",
            "TRANSP:TRANSPARENT",
        ],
        "cancelled.ics": [
            "UID:c",
            "DTSTART:20270609T120000Z",
            "DTEND:20270609T130000Z",
            "STATUS:CANCELLED",
        ],
        "allday.ics": ["UID:a", "DTSTART;VALUE=DATE:20270610", "DTEND;VALUE=DATE:20270611"],
        "outside.ics": ["UID:o", "DTSTART:20270701T120000Z", "DTEND:20270701T130000Z"],
    }
    for name, lines in resources.items():
        assert await caldav.put_raw(name, vcalendar(*lines, f"SUMMARY:{name}")) == 201

    busy = await caldav.provider.busy(
        datetime(2027, 6, 7, tzinfo=UTC), datetime(2027, 6, 20, tzinfo=UTC)
    )

    assert busy == [
        BusyInterval(
            datetime(2027, 6, day, 7, 0, tzinfo=UTC), datetime(2027, 6, day, 7, 30, tzinfo=UTC)
        )
        for day in (7, 14)
    ]


async def test_create_many_reports_each_failure_in_its_place(caldav: CalDAVHarness) -> None:
    specs = [
        make_spec("act-0"),
        make_spec("act-1", start=None, end=None),  # neither a slot nor a due date
        make_spec("act-2"),
    ]

    results = await caldav.provider.create_many(specs)

    assert [result.key for result in results] == ["act-0", "act-1", "act-2"]
    assert [type(result.error) for result in results] == [type(None), Permanent, type(None)]
    assert sorted(await caldav.resource_names()) == ["act-0.ics", "act-2.ics"]


# --- Errors, against a server that answers what we tell it ---

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serving(
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[str, dict[str, Handler]]]:
    """A local HTTP(S) server; tests put a handler per resource name in the dict."""
    handlers: dict[str, Handler] = {}

    async def dispatch(request: web.Request) -> web.StreamResponse:
        return await handlers[request.match_info["name"]](request)

    app = web.Application()
    app.router.add_route("*", "/cal/{name}", dispatch)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}/cal/", handlers
    finally:
        await runner.cleanup()


@pytest.fixture
async def scripted_server() -> AsyncIterator[tuple[str, dict[str, Handler]]]:
    async with serving() as server:
        yield server


def answer(status: int, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(status=status, headers=headers)

    return handler


@pytest.mark.parametrize(
    ("status", "headers", "error", "retry_after"),
    [
        (401, {"WWW-Authenticate": 'Basic realm="x"'}, AuthFailed, None),
        (403, {}, AuthFailed, None),
        (409, {}, ProviderConflict, None),
        (429, {"Retry-After": "7"}, Throttled, 7.0),
        (429, {}, Throttled, None),
        (503, {"Retry-After": "Tue, 01 Jun 2027 08:02:00 GMT"}, Throttled, 120.0),
        (503, {}, Transient, None),
        (500, {}, Transient, None),
        (400, {}, Permanent, None),
        (415, {}, Permanent, None),
        (301, {"Location": "https://elsewhere/"}, Permanent, None),
    ],
)
async def test_http_statuses_become_provider_errors(
    scripted_server: tuple[str, dict[str, Handler]],
    status: int,
    headers: dict[str, str],
    error: type[ProviderError],
    retry_after: float | None,
) -> None:
    url, handlers = scripted_server
    handlers["act-1.ics"] = answer(status, headers)
    async with aiohttp.ClientSession() as session:
        provider = CalDAVProvider(url, "u", "p", session, clock=lambda: NOW)
        with pytest.raises(error) as raised:
            await provider.create(make_spec("act-1"))
    assert type(raised.value) is error
    assert getattr(raised.value, "retry_after_s", None) == retry_after


async def test_basic_auth_is_sent(scripted_server: tuple[str, dict[str, Handler]]) -> None:
    url, handlers = scripted_server
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization"))
        return web.Response(status=204)

    handlers["act-1.ics"] = handler
    async with aiohttp.ClientSession() as session:
        await CalDAVProvider(url, "anna", "hemlig", session).delete(EventRef("act-1.ics"))
    assert seen == ["Basic YW5uYTpoZW1saWc="]


async def test_a_slow_server_is_transient(scripted_server: tuple[str, dict[str, Handler]]) -> None:
    url, handlers = scripted_server

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        return web.Response(status=204)

    handlers["act-1.ics"] = slow
    async with aiohttp.ClientSession() as session:
        provider = CalDAVProvider(url, "u", "p", session, timeout_s=0.05)
        with pytest.raises(Transient) as raised:
            await provider.delete(EventRef("act-1.ics"))
    assert isinstance(raised.value.__cause__, TimeoutError)


async def test_tls_trusts_the_given_context_and_refuses_unknown_cas(tmp_path: Path) -> None:
    certificate = make_self_signed(tmp_path, "caldav")
    async with serving(certificate.server_context()) as (url, handlers):
        handlers["act-1.ics"] = answer(204)
        async with aiohttp.ClientSession() as session:
            trusting = ssl.create_default_context(cafile=str(certificate.cert_path))
            await CalDAVProvider(url, "u", "p", session, ssl_context=trusting).delete(
                EventRef("act-1.ics")
            )
            with pytest.raises(Permanent):
                await CalDAVProvider(url, "u", "p", session).delete(EventRef("act-1.ics"))


async def test_a_refused_connection_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with aiohttp.ClientSession() as session:
        provider = CalDAVProvider(f"http://127.0.0.1:{port}/cal/", "u", "p", session)
        with pytest.raises(Transient) as raised:
            await provider.find("act-1")
    assert isinstance(raised.value.__cause__, aiohttp.ClientError)


# --- The iCalendar module on its own ---


def test_rendering_reads_back_to_the_same_event() -> None:
    spec = make_spec("act-1", status="cancelled", reminder_minutes=30, sequence=2)

    event = parse_event(render_resource(spec, now=NOW))

    assert (event.uid, event.summary, event.status) == ("act-1@syncsvc", "Besøg act-1", "CANCELLED")
    assert (event.start, event.end) == (spec.start, spec.end)
    assert (event.batch_id, event.activity_id) == ("batch-1", "activity-act-1")
    assert event.reminder_minutes is None  # a cancelled item keeps no alarm to ring
    assert not event.transparent and not event.all_day
    planned = parse_event(render_resource(replace(spec, status="planned"), now=NOW))
    assert planned.reminder_minutes == 30


def test_parsing_takes_the_end_from_duration_and_defaults() -> None:
    with_duration = parse_event(vcalendar("UID:d", "DTSTART:20270614T090000Z", "DURATION:PT45M"))
    all_day = parse_event(vcalendar("UID:a", "DTSTART;VALUE=DATE:20270614"))

    assert with_duration.end == datetime(2027, 6, 14, 9, 45, tzinfo=UTC)
    assert (all_day.start, all_day.end, all_day.all_day) == (
        date(2027, 6, 14),
        date(2027, 6, 15),
        True,
    )
    assert all_day.status is None and all_day.batch_id is None
