"""Google Calendar (API v3) as a :class:`~syncsvc.providers.base.CalendarProvider`.

Built on the official blocking client (``google-api-python-client`` + ``google-auth``): every
call runs in a worker thread via ``asyncio.to_thread``. httplib2 objects are not thread-safe, so
each call borrows an ``AuthorizedHttp`` from a small per-provider pool and returns it after; the
pool keeps connections alive between calls without ever sharing one between threads.

Idempotency comes from Google's client-chosen event ids: the id is derived from
``EventSpec.key``, so a repeated create answers ``409 duplicate`` and we adopt the event that is
already there.

Beyond the Protocol, push and incremental sync: :meth:`GoogleProvider.watch` opens a push
channel (``events.watch``), :meth:`GoogleProvider.stop` closes one (``channels.stop``) and
:meth:`GoogleProvider.changes` lists what changed since a sync token (``events.list``), raising
:class:`SyncTokenExpired` when Google answers ``410`` so the caller lists everything again.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import certifi
import google_auth_httplib2  # type: ignore[import-untyped]
import httplib2
from google.auth import credentials as ga_credentials
from google.auth import exceptions as ga_exceptions
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError
from googleapiclient.http import BatchHttpRequest

from syncsvc.config import Settings
from syncsvc.errors import (
    AuthFailed,
    GrantRevoked,
    Permanent,
    ProviderConflict,
    ProviderError,
    ProviderNotFound,
    SyncTokenExpired,
    Throttled,
    Transient,
    Unreachable,
)
from syncsvc.providers._http import ca_bundle_path, error_for_status
from syncsvc.providers.base import (
    BatchResult,
    BusyInterval,
    EventRef,
    EventSpec,
    TimeOff,
)

T = TypeVar("T")

CALENDAR_SCOPE = "https://www.googleapis.com/auth/calendar"
#: Google's hard limit of calls in one batch request.
GOOGLE_BATCH_MAX = 1000
#: Calls we actually put in one batch. Every call still counts against the per-user quota
#: (600/min by default), so a 1,000-call batch would overrun a minute's quota in one round trip
#: and come back mostly as 403 rateLimitExceeded; Google also advises small batches because big
#: ones trip rate limiting. 50 saves 98% of the round trips and keeps a throttled batch cheap.
GOOGLE_BATCH_CHUNK = 50
GOOGLE_TIMEOUT_S = 30.0
#: Daily project quotas reset at midnight Pacific time.
DAILY_QUOTA_RESET_TZ = "America/Los_Angeles"
LIST_PAGE_SIZE = 2500
HTTP_POOL_MAX = 4
PROP_BATCH = "syncsvcBatch"
PROP_ACTIVITY = "syncsvcActivity"
RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
#: The statuses our delete treats as "already gone".
GONE_STATUSES = frozenset({404, 410})
CHANNEL_TYPE = "web_hook"


@dataclass(frozen=True, slots=True)
class WatchChannel:
    """A push channel as Google confirmed it; ``resource_id`` is needed to stop it."""

    channel_id: str
    resource_id: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ChangedEvent:
    """One event from an incremental (or full) list; ``cancelled`` means deleted.

    ``start``/``end`` are instants for timed events and ``None`` for all-day ones;
    ``activity_id`` is our private property, present on events syncsvc created.
    """

    event_id: str
    cancelled: bool
    etag: str | None
    event_type: str
    subject: str | None
    start: datetime | None
    end: datetime | None
    activity_id: str | None


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """What changed since a sync token (or, when ``full``, every event) and the next token."""

    events: tuple[ChangedEvent, ...]
    next_sync_token: str
    full: bool


def event_id_for(key: str) -> str:
    """The Google event id for ``key``: lowercase base32hex (a–v, 0–9) of its SHA-256, 52 chars.

    Hashing keeps any key inside Google's alphabet and 5–1024 length, and stable across retries.
    """
    digest = hashlib.sha256(key.encode()).digest()
    return base64.b32hexencode(digest).decode().rstrip("=").lower()


def service_account_credentials(
    info: Mapping[str, Any], subject: str, token_url: str
) -> service_account.Credentials:
    """Domain-wide delegation: the service account acts as ``subject`` (the user's address)."""
    merged = {**info, "token_uri": token_url}
    creds: service_account.Credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
        merged, scopes=[CALENDAR_SCOPE], subject=subject
    )
    return creds


