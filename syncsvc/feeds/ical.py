"""One user's activities as one subscribable VCALENDAR (RFC 5545, RFC 7986 hints).

Each item is rendered by ``providers/_ical`` (the same VEVENT the CalDAV provider stores, same
UID) and the bytes of every component are cached by the item's full value: a feed of 5,000
activities in which one changed renders one component, not 5,000. The calendar's header and
VTIMEZONE are rendered by ``icalendar`` too; only the concatenation happens here. An item
``icalendar`` refuses (say an attendee address with CR/LF) is left out, not the feed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from icalendar import Calendar, Component, Timezone, vDuration

from syncsvc.providers._ical import add_timezones, build_event, build_todo, new_calendar
from syncsvc.providers.base import EventSpec

#: What RFC 7986 REFRESH-INTERVAL and X-PUBLISHED-TTL suggest to subscribers.
REFRESH_INTERVAL = timedelta(hours=1)
#: Rendered components kept in memory (a VEVENT is about 500 bytes: ~25 MB at most).
COMPONENT_CACHE_MAX = 50_000
CALSCALE = "GREGORIAN"
END_OF_CALENDAR = b"END:VCALENDAR\r\n"


@dataclass(frozen=True, slots=True)
class FeedItem:
    """An activity as the feed shows it; ``modified`` is its DTSTAMP and LAST-MODIFIED.

    DTSTAMP is the row's last change rather than the time of the request (RFC 5545 allows
    either without METHOD), so the same data always gives the same bytes and a strong ETag.
    """

    spec: EventSpec
    modified: datetime


@dataclass(frozen=True, slots=True)
class FeedCalendar:
    """The calendar-level properties: the name subscribers show, the user's zone, and the
    instants the feed covers, which its VTIMEZONE spans (not the items: an absurd end would
    ask for zone rules to year 9999)."""

    name: str
    timezone: str
    since: datetime
    until: datetime


@dataclass(frozen=True, slots=True)
class RenderedFeed:
    body: bytes
    #: Activity ids left out, each with what refused it.
    skipped: tuple[tuple[str, Exception], ...] = ()


def render_feed(
    calendar: FeedCalendar, items: Sequence[FeedItem], *, tasks_as_events: bool = False
) -> RenderedFeed:
    """The whole feed: header, VTIMEZONE of the user's zone, then one component per item.

    ``tasks_as_events``: tasks as all-day VEVENTs (Outlook and Google subscriptions drop
    VTODOs), the way the CalDAV provider stores them.
    """
    components: list[bytes] = []
    skipped: list[tuple[str, Exception]] = []
    timed = False
    for item in items:
        try:
            components.append(component_bytes(item, tasks_as_events))
        except Exception as exc:
            skipped.append((item.spec.activity_id, exc))
            continue
        timed = timed or item.spec.start is not None
    head: bytes = _header(calendar, timed).to_ical()
    if not head.endswith(END_OF_CALENDAR):
        raise ValueError("icalendar wrote an unexpected calendar ending")
    body = b"".join((head[: -len(END_OF_CALENDAR)], *components, END_OF_CALENDAR))
    return RenderedFeed(body, tuple(skipped))


@functools.lru_cache(maxsize=COMPONENT_CACHE_MAX)
def component_bytes(item: FeedItem, tasks_as_events: bool = False) -> bytes:
    """The VEVENT (meetings, calls; tasks too with ``tasks_as_events``) or VTODO (tasks with
    a due date) of one item."""
    spec = item.spec
    component: Component
    if spec.kind == "task" and spec.due is not None and not tasks_as_events:
        component = build_todo(spec, now=item.modified, last_modified=item.modified)
    else:
        component = build_event(spec, now=item.modified, last_modified=item.modified)
    ical: bytes = component.to_ical()
    return ical


def _header(calendar: FeedCalendar, timed: bool) -> Calendar:
    refresh = REFRESH_INTERVAL
    header = new_calendar()
    header.add("CALSCALE", CALSCALE)
    header.add("X-WR-CALNAME", calendar.name)
    header.add("X-WR-TIMEZONE", calendar.timezone)
    header.add("REFRESH-INTERVAL", refresh, parameters={"VALUE": "DURATION"})
    # An X- property has no default type: without vDuration it would be written as 1:00:00.
    header.add("X-PUBLISHED-TTL", vDuration(refresh))
    if timed:
        for timezone in _timezones_between(calendar.timezone, calendar.since, calendar.until):
            header.add_component(timezone)
    return header


@functools.lru_cache(maxsize=1024)
def _timezones_between(timezone: str, first: datetime, last: datetime) -> tuple[Timezone, ...]:
    """``add_timezones`` on a probe event spanning the feed: the zones and margins a CalDAV
    resource gets."""
    probe = EventSpec(
        key="probe",
        activity_id="probe",
        batch_id=None,
        subject="",
        start=first,
        end=last,
        timezone=timezone,
    )
    calendar = new_calendar([build_event(probe)])
    add_timezones(calendar)
    return tuple(calendar.timezones)
