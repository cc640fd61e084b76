"""CalDAV (RFC 4791) calendar provider over aiohttp: a handful of raw WebDAV verbs.

No ``caldav`` client library: its 3.x line pulls ``urllib3-future``, which replaces ``urllib3``
for the whole process (testing.md), and we need only PUT, GET, DELETE and REPORT.

One event is one resource ``{collection}{name}.ics`` where ``name`` comes from the spec's key,
so a create is idempotent: ``PUT`` with ``If-None-Match: *`` answers 412 when our earlier
create already happened, and we return that resource. Updates are conditional on the etag.
``EventRef.event_id`` is the resource name (``<name>.ics``) inside the collection.

Days off (``time_off``): an event counts when it is not cancelled, not ours, and either carries
``X-MICROSOFT-CDO-BUSYSTATUS:OOF`` (Outlook's out-of-office, any length) or is an all-day event
that blocks time (TRANSP OPAQUE, the RFC 5545 default). All-day events a client marks "free"
(birthdays, reminders) are TRANSPARENT and do not count. Busy time (``busy``) is every timed,
opaque, not cancelled event; all-day blocks are reported as days off instead. Recurring events
are expanded by the server (``CALDAV:expand``); floating times are read as UTC.

Change detection (``changes``, ``fetch``): a ``sync-collection`` REPORT (RFC 6578) asks for
etags only, since Xandikos answers ``calendar-data`` there with 404; changed resources are then
read with one ``calendar-multiget``. Servers without it are polled by ``getctag`` plus a
depth-1 ``getetag`` listing. Either way an unchanged calendar costs one request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import NoReturn
from urllib.parse import quote, unquote, urljoin, urlsplit
from xml.sax.saxutils import escape

import aiohttp
from multidict import CIMultiDict

from syncsvc.errors import (
    Permanent,
    ProviderConflict,
    ProviderError,
    ProviderNotFound,
    SyncTokenExpired,
    Transient,
    Unreachable,
)
from syncsvc.providers._adaptive import AdaptiveGate
from syncsvc.providers._http import error_for_status, parse_retry_after
from syncsvc.providers._ical import (
    BATCH_PROPERTY,
    ParsedEvent,
    UnrenderableEvent,
    event_uid,
    parse_events,
    render_resource,
)
from syncsvc.providers.base import BatchResult, BusyInterval, EventRef, EventSpec, TimeOff
from syncsvc.providers.egress import REFUSED_FOR_TENANT, is_refusal, read_bounded

log = logging.getLogger("syncsvc.caldav")

CALDAV_BATCH_MAX = 1
#: Creates run concurrently in ``create_many``; CalDAV servers serialise writes per
#: collection (Radicale takes a write lock), so more buys little.
CALDAV_CREATE_CONCURRENCY = 4
#: The most writes (PUT, DELETE) in flight to one calendar; the worker's mailbox concurrency
#: is usually the tighter bound. A lock answer narrows it to one (``_adaptive.py``).
CALDAV_WRITES_MAX = 16
#: Times a write answered with a lock is sent again, alone, before it fails as ``Transient``.
CALDAV_LOCKED_RETRIES = 3
#: Redirects followed per request, on the URL's own origin only.
CALDAV_REDIRECTS_MAX = 5
_REDIRECTS = frozenset({301, 302, 307, 308})
CALDAV_TIMEOUT_S = 30.0
RESOURCE_SUFFIX = ".ics"
#: Keys made only of these characters name the resource as they are; others are hashed.
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")
_HASHED_PREFIX = "h~"

#: Resources per ``calendar-multiget`` when changed events are read.
CALDAV_MULTIGET_MAX = 100
#: Pages of one ``sync-collection`` answer the server cut short (507) before we stop asking.
SYNC_PAGES_MAX = 100

_DAV = "DAV:"
_CALDAV = "urn:ietf:params:xml:ns:caldav"
_CALSERVER = "http://calendarserver.org/ns/"
_XML_TYPE = {"Content-Type": "application/xml; charset=utf-8"}
_XML_HEADERS = {**_XML_TYPE, "Depth": "1"}
#: Statuses of a ``sync-collection`` REPORT from a server that does not implement it.
_NO_SYNC_REPORT = frozenset({400, 403, 405, 415, 501})
_ICS_CONTENT_TYPE = "text/calendar; charset=utf-8"


def resource_name(key: str) -> str:
    """The resource name (``<name>.ics``) for a key: readable when safe, else a stable hash."""
    if _SAFE_KEY.fullmatch(key):
        return key + RESOURCE_SUFFIX
    return _HASHED_PREFIX + hashlib.sha256(key.encode()).hexdigest() + RESOURCE_SUFFIX


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    #: Where the answer came from, after redirects: relative hrefs in it resolve against this.
    url: str = ""

    @property
    def etag(self) -> str | None:
        return self.headers.get("ETag")


@dataclass(frozen=True, slots=True)
class _Resource:
    """One ``response`` of a multistatus: a calendar object with its etag and data."""

    name: str
    etag: str | None
    data: str


def _utc_stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _calendar_query(filter_xml: str, *, expand: tuple[datetime, datetime] | None = None) -> bytes:
    data = "<C:calendar-data/>"
    if expand is not None:
        start, end = (_utc_stamp(moment) for moment in expand)
        data = f'<C:calendar-data><C:expand start="{start}" end="{end}"/></C:calendar-data>'
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        f'<C:calendar-query xmlns:D="{_DAV}" xmlns:C="{_CALDAV}">'
        f"<D:prop><D:getetag/>{data}</D:prop>"
        '<C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT">'
        f"{filter_xml}</C:comp-filter></C:comp-filter></C:filter></C:calendar-query>"
    ).encode()


def _parse_multistatus(body: bytes) -> list[_Resource]:
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise Permanent(f"CalDAV server sent malformed XML: {exc}") from exc
    resources = []
    for response in root.iter(f"{{{_DAV}}}response"):
        href = response.findtext(f"{{{_DAV}}}href") or ""
        for propstat in response.iter(f"{{{_DAV}}}propstat"):
            if " 200 " not in (propstat.findtext(f"{{{_DAV}}}status") or "") + " ":
                continue
            data = propstat.findtext(f".//{{{_CALDAV}}}calendar-data")
            if not data:
                continue
            name = unquote(urlsplit(href).path.rstrip("/").rsplit("/", 1)[-1])
            etag = propstat.findtext(f".//{{{_DAV}}}getetag")
            resources.append(_Resource(name=name, etag=etag, data=data))
    return resources


@dataclass(frozen=True, slots=True)
class CollectionChanges:
    """What changed in a collection since the last look (``CalDAVProvider.changes``).

    ``changed`` maps resource names to their new etags; ``removed`` names resources gone.
    ``state`` is opaque: store it and pass it to the next ``changes`` call. ``full`` means
    every resource is listed (a first look, or the old state was forgotten by the server).
    """

    changed: Mapping[str, str | None]
    removed: tuple[str, ...]
    state: str
    full: bool
    #: ``sync-collection`` (RFC 6578) or ``ctag`` (getctag + a depth-1 getetag listing).
    method: str


@dataclass(frozen=True, slots=True)
class CalendarObject:
    """One resource read back by ``CalDAVProvider.fetch``: its etag and its events."""

    name: str
    etag: str | None
    events: tuple[ParsedEvent, ...]


def _listing(body: bytes, collection_path: str) -> tuple[dict[str, str | None], list[str], str]:
    """Members (name → etag), removed names and the sync-token of a multistatus listing
    (``sync-collection`` or ``PROPFIND Depth: 1``); the collection itself is left out."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise Permanent(f"CalDAV server sent malformed XML: {exc}") from exc
    members: dict[str, str | None] = {}
    removed: list[str] = []
    for response in root.iter(f"{{{_DAV}}}response"):
        path = urlsplit(response.findtext(f"{{{_DAV}}}href") or "").path
        if not path or path.endswith("/") or path.rstrip("/") == collection_path.rstrip("/"):
            continue
        name = unquote(path.rsplit("/", 1)[-1])
        if " 404 " in (response.findtext(f"{{{_DAV}}}status") or "") + " ":
            removed.append(name)
            continue
        for propstat in response.iter(f"{{{_DAV}}}propstat"):
            if " 200 " in (propstat.findtext(f"{{{_DAV}}}status") or "") + " ":
                members[name] = propstat.findtext(f".//{{{_DAV}}}getetag")
    return members, removed, root.findtext(f"{{{_DAV}}}sync-token") or ""