def check_service_account_info(info: Mapping[str, Any]) -> str:
    """The key's ``client_email`` if it is a usable service-account key, else ``Permanent``."""
    if info.get("type") != "service_account" or not isinstance(info.get("client_email"), str):
        raise Permanent('not a service-account key (needs "type": "service_account")')
    try:
        service_account_credentials(info, "check@example.invalid", "https://invalid.invalid/")
    except (ValueError, KeyError, TypeError) as exc:
        raise Permanent(f"the service-account key cannot be used: {exc}") from exc
    return str(info["client_email"])


def user_oauth_credentials(
    refresh_token: str, client_id: str, client_secret: str, token_url: str
) -> user_credentials.Credentials:
    """A user's own OAuth grant; the first call refreshes it into an access token."""
    return user_credentials.Credentials(  # type: ignore[no-untyped-call]
        token=None,
        refresh_token=refresh_token,
        client_id=client_id,
        client_secret=client_secret,
        token_uri=token_url,
    )


def load_service_account_info(path: str | Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    return info


@dataclass(frozen=True, slots=True)
class GoogleOptions:
    """Where the API lives and how long to wait; the defaults are Google's real hosts."""

    api_url: str = "https://www.googleapis.com/calendar/v3/"
    timeout_s: float = GOOGLE_TIMEOUT_S
    batch_chunk: int = GOOGLE_BATCH_CHUNK
    ca_bundle: str | None = None
    daily_reset_tz: str = DAILY_QUOTA_RESET_TZ

    @classmethod
    def from_settings(cls, settings: Settings) -> GoogleOptions:
        return cls(api_url=settings.google_api_url, ca_bundle=ca_bundle_path())

    @property
    def batch_url(self) -> str:
        """``<scheme>://<host>/batch/calendar/v3``: the discovery document's ``batchPath``."""
        base = self.api_url.rstrip("/")
        host = base.removesuffix("/calendar/v3")
        return f"{host}/batch/calendar/v3"


class GoogleProvider:
    """One Google calendar, reached with either service-account delegation or user OAuth."""

    batch_max = GOOGLE_BATCH_MAX

    def __init__(
        self,
        credentials: ga_credentials.Credentials,
        calendar_id: str,
        options: GoogleOptions | None = None,
    ) -> None:
        self.calendar_id = calendar_id
        self._options = options or GoogleOptions()
        if not self._options.api_url.endswith("/calendar/v3/"):
            raise ValueError("the Google API URL must end in /calendar/v3/")
        self._credentials = credentials
        self._refresh_lock = threading.Lock()
        self._pool: queue.LifoQueue[google_auth_httplib2.AuthorizedHttp] = queue.LifoQueue()
        # The service only formats requests; each call executes on a pooled http of its own.
        self._service = build(
            "calendar",
            "v3",
            http=self._new_http(),
            static_discovery=True,
            cache_discovery=False,
            client_options={"api_endpoint": self._options.api_url},
        )

    @classmethod
    def with_service_account(
        cls,
        settings: Settings,
        user_email: str,
        *,
        calendar_id: str | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> GoogleProvider:
        """Delegated access to ``user_email``'s calendar (their primary one by default)."""
        if info is None:
            if settings.google_service_account_file is None:
                raise AuthFailed("no Google service account is configured")
            info = load_service_account_info(settings.google_service_account_file)
        creds = service_account_credentials(info, user_email, settings.google_token_url)
        return cls(creds, calendar_id or user_email, GoogleOptions.from_settings(settings))

    @classmethod
    def with_user_oauth(
        cls,
        settings: Settings,
        calendar_id: str,
        *,
        refresh_token: str,
        client_id: str,
        client_secret: str,
    ) -> GoogleProvider:
        creds = user_oauth_credentials(
            refresh_token, client_id, client_secret, settings.google_token_url
        )
        return cls(creds, calendar_id, GoogleOptions.from_settings(settings))

    # -- the CalendarProvider protocol -----------------------------------------------------

    async def create(self, spec: EventSpec) -> EventRef:
        return await self._run(lambda http: self._create_sync(http, spec))

    async def update(self, ref: EventRef, spec: EventSpec) -> EventRef:
        """Patches the event; a cancelled activity sets Google's ``cancelled`` status.

        Google has no visible "cancelled" state: ``cancelled`` removes the event from the
        calendar (as a delete does) while the server keeps it, so a later create with the same
        key can bring it back. Patching an event the user deleted succeeds at Google but leaves
        it deleted, so that answers ``ProviderNotFound`` rather than pretending it is there.
        """
        body = event_body(spec)
        body.pop("id")
        cancelling = spec.status == "cancelled"
        if cancelling:
            body["status"] = "cancelled"

        def call(http: google_auth_httplib2.AuthorizedHttp) -> EventRef:
            event = self._events().patch(
                calendarId=self.calendar_id, eventId=ref.event_id, body=body, sendUpdates="none"
            )
            result = event.execute(http=http)
            if result.get("status") == "cancelled" and not cancelling:
                raise ProviderNotFound(f"event {ref.event_id} was deleted in the calendar")
            return _ref(result)

        return await self._run(call)

    async def delete(self, ref: EventRef) -> None:
        def call(http: google_auth_httplib2.AuthorizedHttp) -> None:
            request = self._events().delete(
                calendarId=self.calendar_id, eventId=ref.event_id, sendUpdates="none"
            )
            try:
                request.execute(http=http)
            except HttpError as exc:
                if exc.resp.status not in GONE_STATUSES:
                    raise

        await self._run(call)

    async def find(self, key: str) -> EventRef | None:
        def call(http: google_auth_httplib2.AuthorizedHttp) -> EventRef | None:
            event = self._get_or_none(http, event_id_for(key))
            if event is None or event.get("status") == "cancelled":
                return None
            return _ref(event)

        return await self._run(call)

    async def find_batch(self, batch_id: str) -> Sequence[EventRef]:
        events = await self._run(
            lambda http: self._list_all(
                http, privateExtendedProperty=f"{PROP_BATCH}={batch_id}", showDeleted=False
            )
        )
        return [_ref(event) for event in events]

    async def time_off(self, start: date, end: date) -> TimeOff:
        """Days (``start``..``end`` inclusive) touched by an ``outOfOffice`` event.

        Each event's days are counted in its own time zone (``timeZone`` or its offset).
        """
        low = datetime.combine(start - timedelta(days=1), time(), UTC)
        high = datetime.combine(end + timedelta(days=2), time(), UTC)
        events = await self._run(
            lambda http: self._list_all(
                http,
                eventTypes="outOfOffice",
                timeMin=_rfc3339(low),
                timeMax=_rfc3339(high),
                singleEvents=True,
            )
        )
        days: set[date] = set()
        for event in events:
            days.update(d for d in _days_of(event) if start <= d <= end)
        return TimeOff(days=frozenset(days))

    async def busy(self, start: datetime, end: datetime) -> Sequence[BusyInterval]:
        body = {
            "timeMin": _rfc3339(start),
            "timeMax": _rfc3339(end),
            "items": [{"id": self.calendar_id}],
        }

        def call(http: google_auth_httplib2.AuthorizedHttp) -> dict[str, Any]:
            result: dict[str, Any] = self._service.freebusy().query(body=body).execute(http=http)
            return result

        answer = await self._run(call)
        calendar = answer.get("calendars", {}).get(self.calendar_id, {})
        if calendar.get("errors"):
            reason = calendar["errors"][0].get("reason", "unknown")
            raise (ProviderNotFound if reason == "notFound" else Permanent)(
                f"free/busy of {self.calendar_id} failed: {reason}"
            )
        return [
            BusyInterval(start=_parse_instant(b["start"]), end=_parse_instant(b["end"]))
            for b in calendar.get("busy", [])
        ]

    async def create_many(self, specs: Sequence[EventSpec]) -> Sequence[BatchResult]:
        """Batched creates, ``batch_chunk`` per round trip, one result per spec in order.

        After a chunk that was throttled or failed as a whole, the rest are not sent (they would
        only meet the same wall) and carry that chunk's error so the queue retries them later.
        """
        results: list[BatchResult] = []
        stop: ProviderError | None = None
        chunk_size = max(1, min(self._options.batch_chunk, GOOGLE_BATCH_MAX))
        for offset in range(0, len(specs), chunk_size):
            chunk = specs[offset : offset + chunk_size]
            if stop is not None:
                results.extend(BatchResult(key=s.key, error=stop) for s in chunk)
                continue
            try:
                answers = await self._run(functools.partial(self._create_chunk_sync, specs=chunk))
            except ProviderError as exc:
                stop = exc
                results.extend(BatchResult(key=s.key, error=exc) for s in chunk)
                continue
            results.extend(answers)
            throttled = [a.error for a in answers if isinstance(a.error, Throttled)]
            if throttled:
                stop = throttled[0]
        return results

    # -- push channels and incremental sync ------------------------------------------------

    async def watch(
        self, channel_id: str, address: str, token: str, expiration: datetime
    ) -> WatchChannel:
        """Opens a push channel on the calendar's events; Google may shorten ``expiration``."""
        body = {
            "id": channel_id,
            "type": CHANNEL_TYPE,
            "address": address,
            "token": token,
            "expiration": str(int(expiration.timestamp() * 1000)),
        }

        def call(http: google_auth_httplib2.AuthorizedHttp) -> dict[str, Any]:
            answer: dict[str, Any] = (
                self._events().watch(calendarId=self.calendar_id, body=body).execute(http=http)
            )
            return answer

        answer = await self._run(call)
        granted_ms = int(answer.get("expiration") or body["expiration"])
        return WatchChannel(
            channel_id=str(answer.get("id", channel_id)),
            resource_id=str(answer["resourceId"]),
            expires_at=datetime.fromtimestamp(granted_ms / 1000, UTC),
        )

    async def stop(self, channel_id: str, resource_id: str) -> None:
        """Closes a channel; one Google no longer knows (expired, stopped) counts as closed."""
        body = {"id": channel_id, "resourceId": resource_id}

        def call(http: google_auth_httplib2.AuthorizedHttp) -> None:
            try:
                self._service.channels().stop(body=body).execute(http=http)
            except HttpError as exc:
                if exc.resp.status not in GONE_STATUSES:
                    raise

        await self._run(call)

    async def changes(self, sync_token: str | None) -> ChangeSet:
        """Events changed since ``sync_token`` (cancelled ones included), every page of them.

        Without a token it lists the whole calendar, deleted events included, and the answer is
        ``full``. A token Google no longer honours raises :class:`SyncTokenExpired`.
        """

        def call(http: google_auth_httplib2.AuthorizedHttp) -> ChangeSet:
            params: dict[str, Any] = (
                {"syncToken": sync_token} if sync_token is not None else {"showDeleted": True}
            )
            try:
                items, next_token = self._list_pages(http, **params)
            except HttpError as exc:
                if exc.resp.status == 410:
                    raise SyncTokenExpired(f"Google 410: {_message(exc)}") from exc
                raise
            if next_token is None:
                raise Transient("Google's last page of the list carried no nextSyncToken")
            return ChangeSet(
                events=tuple(_changed_event(item) for item in items),
                next_sync_token=next_token,
                full=sync_token is None,
            )

        return await self._run(call)

    async def aclose(self) -> None:
        while True:
            try:
                http = self._pool.get_nowait()
            except queue.Empty:
                return
            http.http.close()

    # -- blocking internals (worker threads) ------------------------------------------------

    def _events(self) -> Any:
        return self._service.events()

    def _new_http(self) -> google_auth_httplib2.AuthorizedHttp:
        bundle = self._options.ca_bundle or ca_bundle_path() or certifi.where()
        raw = httplib2.Http(ca_certs=bundle, timeout=self._options.timeout_s)
        return google_auth_httplib2.AuthorizedHttp(self._credentials, http=raw)

    @contextmanager
    def _borrow(self) -> Iterator[google_auth_httplib2.AuthorizedHttp]:
        try:
            http = self._pool.get_nowait()
        except queue.Empty:
            http = self._new_http()
        try:
            yield http
        finally:
            if self._pool.qsize() < HTTP_POOL_MAX:
                self._pool.put(http)
            else:
                http.http.close()

    def _ensure_token(self, http: google_auth_httplib2.AuthorizedHttp) -> None:
        """Refreshes through our own http (with our CA bundle) before the library would.

        BatchHttpRequest refreshes with a bare ``httplib2.Http()``; refreshing here first
        means it never needs to, and one lock keeps threads from refreshing at once.
        """
        with self._refresh_lock:
            if not self._credentials.valid:
                request = google_auth_httplib2.Request(http.http)
                self._credentials.refresh(request)  # type: ignore[no-untyped-call]

    async def _run(self, fn: Callable[[google_auth_httplib2.AuthorizedHttp], T]) -> T:
        return await asyncio.to_thread(self._call, fn)

    def _call(self, fn: Callable[[google_auth_httplib2.AuthorizedHttp], T]) -> T:
        with self._borrow() as http:
            try:
                self._ensure_token(http)
                return fn(http)
            except ProviderError:
                raise
            except HttpError as exc:
                raise map_http_error(exc, self._options.daily_reset_tz) from exc
            except ga_exceptions.RefreshError as exc:
                if getattr(exc, "retryable", False):
                    raise Transient(f"Google token refresh failed: {exc}") from exc
                answer = exc.args[1] if len(exc.args) > 1 else None
                if (
                    isinstance(self._credentials, user_credentials.Credentials)
                    and isinstance(answer, dict)
                    and answer.get("error") == "invalid_grant"
                ):  # the user removed our access, or the grant expired: they must sign in
                    raise GrantRevoked(f"the user's Google grant was refused: {exc}") from exc
                raise AuthFailed(f"Google token refresh failed: {exc}") from exc
            except ga_exceptions.TransportError as exc:
                raise Transient(f"Google token endpoint unreachable: {exc}") from exc
            except (httplib2.HttpLib2Error, OSError) as exc:
                raise Unreachable(f"Google unreachable: {exc!r}") from exc

    def _get_or_none(
        self, http: google_auth_httplib2.AuthorizedHttp, event_id: str
    ) -> dict[str, Any] | None:
        try:
            event: dict[str, Any] = (
                self._events().get(calendarId=self.calendar_id, eventId=event_id).execute(http=http)
            )
        except HttpError as exc:
            if exc.resp.status in GONE_STATUSES:
                return None
            raise
        return event

    def _create_sync(self, http: google_auth_httplib2.AuthorizedHttp, spec: EventSpec) -> EventRef:
        body = event_body(spec)
        try:
            event = (
                self._events()
                .insert(calendarId=self.calendar_id, body=body, sendUpdates="none")
                .execute(http=http)
            )
        except HttpError as exc:
            if exc.resp.status != 409:
                raise
            return self._adopt_sync(http, body)
        return _ref(event)

    def _adopt_sync(
        self, http: google_auth_httplib2.AuthorizedHttp, body: dict[str, Any]
    ) -> EventRef:
        """Our derived id exists already: an earlier create of ours got through.

        It holds the activity as it was then, and edits made since (whose operations this create
        stands in for) must land too: the event is patched to this spec's content. If it was
        deleted since (Google keeps it as ``cancelled`` and the id stays taken), that brings it
        back, which is what a create asks for.
        """
        event = self._get_or_none(http, body["id"])
        if event is None:
            raise ProviderConflict(f"event id {body['id']} is taken but cannot be read")
        revived = {k: v for k, v in body.items() if k != "id"}
        revived.setdefault("status", "confirmed")
        result = (
            self._events()
            .patch(
                calendarId=self.calendar_id, eventId=body["id"], body=revived, sendUpdates="none"
            )
            .execute(http=http)
        )
        return _ref(result)

    def _create_chunk_sync(
        self, http: google_auth_httplib2.AuthorizedHttp, specs: Sequence[EventSpec]
    ) -> list[BatchResult]:
        answers: dict[str, tuple[dict[str, Any] | None, HttpError | None]] = {}

        def collect(request_id: str, response: Any, exception: HttpError | None) -> None:
            answers[request_id] = (response, exception)

        batch = BatchHttpRequest(callback=collect, batch_uri=self._options.batch_url)
        bodies = [event_body(spec) for spec in specs]
        for index, body in enumerate(bodies):
            request = self._events().insert(
                calendarId=self.calendar_id, body=body, sendUpdates="none"
            )
            batch.add(request, request_id=str(index))
        batch.execute(http=http)
        results = []
        for index, spec in enumerate(specs):
            response, error = answers.get(str(index), (None, None))
            if error is None and response is not None:
                results.append(BatchResult(key=spec.key, ref=_ref(response)))
                continue
            try:
                if error is None:
                    raise Transient("the batch answer lacked this call")
                if error.resp.status != 409:
                    raise map_http_error(error, self._options.daily_reset_tz) from error
                results.append(BatchResult(key=spec.key, ref=self._adopt_sync(http, bodies[index])))
            except HttpError as exc:
                mapped = map_http_error(exc, self._options.daily_reset_tz)
                results.append(BatchResult(key=spec.key, error=mapped))
            except ProviderError as exc:
                results.append(BatchResult(key=spec.key, error=exc))
        return results

    def _list_all(
        self, http: google_auth_httplib2.AuthorizedHttp, **params: Any
    ) -> list[dict[str, Any]]:
        return self._list_pages(http, **params)[0]

    def _list_pages(
        self, http: google_auth_httplib2.AuthorizedHttp, **params: Any
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Every page's items, and the ``nextSyncToken`` that only the last page carries."""
        events = self._events()
        request = events.list(calendarId=self.calendar_id, maxResults=LIST_PAGE_SIZE, **params)
        items: list[dict[str, Any]] = []
        sync_token: str | None = None
        while request is not None:
            page = request.execute(http=http)
            items.extend(page.get("items", []))
            sync_token = page.get("nextSyncToken", sync_token)
            request = events.list_next(request, page)
        return items, sync_token


# -- mapping between EventSpec and Google's JSON -------------------------------------------


def event_body(spec: EventSpec) -> dict[str, Any]:
    """The ``events.insert`` body for ``spec``; tasks become transparent all-day events."""
    private = {PROP_ACTIVITY: spec.activity_id}
    if spec.batch_id is not None:
        private[PROP_BATCH] = spec.batch_id
    body: dict[str, Any] = {
        "id": event_id_for(spec.key),
        "summary": spec.subject,
        "description": spec.description,
        "location": spec.location,
        "extendedProperties": {"private": private},
        # No reminder asked for means none, not the calendar's defaults.
        "reminders": {
            "useDefault": False,
            "overrides": (
                [{"method": "popup", "minutes": spec.reminder_minutes}]
                if spec.reminder_minutes is not None
                else []
            ),
        },
    }
    if spec.start is not None and spec.end is not None and spec.kind != "task":
        zone = ZoneInfo(spec.timezone)
        body["start"] = {"dateTime": _local_rfc3339(spec.start, zone), "timeZone": spec.timezone}
        body["end"] = {"dateTime": _local_rfc3339(spec.end, zone), "timeZone": spec.timezone}
    else:
        day = spec.due or (
            spec.start.astimezone(ZoneInfo(spec.timezone)).date() if spec.start else None
        )
        if day is None:
            raise Permanent(f"activity {spec.activity_id} has neither a slot nor a due date")
        body["start"] = {"date": day.isoformat()}
        body["end"] = {"date": (day + timedelta(days=1)).isoformat()}
        body["transparency"] = "transparent"
    if spec.attendees:
        body["attendees"] = [
            {"email": a.email, "displayName": a.name} for a in spec.attendees if a.email
        ]
    return body


def map_http_error(exc: HttpError, daily_reset_tz: str = DAILY_QUOTA_RESET_TZ) -> ProviderError:
    """Google's status and ``errors[0].reason`` in syncsvc's vocabulary.

    Rate limits (403 rate/userRateLimitExceeded, 429) carry no ``Retry-After`` at Google, so
    ``retry_after_s`` is ``None`` and the queue backs off exponentially with jitter. The daily
    ``quotaExceeded`` cannot succeed before the quota resets at midnight Pacific, so it waits
    until then.
    """
    status = exc.resp.status
    reason = _reason(exc)
    message = f"Google {status} {reason or ''}: {_message(exc)}".strip()
    if status == 403 and reason in ("quotaExceeded", "dailyLimitExceeded"):
        wait_s = seconds_until_midnight(daily_reset_tz)
        return error_for_status(status, message, retry_after_s=wait_s, throttled=True)
    throttled = status == 403 and reason in RATE_LIMIT_REASONS
    return error_for_status(status, message, throttled=throttled)


def seconds_until_midnight(zone: str, now: datetime | None = None) -> float:
    tz = ZoneInfo(zone)
    current = (now or datetime.now(UTC)).astimezone(tz)
    midnight = datetime.combine(current.date() + timedelta(days=1), time(), tz)
    return (midnight - current).total_seconds()


def _error_json(exc: HttpError) -> dict[str, Any]:
    try:
        payload = json.loads(exc.content.decode("utf-8") if exc.content else "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, dict) else {}


def _reason(exc: HttpError) -> str | None:
    errors = _error_json(exc).get("errors") or []
    if errors and isinstance(errors[0], dict):
        reason = errors[0].get("reason")
        return str(reason) if reason else None
    return None


def _message(exc: HttpError) -> str:
    return str(_error_json(exc).get("message") or exc.resp.reason or "")


def _changed_event(event: Mapping[str, Any]) -> ChangedEvent:
    private = (event.get("extendedProperties") or {}).get("private") or {}
    start, end = event.get("start") or {}, event.get("end") or {}
    timed = bool(start.get("dateTime")) and bool(end.get("dateTime"))
    zone = ZoneInfo(start["timeZone"]) if timed and start.get("timeZone") else None
    return ChangedEvent(
        event_id=str(event["id"]),
        cancelled=event.get("status") == "cancelled",
        etag=event.get("etag"),
        event_type=str(event.get("eventType", "default")),
        subject=event.get("summary"),
        start=_in_zone(_parse_instant(start["dateTime"]), zone) if timed else None,
        end=_in_zone(_parse_instant(end["dateTime"]), zone) if timed else None,
        activity_id=private.get(PROP_ACTIVITY),
    )


def _ref(event: Mapping[str, Any]) -> EventRef:
    return EventRef(event_id=str(event["id"]), etag=event.get("etag"))


def _local_rfc3339(moment: datetime, zone: ZoneInfo) -> str:
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=zone)
    return aware.astimezone(zone).isoformat()


def _rfc3339(moment: datetime) -> str:
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return aware.isoformat()


def _parse_instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("z", "Z"))


def _days_of(event: Mapping[str, Any]) -> Iterator[date]:
    """Calendar days an event touches, in its own zone; an end at midnight excludes that day."""
    start, end = event.get("start", {}), event.get("end", {})
    if start.get("date"):
        first = date.fromisoformat(start["date"])
        stop = date.fromisoformat(end.get("date", start["date"]))
        last = max(first, stop - timedelta(days=1))
    else:
        zone = ZoneInfo(start["timeZone"]) if start.get("timeZone") else None
        begin = _in_zone(_parse_instant(start["dateTime"]), zone)
        finish = _in_zone(_parse_instant(end["dateTime"]), zone)
        first = begin.date()
        last = (finish - timedelta(microseconds=1)).date() if finish > begin else first
    day = first
    while day <= last:
        yield day
        day += timedelta(days=1)


def _in_zone(moment: datetime, zone: ZoneInfo | None) -> datetime:
    """A local time without offset belongs to ``zone``; one with an offset is converted."""
    if zone is None:
        return moment
    return moment.replace(tzinfo=zone) if moment.tzinfo is None else moment.astimezone(zone)
