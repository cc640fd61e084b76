"""Contract backend: ``CalDAVProvider`` against a real Radicale, a fresh collection per test
(``backend_xandikos.py`` runs the same harness against Xandikos).

The harness reads the server with its own PROPFIND + GET and the ``icalendar`` package, not
through the adapter or ``syncsvc.providers._ical``, so the suite checks what is really stored.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from urllib.parse import quote, unquote, urljoin

import aiohttp
import icalendar
import pytest

from syncsvc.providers.caldav import CalDAVProvider
from tests.contract.harness import ServerEvent
from tests.servers.radicale import RADICALE_PASSWORD, RADICALE_USER, new_calendar

__all__ = ["harness_caldav"]

_PROPFIND_BODY = (
    b'<?xml version="1.0" encoding="utf-8"?>'
    b'<D:propfind xmlns:D="DAV:"><D:prop><D:getetag/></D:prop></D:propfind>'
)


def _instant(value: date | datetime | None) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@dataclass
class CalDAVHarness:
    provider: CalDAVProvider
    session: aiohttp.ClientSession
    calendar_url: str

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": aiohttp.encode_basic_auth(RADICALE_USER, RADICALE_PASSWORD)}

    async def resource_names(self) -> list[str]:
        """The names of every resource in the collection, by PROPFIND Depth 1."""
        headers = {**self._auth, "Depth": "1", "Content-Type": "application/xml"}
        async with self.session.request(
            "PROPFIND", self.calendar_url, data=_PROPFIND_BODY, headers=headers
        ) as response:
            assert response.status == 207, await response.text()
            root = ET.fromstring(await response.read())
        hrefs = [element.text or "" for element in root.iter("{DAV:}href")]
        return [unquote(href.rsplit("/", 1)[-1]) for href in hrefs if not href.endswith("/")]

    async def resource(self, name: str) -> icalendar.Calendar:
        return icalendar.Calendar.from_ical(await self.raw(name))

    async def server_events(self) -> list[ServerEvent]:
        events = []
        for name in await self.resource_names():
            for event in (await self.resource(name)).events:
                start = event.get("DTSTART").dt
                end = event.get("DTEND").dt if "DTEND" in event else None
                batch = event.get("X-SYNCSVC-BATCH")
                events.append(
                    ServerEvent(
                        event_id=name,
                        subject=str(event.get("SUMMARY", "")),
                        start=_instant(start),
                        end=_instant(end),
                        status=str(event.get("STATUS", "CONFIRMED")).lower(),
                        batch_id=None if batch is None else str(batch),
                    )
                )
        return events

    async def server_reminder_minutes(self, event_id: str) -> int | None:
        for alarm in (await self.resource(event_id)).walk("VALARM"):
            trigger = alarm.get("TRIGGER").dt
            assert isinstance(trigger, timedelta)
            return int(-trigger.total_seconds() // 60)
        return None

    async def add_foreign_event(
        self, subject: str, start: datetime, end: datetime, *, all_day_off: bool = False
    ) -> None:
        """A hand-written resource, as Thunderbird or Apple Calendar would store it."""
        uid = str(uuid.uuid4())
        if all_day_off:
            last = max(end.date(), start.date() + timedelta(days=1))
            times = (
                f"DTSTART;VALUE=DATE:{start:%Y%m%d}\r\nDTEND;VALUE=DATE:{last:%Y%m%d}\r\n"
                "TRANSP:OPAQUE\r\nX-MICROSOFT-CDO-BUSYSTATUS:OOF\r\n"
            )
        else:
            utc_start, utc_end = start.astimezone(UTC), end.astimezone(UTC)
            times = f"DTSTART:{utc_start:%Y%m%dT%H%M%SZ}\r\nDTEND:{utc_end:%Y%m%dT%H%M%SZ}\r\n"
        body = (
            "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Test//Hand made//EN\r\n"
            f"BEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20260101T000000Z\r\n{times}"
            f"SUMMARY:{subject}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
        )
        await self.put_raw(f"{uid}.ics", body.encode())

    async def put_raw(self, name: str, body: bytes) -> int:
        """PUT ``body`` as a new resource ``name`` (another client's write); returns the status."""
        headers = {**self._auth, "Content-Type": "text/calendar", "If-None-Match": "*"}
        url = urljoin(self.calendar_url, quote(name, safe=""))
        async with self.session.put(url, data=body, headers=headers) as response:
            return response.status

    async def raw(self, name: str) -> bytes:
        """The resource's bytes exactly as the server stores them."""
        url = urljoin(self.calendar_url, quote(name, safe=""))
        async with self.session.get(url, headers=self._auth) as response:
            assert response.status == 200, name
            return await response.read()


#: Makes a fresh, empty collection on a server (its base URL) and returns the collection's URL.
NewCalendar = Callable[[aiohttp.ClientSession, str], Awaitable[str]]


@asynccontextmanager
async def open_caldav_harness(
    base_url: str, new: NewCalendar = new_calendar
) -> AsyncIterator[CalDAVHarness]:
    """A harness on a fresh collection, with its own session, closed on exit."""
    async with aiohttp.ClientSession() as session:
        calendar_url = await new(session, base_url)
        provider = CalDAVProvider(calendar_url, RADICALE_USER, RADICALE_PASSWORD, session)
        try:
            yield CalDAVHarness(provider=provider, session=session, calendar_url=calendar_url)
        finally:
            await provider.aclose()


@pytest.fixture
async def harness_caldav(radicale_url: str) -> AsyncIterator[CalDAVHarness]:
    async with open_caldav_harness(radicale_url) as harness:
        yield harness