def _truncated(body: bytes, collection_path: str) -> bool:
    """A ``sync-collection`` answer cut short: the collection's own response says 507."""
    root = ET.fromstring(body)
    for response in root.iter(f"{{{_DAV}}}response"):
        path = urlsplit(response.findtext(f"{{{_DAV}}}href") or "").path
        status = response.findtext(f"{{{_DAV}}}status") or ""
        if path.rstrip("/") == collection_path.rstrip("/") and " 507 " in status + " ":
            return True
    return False


def _sync_collection_query(token: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        f'<D:sync-collection xmlns:D="{_DAV}"><D:sync-token>{escape(token)}</D:sync-token>'
        "<D:sync-level>1</D:sync-level><D:prop><D:getetag/></D:prop></D:sync-collection>"
    ).encode()


def _propfind(prop_xml: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        f'<D:propfind xmlns:D="{_DAV}" xmlns:C="{_CALDAV}" xmlns:CS="{_CALSERVER}">'
        f"<D:prop>{prop_xml}</D:prop>"
        "</D:propfind>"
    ).encode()


class NoCalendarFound(Permanent):
    """Discovery found no calendar for events from the URL given; ``tried`` says where it
    looked and what each step answered."""

    code = "no_calendar_found"

    def __init__(self, start: str, tried: Sequence[str]) -> None:
        super().__init__(f"no CalDAV calendar for events found from {start}: {'; '.join(tried)}")
        self.tried = tuple(tried)


