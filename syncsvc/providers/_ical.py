"""EventSpec ↔ RFC 5545 iCalendar, shared by the CalDAV provider and the iCal feed.

``build_event`` makes one VEVENT; ``new_calendar`` + ``add_timezones`` wrap any number of them
into a valid VCALENDAR (the feed puts many in one, CalDAV stores one per resource:
``render_resource``). ``parse_events`` reads back what recovery and change detection need.

Tasks (a due date, no slot) become an all-day, transparent VEVENT on the due date rather than
a VTODO: many CalDAV calendars only accept VEVENT (iCloud and Google keep tasks apart, and a
collection's ``supported-calendar-component-set`` is often VEVENT alone), iCal subscribers such
as Google and Outlook ignore VTODO, and a time-range query sees a VEVENT. TRANSPARENT keeps a
task from blocking the user's free time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from icalendar import Alarm, Calendar, Event, Todo, vCalAddress
from icalendar.enums import STATUS
from icalendar.error import IncompleteComponent

from syncsvc.providers.base import EventSpec

PRODID = "-//syncsvc//syncsvc calendar sync//EN"
BATCH_PROPERTY = "X-SYNCSVC-BATCH"
ACTIVITY_PROPERTY = "X-SYNCSVC-ACTIVITY"
#: Outlook's busy state property; "OOF" marks out-of-office time in iCal from Exchange/Outlook.
BUSY_STATUS_PROPERTY = "X-MICROSOFT-CDO-BUSYSTATUS"
UID_SUFFIX = "@syncsvc"
#: VTIMEZONE transitions are written for this many days either side of the events that use
#: them: enough for a client to move an event a year, small enough to keep resources short.
TIMEZONE_MARGIN_DAYS = 400
ALARM_DESCRIPTION = "Reminder"


class UnrenderableEvent(ValueError):
    """The spec cannot be written as iCalendar (no start and no due date, unknown zone)."""


def event_uid(key: str) -> str:
    """The stable UID of the event made for ``key``: the same on every render and provider."""
    return f"{key}{UID_SUFFIX}"


def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise UnrenderableEvent(f"unknown time zone {name!r}") from exc


def _local(moment: datetime, zone: tzinfo) -> datetime:
    """``moment`` as wall-clock time in ``zone``; naive values already are wall-clock time."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=zone)
    return moment.astimezone(zone)


def build_event(
    spec: EventSpec, *, now: datetime | None = None, last_modified: datetime | None = None
) -> Event:
    """One VEVENT for ``spec``; ``now`` becomes DTSTAMP (and LAST-MODIFIED unless given)."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC)
    zone = _zone(spec.timezone)
    event = Event.new(
        uid=event_uid(spec.key),
        stamp=stamp,
        last_modified=(last_modified or stamp).astimezone(UTC),
        sequence=spec.sequence,
        summary=spec.subject,
        status=STATUS.CANCELLED if spec.status == "cancelled" else STATUS.CONFIRMED,
    )
    if spec.start is not None:
        event.add("DTSTART", _local(spec.start, zone))
        if spec.end is not None:
            event.add("DTEND", _local(spec.end, zone))
        event.add("TRANSP", "OPAQUE")
    elif spec.due is not None:
        event.add("DTSTART", spec.due)
        event.add("DTEND", spec.due + timedelta(days=1))
        event.add("TRANSP", "TRANSPARENT")
    else:
        raise UnrenderableEvent(f"event {spec.key!r} has neither a start nor a due date")
    if spec.description:
        event.add("DESCRIPTION", spec.description)
    if spec.location:
        event.add("LOCATION", spec.location)
    for attendee in spec.attendees:
        address = vCalAddress.new(attendee.email, cn=attendee.name or None)
        # RFC 6638: the server must not e-mail invitations on our behalf; mass-created items
        # invite nobody unless the plan says so, and then not through the CalDAV server.
        address.params["SCHEDULE-AGENT"] = "CLIENT"
        event.add("ATTENDEE", address)
    if spec.batch_id is not None:
        event.add(BATCH_PROPERTY, spec.batch_id)
    event.add(ACTIVITY_PROPERTY, spec.activity_id)
    # A cancelled item keeps no alarm: a client would still ring for it.
    if spec.reminder_minutes is not None and spec.status != "cancelled":
        event.add_component(
            Alarm.new_display(ALARM_DESCRIPTION, trigger=timedelta(minutes=-spec.reminder_minutes))
        )
    return event


#: Activity status → VTODO STATUS (RFC 5545 §3.8.1.11).
TODO_STATUS = {"completed": "COMPLETED", "cancelled": "CANCELLED"}


def build_todo(
    spec: EventSpec, *, now: datetime | None = None, last_modified: datetime | None = None
) -> Todo:
    """One VTODO due on ``spec.due``, for the iCal feed (CalDAV keeps tasks as VEVENTs, above).

    The reminder is relative to DUE (``RELATED=END``): a VTODO without DTSTART must not have
    a start-relative trigger.
    """
    if spec.due is None:
        raise UnrenderableEvent(f"task {spec.key!r} has no due date")
    stamp = (now or datetime.now(UTC)).astimezone(UTC)
    todo = Todo()
    todo.add("UID", event_uid(spec.key))
    todo.add("DTSTAMP", stamp)
    todo.add("LAST-MODIFIED", (last_modified or stamp).astimezone(UTC))
    todo.add("SEQUENCE", spec.sequence)
    todo.add("SUMMARY", spec.subject)
    todo.add("DUE", spec.due)
    todo.add("STATUS", TODO_STATUS.get(spec.status, "NEEDS-ACTION"))
    if spec.description:
        todo.add("DESCRIPTION", spec.description)
    if spec.location:
        todo.add("LOCATION", spec.location)
    if spec.batch_id is not None:
        todo.add(BATCH_PROPERTY, spec.batch_id)
    todo.add(ACTIVITY_PROPERTY, spec.activity_id)
    if spec.reminder_minutes is not None and spec.status != "cancelled":
        alarm = Alarm.new_display(
            ALARM_DESCRIPTION, trigger=timedelta(minutes=-spec.reminder_minutes)
        )
        alarm["TRIGGER"].params["RELATED"] = "END"
        todo.add_component(alarm)
    return todo


def new_calendar(events: Iterable[Event] = ()) -> Calendar:
    """A VCALENDAR with PRODID and VERSION, no METHOD (RFC 4791 forbids it in stored resources)."""
    calendar = Calendar()
    calendar.add("PRODID", PRODID)
    calendar.add("VERSION", "2.0")
    for event in events:
        calendar.add_component(event)
    return calendar


def add_timezones(calendar: Calendar) -> None:
    """Add a VTIMEZONE for every TZID the calendar's events use, from the zoneinfo database."""
    days = [
        value.dt.date()
        for event in calendar.events
        for name in ("DTSTART", "DTEND")
        if (value := event.get(name)) is not None
        and isinstance(value.dt, datetime)
        and value.dt.tzinfo is not None
    ]
    if not days:
        return
    margin = timedelta(days=TIMEZONE_MARGIN_DAYS)
    calendar.add_missing_timezones(first_date=min(days) - margin, last_date=max(days) + margin)
    # icalendar notes the covered years in a COMMENT, which RFC 5545 §3.6.5 does not allow
    # in a VTIMEZONE (libical flags it); the zone rules themselves are complete.
    for timezone in calendar.timezones:
        timezone.pop("COMMENT", None)


