"""Microsoft Graph (Exchange Online / Outlook) calendars, app-only.

One :class:`GraphClient` per app registration holds what every mailbox shares: the MSAL
confidential client (whose token cache makes one token serve all mailboxes) and one aiohttp
session. :class:`GraphProvider` is one mailbox's calendar behind the ``CalendarProvider``
Protocol. Rate limiting is the queue's job; this module only reports Graph's answers as
``syncsvc.errors`` provider errors (``Throttled`` carries Graph's ``Retry-After``).

Choices worth knowing:
- Creates send a ``transactionId`` derived from ``EventSpec.key``, so a retried create returns
  the first event instead of a duplicate; the key, activity id and batch id also travel as
  String extended properties, which is how ``find`` and ``find_batch`` search.
- A *cancelled* activity keeps its event, marked: Graph has no cancelled state an organizer
  can set (``isCancelled`` is read-only and ``/cancel`` deletes the organizer's copy), so the
  event turns *free*, loses its reminder, gets a "Cancelled: " subject and the extended
  property ``syncsvcStatus=cancelled``. It stays findable, so deleting the batch removes it.
- Tasks become all-day items on their due date shown as *free*, so a to-do does not make the
  whole day busy for ``getSchedule``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
import msal
import requests
from yarl import URL

from syncsvc.errors import (
    AuthFailed,
    ConsentRevoked,
    Permanent,
    ProviderError,
    ProviderNotFound,
    Throttled,
    Transient,
    Unreachable,
)
from syncsvc.providers._http import (
    ca_bundle_path,
    error_for_status,
    parse_retry_after,
    ssl_context,
)
from syncsvc.providers.base import (
    BatchResult,
    BusyInterval,
    EventRef,
    EventSpec,
    TimeOff,
)

GRAPH_API_URL_DEFAULT = "https://graph.microsoft.com/v1.0"
GRAPH_AUTHORITY_URL_DEFAULT = "https://login.microsoftonline.com"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
GRAPH_BATCH_MAX = 20
GRAPH_PAGE_SIZE = 100
GRAPH_REQUEST_TIMEOUT_S = 30.0
#: The coarsest availabilityView Graph allows: busy times come from ``scheduleItems``, so
#: the view is only overhead (60 days in 15-minute digits is 5,760 of them per mailbox).
GET_SCHEDULE_INTERVAL_MIN = 1440

#: Our own property set: the GUID never changes, or old events could no longer be found.
PROPERTY_SET_GUID = "{5f0b8d6e-3c1a-4e2b-9a7d-6b1c2e3f4a50}"
PROP_BATCH = f"String {PROPERTY_SET_GUID} Name syncsvcBatch"
PROP_ACTIVITY = f"String {PROPERTY_SET_GUID} Name syncsvcActivity"
PROP_KEY = f"String {PROPERTY_SET_GUID} Name syncsvcKey"
PROP_STATUS = f"String {PROPERTY_SET_GUID} Name syncsvcStatus"
CANCELLED_SUBJECT_PREFIX = "Cancelled: "
_TRANSACTION_NAMESPACE = uuid.UUID("0b6f1d52-8c4e-4f7a-b0a1-2d3e4f5a6b7c")

#: A day counts as off when an out-of-office window covers its core hours (local time):
#: whole days and all-day items do, and so does the usual "Mon 08:00 to Fri 17:00" absence.
OFF_DAY_CORE_FROM = dt.time(9)
OFF_DAY_CORE_TO = dt.time(16)
BUSY_STATUSES = frozenset({"busy", "oof", "tentative"})
_PREFER_UTC = 'outlook.timezone="UTC"'
#: Windows zone names Graph may answer with when it ignores our Prefer header.
_WINDOWS_ZONES = {
    "Coordinated Universal Time": "UTC",
    "GMT Standard Time": "Europe/London",
    "W. Europe Standard Time": "Europe/Berlin",
    "Romance Standard Time": "Europe/Paris",
    "Central Europe Standard Time": "Europe/Budapest",
    "Central European Standard Time": "Europe/Warsaw",
    "FLE Standard Time": "Europe/Helsinki",
    "Eastern Standard Time": "America/New_York",
    "Pacific Standard Time": "America/Los_Angeles",
}


def transaction_id(key: str) -> str:
    """The ``transactionId`` for an event key: stable across retries and restarts."""
    return f"syncsvc-{uuid.uuid5(_TRANSACTION_NAMESPACE, key)}"


@dataclass(frozen=True, slots=True)
class GraphAnswer:
    """One HTTP (or ``$batch`` item) answer; ``headers`` have lower-case names."""

    status: int
    headers: Mapping[str, str]
    body: Any


def error_for(answer: GraphAnswer, what: str) -> ProviderError:
    """Graph's answer as one of our provider errors, keeping Graph's error code in the text."""
    code, message = "", ""
    if isinstance(answer.body, dict) and isinstance(answer.body.get("error"), dict):
        code = str(answer.body["error"].get("code") or "")
        message = str(answer.body["error"].get("message") or "")
    text = f"{what}: HTTP {answer.status} {code}: {message}".rstrip(": ")
    retry_after_s = parse_retry_after(answer.headers.get("retry-after"))
    return error_for_status(answer.status, text, retry_after_s=retry_after_s)


class _TimeoutSession(requests.Session):
    """A requests session with a default timeout: MSAL sets none on a session it is given."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout_s)
        return super().request(*args, **kwargs)