@dataclass(frozen=True, slots=True)
class _Collection:
    """What discovery reads of one WebDAV resource (RFC 4791 §6.2.1, RFC 5397)."""

    url: str
    name: str
    calendar: bool
    #: Takes VEVENT: listed in supported-calendar-component-set, or the set is absent (all).
    events: bool
    principal: str | None
    home: str | None


_DISCOVERY_PROPS = _propfind(
    "<D:resourcetype/><D:displayname/><D:current-user-principal/><C:calendar-home-set/>"
    "<C:supported-calendar-component-set/>"
)


def _collections(response: _Response) -> list[_Collection]:
    """The resources of a discovery PROPFIND, their hrefs made absolute."""
    try:
        root = ET.fromstring(response.body)
    except ET.ParseError as exc:
        raise Permanent(f"CalDAV server sent malformed XML: {exc}") from exc
    found = []
    for item in root.iter(f"{{{_DAV}}}response"):
        prop = ET.Element("prop")
        for propstat in item.iter(f"{{{_DAV}}}propstat"):
            if " 200 " in (propstat.findtext(f"{{{_DAV}}}status") or "") + " ":
                for child in propstat.iterfind(f"{{{_DAV}}}prop"):
                    prop.extend(child)
        kinds = prop.find(f"{{{_DAV}}}resourcetype")
        components = prop.find(f"{{{_CALDAV}}}supported-calendar-component-set")
        principal = prop.findtext(f"{{{_DAV}}}current-user-principal/{{{_DAV}}}href")
        home = prop.findtext(f"{{{_CALDAV}}}calendar-home-set/{{{_DAV}}}href")
        url = urljoin(response.url, (item.findtext(f"{{{_DAV}}}href") or "").strip())
        found.append(
            _Collection(
                url=url,
                name=(prop.findtext(f"{{{_DAV}}}displayname") or "").strip(),
                calendar=kinds is not None and kinds.find(f"{{{_CALDAV}}}calendar") is not None,
                events=components is None
                or any(c.get("name", "").upper() == "VEVENT" for c in components),
                principal=urljoin(response.url, principal.strip()) if principal else None,
                home=urljoin(response.url, home.strip()) if home else None,
            )
        )
    return found