def render_resource(spec: EventSpec, *, now: datetime | None = None) -> bytes:
    """The whole CalDAV resource for ``spec``: one VCALENDAR, one VEVENT, its VTIMEZONEs."""
    calendar = new_calendar([build_event(spec, now=now)])
    add_timezones(calendar)
    ical: bytes = calendar.to_ical()
    return ical


@dataclass(frozen=True, slots=True)
class ParsedEvent:
    """What syncsvc reads back from one VEVENT (ours or the user's own).

    ``start``/``end`` are ``date`` for all-day items, ``datetime`` otherwise (naive if the
    event is floating); ``end`` follows DTEND, else DURATION, else RFC 5545's defaults.
    """

    uid: str
    summary: str
    start: datetime | date | None
    end: datetime | date | None
    #: Upper-case STATUS (CONFIRMED, TENTATIVE, CANCELLED), None when absent.
    status: str | None
    batch_id: str | None
    activity_id: str | None
    #: TRANSP:TRANSPARENT; absent means OPAQUE (RFC 5545 §3.8.2.7).
    transparent: bool = False
    #: Upper-case X-MICROSOFT-CDO-BUSYSTATUS (FREE, BUSY, TENTATIVE, OOF), None when absent.
    busy_status: str | None = None
    #: Minutes before the start of the first relative VALARM, None when there is none.
    reminder_minutes: int | None = None
    #: Set on an overridden or server-expanded occurrence of a recurring event.
    recurrence_id: datetime | date | None = None

    @property
    def all_day(self) -> bool:
        return isinstance(self.start, date) and not isinstance(self.start, datetime)

    @property
    def cancelled(self) -> bool:
        return self.status == "CANCELLED"


def _text(event: Event, name: str) -> str | None:
    value = event.get(name)
    return None if value is None else str(value)


def _reminder_minutes(event: Event) -> int | None:
    for alarm in event.walk("VALARM"):
        trigger = alarm.get("TRIGGER")
        if trigger is not None and isinstance(trigger.dt, timedelta):
            return int(-trigger.dt.total_seconds() // 60)
    return None


def _parse_event(event: Event) -> ParsedEvent:
    try:
        start: datetime | date | None = event.start
    except IncompleteComponent:
        start = None
    try:
        end: datetime | date | None = event.end
    except IncompleteComponent:
        end = None
    status = _text(event, "STATUS")
    busy_status = _text(event, BUSY_STATUS_PROPERTY)
    recurrence_id = event.get("RECURRENCE-ID")
    return ParsedEvent(
        uid=_text(event, "UID") or "",
        summary=_text(event, "SUMMARY") or "",
        start=start,
        end=end,
        status=status.upper() if status else None,
        batch_id=_text(event, BATCH_PROPERTY),
        activity_id=_text(event, ACTIVITY_PROPERTY),
        transparent=(_text(event, "TRANSP") or "OPAQUE").upper() == "TRANSPARENT",
        busy_status=busy_status.upper() if busy_status else None,
        reminder_minutes=_reminder_minutes(event),
        recurrence_id=None if recurrence_id is None else recurrence_id.dt,
    )


def parse_events(body: bytes | str) -> list[ParsedEvent]:
    """Every VEVENT in an iCalendar body: the master, its overrides, expanded occurrences."""
    try:
        calendar = Calendar.from_ical(body)
    except ValueError as exc:
        raise ValueError(f"not an iCalendar body: {exc}") from exc
    return [_parse_event(event) for event in calendar.events]


def parse_event(body: bytes | str) -> ParsedEvent:
    """The master VEVENT of one resource (the one without RECURRENCE-ID, else the first)."""
    events = parse_events(body)
    if not events:
        raise ValueError("no VEVENT in the iCalendar body")
    return next((event for event in events if event.recurrence_id is None), events[0])