def msal_app(
    client_id: str, client_secret: str, authority: str, ca_bundle: str | None, timeout_s: float
) -> msal.ConfidentialClientApplication:
    """MSAL's client for one authority (blocking: it reads the authority's metadata)."""
    http = _TimeoutSession(timeout_s)
    http.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise override verify
    http.verify = ca_bundle if ca_bundle is not None else True
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=client_secret,
        authority=authority,
        instance_discovery=False,
        http_client=http,
    )


@dataclass(slots=True)
class GraphClient:
    """One Entra ID app registration talking to one Graph endpoint, shared by all mailboxes.

    ``api_url`` and ``authority_url`` come from configuration (sovereign clouds change both);
    ``ca_bundle`` defaults to ``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE``.
    """

    tenant_id: str
    client_id: str
    client_secret: str = field(repr=False)
    api_url: str = GRAPH_API_URL_DEFAULT
    authority_url: str = GRAPH_AUTHORITY_URL_DEFAULT
    ca_bundle: str | None = field(default_factory=ca_bundle_path)
    timeout_s: float = GRAPH_REQUEST_TIMEOUT_S
    _app: msal.ConfidentialClientApplication | None = field(default=None, init=False, repr=False)
    _token_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)
    _last_token: str | None = field(default=None, init=False, repr=False)

    def mailbox(self, address: str, timezone: str = "UTC") -> GraphProvider:
        """The calendar of ``address``; ``timezone`` is the user's, for days off."""
        return GraphProvider(self, address, timezone)

    async def verified_domains(self) -> list[str]:
        """The directory's verified domain names (``GET /organization``), lower-cased: the
        mailboxes an app token of this directory may be used for."""
        answer = await self.send("GET", self.url("/organization", {"$select": "verifiedDomains"}))
        if answer.status != 200:
            raise error_for(answer, "GET /organization")
        domains = set()
        for org in (answer.body or {}).get("value") or []:
            for domain in org.get("verifiedDomains") or []:
                if isinstance(domain, dict) and isinstance(domain.get("name"), str):
                    domains.add(domain["name"].strip().lower())
        return sorted(domains)

    def _build_app(self) -> msal.ConfidentialClientApplication:
        return msal_app(
            self.client_id,
            self.client_secret,
            f"{self.authority_url.rstrip('/')}/{self.tenant_id}",
            self.ca_bundle,
            self.timeout_s,
        )

    def _acquire(self) -> dict[str, Any]:
        if self._app is None:
            try:
                self._app = self._build_app()
            except ValueError as exc:  # MSAL's word for an unknown tenant or a bad authority
                raise AuthFailed(f"graph authority refused: {exc}") from exc
        result: dict[str, Any] = self._app.acquire_token_for_client([GRAPH_SCOPE])
        return result

    async def token(self) -> str:
        """An app token; MSAL answers from its cache until the token nears expiry.

        MSAL blocks, so it runs in a thread; the lock keeps concurrent first calls from each
        fetching a token of their own.
        """
        async with self._token_lock:
            try:
                result = await asyncio.to_thread(self._acquire)
            except requests.RequestException as exc:
                raise Transient(f"token request failed: {type(exc).__name__}") from exc
            except ValueError as exc:
                raise Transient(f"token endpoint answered garbage: {exc}") from exc
            token = result.get("access_token")
            if isinstance(token, str):
                self._last_token = token
                return token
        error = str(result.get("error") or "no_token")
        description = str(result.get("error_description") or "").split("\n")[0][:300]
        if error in ("temporarily_unavailable", "server_error"):
            raise Transient(f"token request failed: {error}: {description}")
        if error == "unauthorized_client":  # AADSTS700016: the app is not in the directory
            # MSAL remembers a refused request for a minute; a new consent must not wait on it.
            self._app = None
            raise ConsentRevoked(f"token request refused: {error}: {description}")
        raise AuthFailed(f"token request refused: {error}: {description}")

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_context(self.ca_bundle)),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            )
        return self._session

    def url(self, path: str, params: Mapping[str, str] | None = None) -> str:
        """An absolute, encoded Graph URL (``$`` stays literal, as Graph's docs write it)."""
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in (params or {}).items())
        return f"{self.api_url.rstrip('/')}{path}" + (f"?{query}" if query else "")

    async def send(self, method: str, url: str, body: Any = None) -> GraphAnswer:
        """One Graph call with a current token; network trouble becomes ``Transient``.

        A ``401`` means Graph no longer takes the token MSAL has cached (revoked, or clocks
        disagree): the token is dropped and the call tried once more with a new one.
        """
        token = await self.token()
        answer = await self._send_once(method, url, body, token)
        if answer.status == 401:
            await self._forget_token(token)
            answer = await self._send_once(method, url, body, await self.token())
        return answer

    async def _forget_token(self, token: str) -> None:
        async with self._token_lock:
            if self._app is not None and token == self._last_token:
                self._last_token = None
                await asyncio.to_thread(self._drop_cached_token, self._app)

    def _drop_cached_token(self, app: msal.ConfidentialClientApplication) -> None:
        app.remove_tokens_for_client()

    async def _send_once(self, method: str, url: str, body: Any, token: str) -> GraphAnswer:
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "Prefer": _PREFER_UTC,
        }
        try:
            async with self._client_session().request(
                method, URL(url, encoded=True), json=body, headers=headers
            ) as response:
                raw = await response.read()
                answer_headers = {k.lower(): v for k, v in response.headers.items()}
                status = response.status
        except TimeoutError as exc:
            raise Unreachable(f"graph {method} timed out after {self.timeout_s} s") from exc
        except aiohttp.ClientConnectionError as exc:
            raise Unreachable(f"graph {method} failed: {type(exc).__name__}: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise Transient(f"graph {method} failed: {type(exc).__name__}: {exc}") from exc
        try:
            parsed = json.loads(raw) if raw.strip() else None
        except ValueError:
            parsed = None
        return GraphAnswer(status, answer_headers, parsed)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._app is not None:
            app, self._app = self._app, None
            await asyncio.to_thread(app.http_client.close)


class GraphProvider:
    """One mailbox's default calendar (``CalendarProvider``)."""

    batch_max = GRAPH_BATCH_MAX

    def __init__(
        self, client: GraphClient, mailbox: str, timezone: str = "UTC", *, owns_client: bool = False
    ) -> None:
        self.client = client
        self.mailbox = mailbox
        self.timezone = timezone
        self._owns_client = owns_client
        self._user_path = f"/users/{quote(mailbox, safe='@.')}"

    # -- writes --------------------------------------------------------------------------------

    async def create(self, spec: EventSpec) -> EventRef:
        body = event_body(spec, self.timezone, with_transaction=True)
        sent_at = dt.datetime.now(dt.UTC)
        answer = await self.client.send(
            "POST", self.client.url(f"{self._user_path}/calendar/events"), body
        )
        ref = _ref_or_raise(answer, f"create {spec.key}")
        return await self.update(ref, spec) if _replayed(answer.body, sent_at) else ref

    async def update(self, ref: EventRef, spec: EventSpec) -> EventRef:
        """PATCHes the event; attendees only when they differ from the event's.

        Exchange mails every attendee an update whenever the list is sent, even unchanged, so
        an edit of the subject of 1,000 meetings must not send it: one ``$select=attendees``
        read decides (only for specs with attendees).
        """
        body = event_body(spec, self.timezone, with_transaction=False)
        if "attendees" in body and await self._attendees_of(ref) == _attendee_keys(
            body["attendees"]
        ):
            del body["attendees"]
        answer = await self.client.send("PATCH", self._event_url(ref.event_id), body)
        return _ref_or_raise(answer, f"update {spec.key}")

    async def _attendees_of(self, ref: EventRef) -> frozenset[tuple[str, str]] | None:
        """The event's attendees as ``_attendee_keys``; ``None`` when it cannot be read (the
        PATCH then sends them, and meets the same error if there is one)."""
        url = self._event_url(ref.event_id) + "?$select=attendees"
        answer = await self.client.send("GET", url)
        if answer.status != 200 or not isinstance(answer.body, dict):
            return None
        return _attendee_keys(answer.body.get("attendees") or [])

    async def delete(self, ref: EventRef) -> None:
        answer = await self.client.send("DELETE", self._event_url(ref.event_id))
        if answer.status in (200, 204, 404):
            return
        raise error_for(answer, f"delete {ref.event_id}")

    async def create_many(self, specs: Sequence[EventSpec]) -> Sequence[BatchResult]:
        """``$batch`` in chunks of 20, one chunk at a time.

        Once Graph throttles an item (or the whole call fails) the rest are not sent: they get
        the same error, so nobody calls the mailbox again before its ``Retry-After`` is over.
        """
        results: list[BatchResult] = []
        stop: ProviderError | None = None
        for chunk in _chunks(specs, self.batch_max):
            if stop is None:
                chunk_results, stop = await self._create_chunk(chunk)
                results.extend(chunk_results)
            else:
                results.extend(BatchResult(s.key, error=_same_error(stop)) for s in chunk)
        return results

    async def _create_chunk(
        self, specs: Sequence[EventSpec]
    ) -> tuple[list[BatchResult], ProviderError | None]:
        items = []
        for index, spec in enumerate(specs):
            items.append(
                {
                    "id": str(index),
                    "method": "POST",
                    "url": f"{self._user_path}/calendar/events",
                    "headers": {"Content-Type": "application/json", "Prefer": _PREFER_UTC},
                    "body": event_body(spec, self.timezone, with_transaction=True),
                }
            )
        sent_at = dt.datetime.now(dt.UTC)
        try:
            answer = await self.client.send("POST", self.client.url("/$batch"), {"requests": items})
            if answer.status != 200 or not isinstance(answer.body, dict):
                raise error_for(answer, "batch create")
        except ProviderError as exc:
            return [BatchResult(s.key, error=_same_error(exc)) for s in specs], exc
        by_id = {
            str(r.get("id")): r for r in answer.body.get("responses") or [] if isinstance(r, dict)
        }
        results: list[BatchResult] = []
        throttled: Throttled | None = None
        for index, spec in enumerate(specs):
            item = by_id.get(str(index))
            if item is None:
                results.append(BatchResult(spec.key, error=Transient("batch item not answered")))
                continue
            headers = {str(k).lower(): str(v) for k, v in (item.get("headers") or {}).items()}
            sub = GraphAnswer(int(item.get("status") or 0), headers, item.get("body"))
            try:
                ref = _ref_or_raise(sub, f"create {spec.key}")
                if _replayed(sub.body, sent_at):
                    ref = await self.update(ref, spec)
                results.append(BatchResult(spec.key, ref=ref))
            except ProviderError as exc:
                results.append(BatchResult(spec.key, error=exc))
                if isinstance(exc, Throttled) and (
                    throttled is None or (exc.retry_after_s or 0) > (throttled.retry_after_s or 0)
                ):
                    throttled = exc
        return results, throttled

    # -- reads ---------------------------------------------------------------------------------

    async def find(self, key: str) -> EventRef | None:
        found = await self._by_property(PROP_KEY, key)
        return found[0] if found else None

    async def find_batch(self, batch_id: str) -> Sequence[EventRef]:
        return await self._by_property(PROP_BATCH, batch_id)

    async def _by_property(self, prop_id: str, value: str) -> list[EventRef]:
        escaped = value.replace("'", "''")
        params = {
            "$filter": f"singleValueExtendedProperties/Any(ep: ep/id eq '{prop_id}' "
            f"and ep/value eq '{escaped}')",
            "$select": "id,changeKey",
            "$top": str(GRAPH_PAGE_SIZE),
        }
        events = await self._all_pages(self.client.url(f"{self._user_path}/events", params))
        return [EventRef(str(e["id"]), e.get("changeKey")) for e in events]

    async def _all_pages(self, url: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        next_url: str | None = url
        while next_url is not None:
            answer = await self.client.send("GET", next_url)
            if answer.status != 200 or not isinstance(answer.body, dict):
                raise error_for(answer, f"list {self.mailbox}")
            items.extend(v for v in answer.body.get("value") or [] if isinstance(v, dict))
            link = answer.body.get("@odata.nextLink")
            next_url = link if isinstance(link, str) else None
        return items

    async def time_off(self, start: dt.date, end: dt.date) -> TimeOff:
        """Days in ``start..end`` (inclusive) covered by out-of-office events or a scheduled
        automatic reply, in the user's time zone."""
        zone = _zone(self.timezone)
        begin = dt.datetime.combine(start, dt.time(), zone)
        finish = dt.datetime.combine(end + dt.timedelta(days=1), dt.time(), zone)
        params = {
            "startDateTime": _utc_text(begin) + "Z",
            "endDateTime": _utc_text(finish) + "Z",
            "$select": "showAs,isAllDay,start,end",
            "$top": str(GRAPH_PAGE_SIZE),
        }
        events = await self._all_pages(self.client.url(f"{self._user_path}/calendarView", params))
        days: set[dt.date] = set()
        for event in events:
            if event.get("showAs") != "oof":
                continue
            first, last = _read_time(event.get("start")), _read_time(event.get("end"))
            if first is None or last is None:
                continue
            if event.get("isAllDay"):
                days.update(_date_range(first.date(), last.date()))
            else:
                days.update(_off_days(first, last, zone))
        answer = await self.client.send(
            "GET", self.client.url(f"{self._user_path}/mailboxSettings/automaticRepliesSetting")
        )
        if answer.status != 200 or not isinstance(answer.body, dict):
            raise error_for(answer, f"automatic replies of {self.mailbox}")
        if answer.body.get("status") == "scheduled":
            first = _read_time(answer.body.get("scheduledStartDateTime"))
            last = _read_time(answer.body.get("scheduledEndDateTime"))
            if first is not None and last is not None:
                days.update(_off_days(first, last, zone))
        return TimeOff(frozenset(d for d in days if start <= d <= end))

    async def busy(self, start: dt.datetime, end: dt.datetime) -> Sequence[BusyInterval]:
        body = {
            "schedules": [self.mailbox],
            "startTime": {"dateTime": _utc_text(start), "timeZone": "UTC"},
            "endTime": {"dateTime": _utc_text(end), "timeZone": "UTC"},
            "availabilityViewInterval": GET_SCHEDULE_INTERVAL_MIN,
        }
        answer = await self.client.send(
            "POST", self.client.url(f"{self._user_path}/calendar/getSchedule"), body
        )
        if answer.status != 200 or not isinstance(answer.body, dict):
            raise error_for(answer, f"getSchedule {self.mailbox}")
        intervals: list[BusyInterval] = []
        for info in answer.body.get("value") or []:
            if str(info.get("scheduleId", "")).lower() != self.mailbox.lower():
                continue
            if isinstance(info.get("error"), dict):
                code = info["error"].get("responseCode", "")
                raise ProviderNotFound(f"getSchedule {self.mailbox}: {code}")
            for item in info.get("scheduleItems") or []:
                first, last = _read_time(item.get("start")), _read_time(item.get("end"))
                if item.get("status") in BUSY_STATUSES and first and last:
                    intervals.append(BusyInterval(first, last))
        return sorted(intervals, key=lambda i: (i.start, i.end))

    async def aclose(self) -> None:
        """Closes the client only if it is this mailbox's own (a user's grant): a shared
        ``GraphClient`` is closed by its owner."""
        if self._owns_client:
            await self.client.aclose()

    def _event_url(self, event_id: str) -> str:
        return self.client.url(f"{self._user_path}/events/{quote(event_id, safe='')}")


# --- Mapping between EventSpec and Graph JSON -------------------------------------------------


def event_body(spec: EventSpec, fallback_zone: str, *, with_transaction: bool) -> dict[str, Any]:
    """The Graph event for ``spec`` (times in ``spec.timezone``, as the user sees them)."""
    zone_name = spec.timezone or fallback_zone
    zone = _zone(zone_name)
    cancelled = spec.status == "cancelled"
    reminder = spec.reminder_minutes is not None and not cancelled
    body: dict[str, Any] = {
        "subject": (CANCELLED_SUBJECT_PREFIX if cancelled else "") + spec.subject,
        "body": {"contentType": "text", "content": spec.description},
        "location": {"displayName": spec.location},
        "isReminderOn": reminder,
        "singleValueExtendedProperties": [
            {"id": PROP_KEY, "value": spec.key},
            {"id": PROP_ACTIVITY, "value": spec.activity_id},
            {"id": PROP_STATUS, "value": spec.status},
        ]
        + ([{"id": PROP_BATCH, "value": spec.batch_id}] if spec.batch_id else []),
    }
    if reminder and spec.reminder_minutes is not None:
        body["reminderMinutesBeforeStart"] = spec.reminder_minutes
    if spec.kind == "task" or spec.start is None:
        day = spec.due or (spec.start.astimezone(zone).date() if spec.start else None)
        if day is None:
            raise Permanent(f"{spec.key}: a task needs a due date or a start")
        body.update(
            isAllDay=True,
            showAs="free",
            start={"dateTime": f"{day.isoformat()}T00:00:00", "timeZone": zone_name},
            end={
                "dateTime": f"{(day + dt.timedelta(days=1)).isoformat()}T00:00:00",
                "timeZone": zone_name,
            },
        )
    else:
        end = spec.end or spec.start
        body.update(
            isAllDay=False,
            showAs="free" if cancelled else "busy",
            start={"dateTime": _local_text(spec.start, zone), "timeZone": zone_name},
            end={"dateTime": _local_text(end, zone), "timeZone": zone_name},
        )
    if spec.attendees:
        body["attendees"] = [
            {"emailAddress": {"address": a.email, "name": a.name}, "type": "required"}
            for a in spec.attendees
        ]
    if with_transaction:
        body["transactionId"] = transaction_id(spec.key)
    return body


def _attendee_keys(attendees: Sequence[Any]) -> frozenset[tuple[str, str]]:
    """Attendees by (lower-cased address, name): what a resend would change."""
    keys = set()
    for attendee in attendees:
        email = attendee.get("emailAddress") if isinstance(attendee, dict) else None
        if isinstance(email, dict):
            keys.add((str(email.get("address") or "").lower(), str(email.get("name") or "")))
    return frozenset(keys)


#: A create answered with an event made this long before we sent it is a ``transactionId``
#: replay: our earlier create got through before a crash. It shows the activity as it was
#: then, and edits since (whose operations this create stands in for) must land too.
REPLAY_AGE_S = 10.0
_FRACTION = re.compile(r"(\.\d{6})\d+")


def _replayed(body: object, sent_at: dt.datetime) -> bool:
    created = body.get("createdDateTime") if isinstance(body, dict) else None
    if not isinstance(created, str):
        return False
    try:
        when = dt.datetime.fromisoformat(_FRACTION.sub(r"\1", created.replace("Z", "+00:00")))
    except ValueError:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when < sent_at - dt.timedelta(seconds=REPLAY_AGE_S)


def _ref_or_raise(answer: GraphAnswer, what: str) -> EventRef:
    if answer.status in (200, 201) and isinstance(answer.body, dict) and "id" in answer.body:
        change_key = answer.body.get("changeKey")
        return EventRef(str(answer.body["id"]), str(change_key) if change_key else None)
    raise error_for(answer, what)


def _same_error(error: ProviderError) -> ProviderError:
    """A copy of ``error`` for items that were never sent because of it."""
    if isinstance(error, Throttled):
        return Throttled(f"not sent: {error.message}", error.retry_after_s)
    copied = type(error)(f"not sent: {error.message}")
    copied.__cause__ = error
    return copied


def _chunks(items: Sequence[EventSpec], size: int) -> Iterator[Sequence[EventSpec]]:
    for offset in range(0, len(items), size):
        yield items[offset : offset + size]


def _zone(name: str) -> dt.tzinfo:
    target = _WINDOWS_ZONES.get(name, name)
    if target == "UTC":
        return dt.UTC
    try:
        return ZoneInfo(target)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise Permanent(f"unknown time zone {name!r}") from exc


def _local_text(moment: dt.datetime, zone: dt.tzinfo) -> str:
    local = moment.astimezone(zone) if moment.tzinfo else moment
    return local.replace(tzinfo=None).isoformat(timespec="seconds")


def _utc_text(moment: dt.datetime) -> str:
    aware = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return aware.astimezone(dt.UTC).replace(tzinfo=None).isoformat(timespec="seconds")


def _read_time(value: Any) -> dt.datetime | None:
    """Graph's ``{"dateTime": "2027-06-16T07:00:00.0000000", "timeZone": "UTC"}`` → aware."""
    if not isinstance(value, dict) or not isinstance(value.get("dateTime"), str):
        return None
    text = value["dateTime"]
    head, dot, fraction = text.partition(".")
    try:
        parsed = dt.datetime.fromisoformat(head + (dot + fraction[:6] if dot else ""))
        zone = _zone(str(value.get("timeZone") or "UTC"))
    except (ValueError, Permanent):
        return None
    return parsed.astimezone(zone) if parsed.tzinfo else parsed.replace(tzinfo=zone)


def _date_range(first: dt.date, end_exclusive: dt.date) -> Iterator[dt.date]:
    day = first
    while day < end_exclusive:
        yield day
        day += dt.timedelta(days=1)


def _off_days(start: dt.datetime, end: dt.datetime, zone: dt.tzinfo) -> set[dt.date]:
    """Local days whose core hours lie inside ``[start, end)``."""
    first, last = start.astimezone(zone).date(), end.astimezone(zone).date()
    days = set()
    for day in _date_range(first, last + dt.timedelta(days=1)):
        core_from = dt.datetime.combine(day, OFF_DAY_CORE_FROM, zone)
        core_to = dt.datetime.combine(day, OFF_DAY_CORE_TO, zone)
        if start <= core_from and end >= core_to:
            days.add(day)
    return days