def _same_path(a: str, b: str) -> bool:
    return urlsplit(a).path.rstrip("/") == urlsplit(b).path.rstrip("/")


def _default_calendar(calendars: Sequence[_Collection]) -> _Collection:
    """The one named ``default`` (by its last path segment or display name), else the first by
    href: servers list in no fixed order, and the choice must not change between looks."""
    ordered = sorted(calendars, key=lambda c: c.url)
    for calendar in ordered:
        segment = unquote(urlsplit(calendar.url).path.rstrip("/").rsplit("/", 1)[-1])
        if "default" in (segment.lower(), calendar.name.lower()):
            return calendar
    return ordered[0]


def _multiget(hrefs: Sequence[str]) -> bytes:
    listed = "".join(f"<D:href>{escape(href)}</D:href>" for href in hrefs)
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        f'<C:calendar-multiget xmlns:D="{_DAV}" xmlns:C="{_CALDAV}">'
        f"<D:prop><D:getetag/><C:calendar-data/></D:prop>{listed}</C:calendar-multiget>"
    ).encode()


def _dates_touched(start: datetime | date, end: datetime | date | None) -> list[date]:
    """The calendar days an event covers; its end is exclusive (a DATE or a midnight)."""
    if isinstance(start, datetime):
        first = start.date()
        if isinstance(end, datetime) and end > start:
            last = (end - timedelta(microseconds=1)).date()
        else:
            last = first
    else:
        first = start
        last = start
        if isinstance(end, date) and not isinstance(end, datetime) and end > start:
            last = end - timedelta(days=1)
    return [first + timedelta(days=offset) for offset in range((last - first).days + 1)]


def _parse_or_skip(data: bytes | str) -> list[ParsedEvent]:
    """Events of one resource; a resource we cannot read (another client's) counts as none."""
    try:
        return parse_events(data)
    except ValueError:
        return []


def _is_day_off(event: ParsedEvent) -> bool:
    if event.cancelled or event.activity_id is not None or event.start is None:
        return False
    return event.busy_status == "OOF" or (event.all_day and not event.transparent)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def _is_lock(response: _Response) -> bool:
    """The server refused because the collection is locked: 423, or a 409 naming a lock."""
    return response.status == 423 or (response.status == 409 and b"lock" in response.body.lower())


def touches_days_off(event: ParsedEvent) -> bool:
    """Whether a change of this event (not ours) may change the user's days off: it is, or
    was until cancelled, an out-of-office or all-day blocking event."""
    return event.activity_id is None and (
        event.busy_status == "OOF" or (event.all_day and not event.transparent)
    )


class CalDAVProvider:
    """One calendar collection on a CalDAV server, as a ``CalendarProvider``.

    The ``aiohttp.ClientSession`` belongs to the caller, who closes it; ``aclose`` leaves it be.
    """

    batch_max = CALDAV_BATCH_MAX

    def __init__(
        self,
        calendar_url: str,
        username: str,
        password: str,
        session: aiohttp.ClientSession,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = CALDAV_TIMEOUT_S,
        create_concurrency: int = CALDAV_CREATE_CONCURRENCY,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._url = calendar_url if calendar_url.endswith("/") else calendar_url + "/"
        self._authorization = aiohttp.encode_basic_auth(username, password)
        self._session = session
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._create_concurrency = create_concurrency
        self._writes = AdaptiveGate(CALDAV_WRITES_MAX)
        self._clock = clock

    # --- HTTP ---

    def _resource_url(self, name: str) -> str:
        return self._url + quote(name, safe="")

    async def _send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> _Response:
        """One request, following redirects on its own origin with the same method and body
        (servers move collection URLs, e.g. one without its trailing slash); a redirect to
        another origin is refused, since the credentials must not follow it there."""
        for _ in range(CALDAV_REDIRECTS_MAX + 1):
            response = await self._send_once(method, url, headers=headers, body=body)
            location = response.headers.get("Location")
            if response.status not in _REDIRECTS or not location:
                return response
            target = urljoin(url, location)
            if _origin(target) != _origin(url):
                raise Permanent(
                    f"CalDAV {method} {url} was redirected to another origin ({target}), "
                    "which is not followed; configure that URL instead"
                )
            url = target
        raise Permanent(f"CalDAV {method}: more than {CALDAV_REDIRECTS_MAX} redirects, to {url}")

    async def _send_once(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> _Response:
        """One request; network failures become provider errors, statuses are left to callers."""
        try:
            async with self._session.request(
                method,
                url,
                data=body,
                headers={"Authorization": self._authorization, **(headers or {})},
                ssl=self._ssl,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                content = await read_bounded(response)
                return _Response(response.status, CIMultiDict(response.headers), content, url)
        except aiohttp.InvalidURL as exc:
            raise Permanent(f"CalDAV {method}: invalid URL {url!r}") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise Permanent(f"CalDAV {method}: TLS certificate rejected") from exc
        except TimeoutError as exc:
            raise Unreachable(f"CalDAV {method} timed out") from exc
        except aiohttp.ClientError as exc:
            if is_refusal(exc):
                log.warning("event=egress.refused what=caldav detail=%s", exc)
                raise Permanent(f"CalDAV {method}: {REFUSED_FOR_TENANT}") from exc
            if isinstance(exc, aiohttp.ClientConnectionError):
                raise Unreachable(f"CalDAV {method} failed: {exc}") from exc
            raise Transient(f"CalDAV {method} failed: {exc}") from exc

    async def _write(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None = None
    ) -> _Response:
        """A PUT or DELETE through the calendar's adaptive window. A lock answer means our
        own writes overlap: the window closes to one and the write is sent again once it has
        the calendar to itself, so the lock costs the operation no attempt."""
        for _ in range(CALDAV_LOCKED_RETRIES + 1):
            async with self._writes.slot():  # the outcome is counted before the slot frees
                response = await self._send(method, url, headers=headers, body=body)
                locked = _is_lock(response)
                if locked:
                    self._writes.window.locked()
                else:
                    self._writes.window.succeeded()
            if not locked:
                return response
            log.info("event=caldav.locked method=%s calendar=%s", method, self._url)
        return response

    def _raise_for(self, method: str, response: _Response) -> NoReturn:
        """Map an unexpected status onto the provider error vocabulary."""
        status = response.status
        message = f"CalDAV {method} answered {status}"
        retry_after = parse_retry_after(
            response.headers.get("Retry-After"), now_s=self._clock().timestamp()
        )
        if 300 <= status < 400:
            location = response.headers.get("Location", "?")
            raise Permanent(f"{message}: redirected to {location}; configure that calendar URL")
        raise error_for_status(
            status, message, retry_after_s=retry_after, locked=_is_lock(response)
        )

    async def _get(self, name: str) -> tuple[EventRef, bytes] | None:
        response = await self._send("GET", self._resource_url(name))
        if response.status in (404, 410):
            return None
        if response.status != 200:
            self._raise_for("GET", response)
        return EventRef(event_id=name, etag=response.etag), response.body

    async def _put(self, name: str, spec: EventSpec, condition: Mapping[str, str]) -> _Response:
        try:
            body = render_resource(spec, now=self._clock())
        except UnrenderableEvent as exc:
            raise Permanent(f"event {spec.key!r} cannot be written: {exc}") from exc
        headers = {"Content-Type": _ICS_CONTENT_TYPE, **condition}
        return await self._write("PUT", self._resource_url(name), headers, body)

    async def _stored_ref(self, name: str, response: _Response) -> EventRef:
        """The ref after a successful PUT; servers that rewrote the data send no ETag (RFC 4791)."""
        if response.etag is not None:
            return EventRef(event_id=name, etag=response.etag)
        found = await self._get(name)
        if found is None:
            raise ProviderConflict(f"CalDAV resource {name!r} vanished right after PUT")
        return found[0]

    async def _report(self, query: bytes) -> list[_Resource]:
        response = await self._send("REPORT", self._url, headers=_XML_HEADERS, body=query)
        if response.status != 207:
            self._raise_for("REPORT", response)
        return _parse_multistatus(response.body)

    # --- Discovery ---

    async def discover(self) -> str:
        """The URL of the calendar to write to, found from the URL the user knows (their
        server's root, a principal, a calendar home, or the calendar itself): the URL, then
        ``/.well-known/caldav`` (RFC 6764), each followed through ``current-user-principal``
        to ``calendar-home-set`` (RFC 4791 §6.2.1) and the calendars for events in it.
        Raises ``NoCalendarFound`` listing what was tried, ``AuthFailed`` for refused
        credentials."""
        tried: list[str] = []
        for start in dict.fromkeys([self._url, urljoin(self._url, "/.well-known/caldav")]):
            steps: list[str] = []
            found = await self._discover_from(start, steps)
            if found is not None:
                return found
            tried.append(f"from {start}: {', '.join(steps) or 'nothing'}")
        raise NoCalendarFound(self._url, tried)

    async def _discover_from(self, url: str, tried: list[str]) -> str | None:
        here = await self._look(url, "0", tried)
        if not here:
            return None
        first = here[0]  # Depth 0: the resource itself
        if first.calendar:
            if first.events:
                return first.url
            tried.append(f"{first.url} is a calendar without events (VEVENT)")
            return None
        home = first.home
        if home is None and first.principal is not None:
            principal = await self._look(first.principal, "0", tried)
            home = principal[0].home if principal else None
        # Without a home set, the URL given may be the home itself.
        for candidate in dict.fromkeys([home or first.url, first.url]):
            listed = await self._look(candidate, "1", tried)
            calendars = [
                c for c in listed if c.calendar and c.events and not _same_path(c.url, candidate)
            ]
            if calendars:
                return _default_calendar(calendars).url
            tried.append(f"{candidate} holds no calendar for events")
        return None

    async def _look(self, url: str, depth: str, tried: list[str]) -> list[_Collection]:
        """One discovery PROPFIND; an answer that is not a listing is noted in ``tried``."""
        try:
            response = await self._send(
                "PROPFIND", url, headers={**_XML_TYPE, "Depth": depth}, body=_DISCOVERY_PROPS
            )
        except Permanent as exc:  # e.g. a redirect to another origin
            tried.append(str(exc))
            return []
        if response.status in (401, 403):
            self._raise_for("PROPFIND", response)
        if response.status != 207:
            tried.append(f"PROPFIND {url} answered {response.status}")
            return []
        return _collections(response)

    # --- Change detection ---

    async def changes(self, state: str | None) -> CollectionChanges:
        """What changed since ``state`` (``None``: list everything), at one request when
        nothing did.

        ``sync-collection`` (RFC 6578) where the server has it, else ``getctag`` with a
        depth-1 ``getetag`` listing compared to the one kept in ``state``. A sync-token the
        server no longer knows raises ``SyncTokenExpired``: call again with ``None``.
        """
        previous = json.loads(state) if state else None
        if previous is not None and "ctag" in previous:
            return await self.changes_by_ctag(previous)
        token = "" if previous is None else str(previous.get("sync_token", ""))
        found = await self._sync_collection(token)
        if found is None:
            return await self.changes_by_ctag(None)
        return found

    async def _sync_collection(self, token: str) -> CollectionChanges | None:
        """``None`` when the server has no ``sync-collection`` (asked with no token only)."""
        path = urlsplit(self._url).path
        changed: dict[str, str | None] = {}
        removed: list[str] = []
        start = token
        # RFC 6578 §3.2: the report is defined for Depth 0 only; sync-level says how deep.
        headers = {**_XML_TYPE, "Depth": "0"}
        for _ in range(SYNC_PAGES_MAX):
            query = _sync_collection_query(token)
            response = await self._send("REPORT", self._url, headers=headers, body=query)
            if response.status != 207:
                if b"valid-sync-token" in response.body:
                    raise SyncTokenExpired(f"CalDAV sync-token {token!r} is no longer valid")
                if not start and response.status in _NO_SYNC_REPORT:
                    return None
                self._raise_for("REPORT", response)
            members, gone, token = _listing(response.body, path)
            for name in gone:
                changed.pop(name, None)
            removed = [name for name in removed if name not in members] + gone
            changed.update(members)
            if not _truncated(response.body, path):
                break
        return CollectionChanges(
            changed=changed,
            removed=tuple(dict.fromkeys(removed)),
            state=json.dumps({"sync_token": token}),
            full=not start,
            method="sync-collection",
        )

    async def changes_by_ctag(self, previous: Mapping[str, object] | None) -> CollectionChanges:
        """The fallback for servers without ``sync-collection``: one ``PROPFIND`` of the
        collection's ``getctag`` and, when it moved, a depth-1 ``getetag`` listing compared
        to the previous one. A server with no ctag is listed every time (still one request)."""
        path = urlsplit(self._url).path
        old_etags = previous.get("etags") if previous else None
        old = dict(old_etags) if isinstance(old_etags, dict) else {}
        response = await self._send(
            "PROPFIND",
            self._url,
            headers={**_XML_TYPE, "Depth": "0"},
            body=_propfind("<CS:getctag/>"),
        )
        if response.status != 207:
            self._raise_for("PROPFIND", response)
        try:
            ctag = ET.fromstring(response.body).findtext(f".//{{{_CALSERVER}}}getctag")
        except ET.ParseError as exc:
            raise Permanent(f"CalDAV server sent malformed XML: {exc}") from exc
        if previous is not None and ctag and ctag == previous.get("ctag"):
            return CollectionChanges({}, (), json.dumps(previous), full=False, method="ctag")
        response = await self._send(
            "PROPFIND", self._url, headers=_XML_HEADERS, body=_propfind("<D:getetag/>")
        )
        if response.status != 207:
            self._raise_for("PROPFIND", response)
        members, _, _ = _listing(response.body, path)
        return CollectionChanges(
            changed={n: e for n, e in members.items() if n not in old or old[n] != e},
            removed=tuple(n for n in old if n not in members),
            state=json.dumps({"ctag": ctag, "etags": members}),
            full=previous is None,
            method="ctag",
        )

    async def fetch(self, names: Sequence[str]) -> list[CalendarObject]:
        """The named resources with their events (``calendar-multiget``); gone ones are left
        out, and one we cannot parse (another client's) has no events."""
        base = urlsplit(self._url).path
        found: list[CalendarObject] = []
        for start in range(0, len(names), CALDAV_MULTIGET_MAX):
            hrefs = [
                base + quote(name, safe="") for name in names[start : start + CALDAV_MULTIGET_MAX]
            ]
            found.extend(
                CalendarObject(r.name, r.etag, tuple(_parse_or_skip(r.data)))
                for r in await self._report(_multiget(hrefs))
            )
        return found

    # --- CalendarProvider ---

    async def create(self, spec: EventSpec) -> EventRef:
        name = resource_name(spec.key)
        response = await self._put(name, spec, {"If-None-Match": "*"})
        if response.status in (200, 201, 204):
            return await self._stored_ref(name, response)
        if response.status != 412:
            self._raise_for("PUT", response)
        # The name is taken: our earlier create happened (we crashed before recording it).
        found = await self._get(name)
        if found is None:
            raise ProviderConflict(
                f"CalDAV PUT of {name!r} answered 412 yet nothing is there: deleted meanwhile, "
                "or the server refused the body (Radicale: too large)"
            )
        ref, body = found
        if not any(event.uid == event_uid(spec.key) for event in _parse_or_skip(body)):
            raise ProviderConflict(f"CalDAV resource {name!r} holds another event")
        # It holds the activity as it was then; edits made since (whose operations this create
        # stands in for) must land too, so the adopted event is rewritten to the spec now.
        return await self.update(ref, spec)

    async def update(self, ref: EventRef, spec: EventSpec) -> EventRef:
        response = await self._put(ref.event_id, spec, {"If-Match": ref.etag or "*"})
        if response.status in (200, 201, 204):
            return await self._stored_ref(ref.event_id, response)
        if response.status == 412:
            # If-Match fails both when the event changed and when it is gone: tell them apart.
            if await self._get(ref.event_id) is None:
                raise ProviderNotFound(f"CalDAV resource {ref.event_id!r} is gone")
            raise ProviderConflict(f"CalDAV resource {ref.event_id!r} changed since {ref.etag}")
        self._raise_for("PUT", response)

    async def delete(self, ref: EventRef) -> None:
        response = await self._write("DELETE", self._resource_url(ref.event_id), {})
        if response.status in (200, 202, 204, 404, 410):
            return
        self._raise_for("DELETE", response)

    async def find(self, key: str) -> EventRef | None:
        found = await self._get(resource_name(key))
        return None if found is None else found[0]

    async def find_batch(self, batch_id: str) -> Sequence[EventRef]:
        # text-match is a substring match (RFC 4791 §9.7.5): the server narrows, we decide.
        match = (
            f'<C:prop-filter name="{BATCH_PROPERTY}">'
            f'<C:text-match collation="i;octet">{escape(batch_id)}</C:text-match></C:prop-filter>'
        )
        return [
            EventRef(event_id=resource.name, etag=resource.etag)
            for resource in await self._report(_calendar_query(match))
            if any(event.batch_id == batch_id for event in _parse_or_skip(resource.data))
        ]

    async def _events_between(self, start: datetime, end: datetime) -> list[ParsedEvent]:
        time_range = f'<C:time-range start="{_utc_stamp(start)}" end="{_utc_stamp(end)}"/>'
        query = _calendar_query(time_range, expand=(start, end))
        return [
            event
            for resource in await self._report(query)
            for event in _parse_or_skip(resource.data)
        ]

    async def time_off(self, start: date, end: date) -> TimeOff:
        """Days off between ``start`` and ``end``, both included (see the module docstring)."""
        # All-day events float: widen by a day either way so no zone loses one, then clip.
        window_start = datetime.combine(start - timedelta(days=1), time(), UTC)
        window_end = datetime.combine(end + timedelta(days=2), time(), UTC)
        days = {
            day
            for event in await self._events_between(window_start, window_end)
            if _is_day_off(event) and event.start is not None
            for day in _dates_touched(event.start, event.end)
            if start <= day <= end
        }
        return TimeOff(days=frozenset(days))

    async def busy(self, start: datetime, end: datetime) -> Sequence[BusyInterval]:
        intervals = {
            BusyInterval(_as_utc(event.start), _as_utc(event.end))
            for event in await self._events_between(start, end)
            if isinstance(event.start, datetime)
            and isinstance(event.end, datetime)
            and not event.cancelled
            and not event.transparent
            and event.busy_status != "FREE"
        }
        return sorted(intervals, key=lambda interval: (interval.start, interval.end))

    async def create_many(self, specs: Sequence[EventSpec]) -> Sequence[BatchResult]:
        """CalDAV has no batch request: creates run concurrently, a few at a time."""
        gate = asyncio.Semaphore(self._create_concurrency)

        async def one(spec: EventSpec) -> BatchResult:
            async with gate:
                try:
                    return BatchResult(key=spec.key, ref=await self.create(spec))
                except ProviderError as exc:
                    return BatchResult(key=spec.key, error=exc)

        return await asyncio.gather(*(one(spec) for spec in specs))

    async def aclose(self) -> None:
        """Nothing to release: the session is the caller's."""
