"""A faithful local stand-in for Microsoft Graph (calendar parts) and its Entra ID token service.

Real clients talk to it unchanged: MSAL fetches the tenant's OpenID configuration and a
client-credentials token over https, and the Graph adapter sends the same requests it sends to
``graph.microsoft.com``. The fake keeps Graph's habits that matter to syncsvc (docs/providers.md):
``transactionId`` idempotency, extended properties and the ``$filter`` that finds them, paging
with ``@odata.nextLink``, ``$batch`` of at most 20 with per-item throttling, ``400`` for bodies
Graph would reject, and the Outlook limits per mailbox (requests per window and 4 concurrent
requests) answered with ``429`` and ``Retry-After``. It records what every mailbox saw so tests
and benchmarks can assert that a client respected those limits.

Routes live in one table (``FakeGraph._routes``). Change notifications work like Graph's:
``POST /subscriptions`` first validates the notification (and lifecycle) URL by POSTing
``?validationToken=…`` and refuses to create the subscription unless it is echoed (200,
``text/plain``) within ``VALIDATION_TIMEOUT_S``; every change to a watched mailbox — ours
through the API, or a user's through :meth:`FakeGraph.user_move_event` /
:meth:`FakeGraph.user_delete_event` — is POSTed to the subscription's URL with its
``clientState``; :meth:`FakeGraph.send_lifecycle` sends lifecycle events. ``calendarView/delta``
pages with ``@odata.nextLink`` and ends with ``@odata.deltaLink``; a token made stale by
:meth:`FakeGraph.expire_delta_tokens` answers ``410 SyncStateNotFound``. Unlike Graph, the fake
lets notification URLs be plain ``http`` on 127.0.0.1, where the service runs in tests.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import hashlib
import json
import math
import random
import re
import secrets
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
from aiohttp import web

from tests.fakes._server import FakeServer, Response, Routes

GRAPH_PATH_PREFIX = "/v1.0"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
GRAPH_BATCH_MAX = 20
GRAPH_PAGE_SIZE_DEFAULT = 10
GRAPH_PAGE_SIZE_MAX = 1000
GET_SCHEDULE_MAX_SCHEDULES = 100
TOKEN_LIFETIME_S = 3599
#: Graph's time limit for answering a validation request, and its hope for notifications.
VALIDATION_TIMEOUT_S = 10.0
NOTIFICATION_TIMEOUT_S = 3.0
SUBSCRIPTION_MAX_MIN = 10_080
CLIENT_STATE_MAX_CHARS = 128
#: The tenant segments a user may sign in through (any directory's work or school account).
USER_AUTHORITIES = ("organizations", "common")
#: What a user may grant the app (delegated permissions, plus the OpenID ones).
USER_SCOPES = frozenset(
    {
        "https://graph.microsoft.com/Calendars.ReadWrite",
        "https://graph.microsoft.com/MailboxSettings.Read",
        "openid",
        "profile",
        "offline_access",
    }
)
_SUBSCRIPTION_RESOURCE = re.compile(r"^/?users/([^/]+)/events$", re.IGNORECASE)

SHOW_AS = ("free", "tentative", "busy", "oof", "workingElsewhere", "unknown")
#: getSchedule's availabilityView digits, and which status wins when events overlap.
AVAILABILITY_DIGIT = {
    "free": "0",
    "tentative": "1",
    "busy": "2",
    "oof": "3",
    "workingElsewhere": "4",
}
STATUS_PRECEDENCE = ("oof", "busy", "tentative", "workingElsewhere", "free")

#: Windows time zone names Graph accepts next to IANA names (the ones our users meet).
WINDOWS_ZONES = {
    "UTC": "UTC",
    "Coordinated Universal Time": "UTC",
    "GMT Standard Time": "Europe/London",
    "Greenwich Standard Time": "Atlantic/Reykjavik",
    "W. Europe Standard Time": "Europe/Berlin",
    "Romance Standard Time": "Europe/Paris",
    "Central Europe Standard Time": "Europe/Budapest",
    "Central European Standard Time": "Europe/Warsaw",
    "FLE Standard Time": "Europe/Helsinki",
    "Eastern Standard Time": "America/New_York",
    "Central Standard Time": "America/Chicago",
    "Mountain Standard Time": "America/Denver",
    "Pacific Standard Time": "America/Los_Angeles",
}


# --- Knobs and records ------------------------------------------------------------------------


@dataclass
class ThrottleLimits:
    """Outlook limits per mailbox (docs/providers.md); mutable so a test can tighten them."""

    requests: int = 10_000
    window_s: float = 600.0
    concurrency: int = 4
    #: Retry-After given with a MailboxConcurrency 429.
    concurrency_retry_after_s: int = 1
    #: Time every accepted request takes, so concurrent requests really overlap.
    latency_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected failure: answer ``status`` (with ``Retry-After`` if set), or first hang."""

    status: int = 503
    retry_after_s: int | None = 2
    hang_s: float | None = None


@dataclass
class FaultPlan:
    """A ``fraction`` of accepted Graph calls fail with ``fault`` (seeded, so runs repeat)."""

    fraction: float = 0.0
    fault: Fault = field(default_factory=Fault)
    seed: int = 0


@dataclass
class MailboxStats:
    """What one mailbox saw. ``early`` counts requests sent while a Retry-After was running."""

    requests: int = 0
    accepted: int = 0
    throttled: int = 0
    early: int = 0
    faults: int = 0
    max_concurrency: int = 0
    #: ``time.monotonic()`` of every accepted request.
    accepted_at: list[float] = field(default_factory=list)
    throttled_at: list[float] = field(default_factory=list)


@dataclass
class FakeEvent:
    """An event as the fake stores it; ``start``/``end`` are aware (all-day: local midnights)."""

    id: str
    change_key: str
    ical_uid: str
    created: dt.datetime
    modified: dt.datetime
    props: dict[str, Any]
    start: dt.datetime
    end: dt.datetime
    is_all_day: bool
    extended: dict[str, str]
    transaction_id: str | None = None

    @property
    def subject(self) -> str:
        return str(self.props.get("subject") or "")

    @property
    def show_as(self) -> str:
        return str(self.props.get("showAs") or "busy")

    def extended_value(self, name: str) -> str | None:
        """The value of the String extended property called ``name`` (any property set)."""
        suffix = f" name {name}".lower()
        for key, value in self.extended.items():
            if key.lower().endswith(suffix):
                return value
        return None


@dataclass(slots=True)
class Directory:
    """An Entra tenant: its verified domains, and whether its admin consented to the app."""

    tenant_id: str
    name: str
    domains: list[str]
    consented: bool = False

    @property
    def admin(self) -> str:
        return f"admin@{self.domains[0] if self.domains else 'example.invalid'}"


@dataclass
class _Mailbox:
    address: str
    timezone: str
    events: dict[str, FakeEvent] = field(default_factory=dict)
    by_transaction: dict[str, str] = field(default_factory=dict)
    auto_replies: dict[str, Any] = field(default_factory=dict)
    stats: MailboxStats = field(default_factory=MailboxStats)
    window: deque[float] = field(default_factory=deque)
    in_flight: int = 0
    penalty_until: float = 0.0
    penalty_message: str = ""
    #: When the client received the 429 that started the penalty (None: not yet delivered).
    penalty_announced_at: float | None = None
    denied: bool = False
    #: The Entra tenant the mailbox lives in: only its app tokens reach it.
    directory: str = ""
    scripted: deque[Fault] = field(default_factory=deque)
    #: Change log for delta queries: (sequence number, event id), oldest first.
    changes: list[tuple[int, str]] = field(default_factory=list)
    #: Delta tokens older than this generation answer 410.
    delta_generation: int = 0


@dataclass
class FakeSubscription:
    id: str
    mailbox: str
    resource: str
    change_type: str
    notification_url: str
    lifecycle_url: str | None
    client_state: str | None
    expires: dt.datetime
    renewals: int = 0


@dataclass(frozen=True, slots=True)
class Delivery:
    """One POST the fake made to a subscriber: a validation, a notification or a lifecycle event."""

    kind: str  # "validation" | "notification" | "lifecycle"
    url: str
    status: int | None  # None: no answer (timeout, refused)
    elapsed_s: float
    body: Any


@dataclass(frozen=True, slots=True)
class _DeltaState:
    mailbox: str
    begin: dt.datetime
    finish: dt.datetime
    #: The change-log position the token stands for.
    seq: int
    generation: int


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # lower-case names
    body: Any
    #: When the HTTP request carrying it arrived, and the mailboxes its answers will throttle.
    arrived: float = 0.0
    penalized: list[_Mailbox] = field(default_factory=list)
    #: The Entra tenant of the bearer token, and its user if it is a delegated token.
    directory: str = ""
    user: str | None = None


class GraphError(Exception):
    """A Graph error answer: ``{"error": {"code", "message", "innerError"}}``."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def response(self) -> Response:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        body = {
            "error": {
                "code": self.code,
                "message": self.message,
                "innerError": {"date": now, "request-id": str(uuid.uuid4())},
            }
        }
        return Response(self.status, body, self.headers)


Handler = Callable[["_Request", "_Mailbox | None", re.Match[str]], Awaitable[Response]]


# --- Body validation, the way Graph's OData reader does it ------------------------------------


def _read_error(message: str) -> GraphError:
    return GraphError(400, "RequestBodyRead", message)


def _expect(value: Any, kind: type | tuple[type, ...], edm: str, where: str) -> None:
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise _read_error(
            f"Cannot convert the literal '{json.dumps(value)}' to the expected type '{edm}' "
            f"(property '{where}')."
        )


def _check_object(value: Any, type_name: str, allowed: Mapping[str, str], where: str) -> None:
    _expect(value, dict, type_name, where)
    for key, item in value.items():
        if key not in allowed:
            raise _read_error(
                f"The property '{key}' does not exist on type '{type_name}'. Make sure to only "
                "use property names that are defined by the type or mark the type as open type."
            )
        _check_value(item, allowed[key], f"{where}.{key}")


_OBJECTS: dict[str, tuple[str, dict[str, str]]] = {
    "itemBody": ("microsoft.graph.itemBody", {"contentType": "bodyType", "content": "string"}),
    "dateTimeTimeZone": (
        "microsoft.graph.dateTimeTimeZone",
        {"dateTime": "string", "timeZone": "string"},
    ),
    "location": (
        "microsoft.graph.location",
        {
            "displayName": "string",
            "locationType": "string",
            "locationUri": "string",
            "locationEmailAddress": "string",
            "uniqueId": "string",
            "uniqueIdType": "string",
            "address": "any",
            "coordinates": "any",
        },
    ),
    "emailAddress": ("microsoft.graph.emailAddress", {"address": "string", "name": "string"}),
    "attendee": (
        "microsoft.graph.attendee",
        {"emailAddress": "emailAddress", "type": "attendeeType", "status": "any"},
    ),
    "extendedProperty": (
        "microsoft.graph.singleValueLegacyExtendedProperty",
        {"id": "string", "value": "string"},
    ),
}
_ENUMS = {
    "bodyType": ("microsoft.graph.bodyType", ("text", "html")),
    "attendeeType": ("microsoft.graph.attendeeType", ("required", "optional", "resource")),
    "freeBusyStatus": ("microsoft.graph.freeBusyStatus", SHOW_AS),
    "importance": ("microsoft.graph.importance", ("low", "normal", "high")),
    "sensitivity": (
        "microsoft.graph.sensitivity",
        ("normal", "personal", "private", "confidential"),
    ),
}
#: Writable event properties we model; anything else is rejected like an unknown property.
EVENT_PROPERTIES = {
    "@odata.type": "string",
    "subject": "string",
    "body": "itemBody",
    "location": "location",
    "locations": "list:location",
    "start": "dateTimeTimeZone",
    "end": "dateTimeTimeZone",
    "isAllDay": "bool",
    "showAs": "freeBusyStatus",
    "isReminderOn": "bool",
    "reminderMinutesBeforeStart": "int",
    "attendees": "list:attendee",
    "importance": "importance",
    "sensitivity": "sensitivity",
    "categories": "list:string",
    "transactionId": "string",
    "singleValueExtendedProperties": "list:extendedProperty",
    "responseRequested": "bool",
    "allowNewTimeProposals": "bool",
    "hideAttendees": "bool",
}
GET_SCHEDULE_PROPERTIES = {
    "schedules": "list:string",
    "startTime": "dateTimeTimeZone",
    "endTime": "dateTimeTimeZone",
    "availabilityViewInterval": "int",
}


def _check_value(value: Any, kind: str, where: str) -> None:
    if value is None or kind == "any":
        return  # Graph's event properties are nullable; required ones are checked afterwards.
    if kind.startswith("list:"):
        _expect(value, list, f"Collection({kind[5:]})", where)
        for index, item in enumerate(value):
            if item is None:
                raise _read_error(f"A null value was found in collection '{where}'.")
            _check_value(item, kind[5:], f"{where}[{index}]")
    elif kind == "string":
        _expect(value, str, "Edm.String", where)
    elif kind == "bool":
        _expect(value, bool, "Edm.Boolean", where)
    elif kind == "int":
        _expect(value, int, "Edm.Int32", where)
    elif kind in _ENUMS:
        type_name, members = _ENUMS[kind]
        _expect(value, str, type_name, where)
        if value not in members:
            raise _read_error(
                f"Cannot convert the literal '{value}' to the expected type '{type_name}'."
            )
    else:
        type_name, allowed = _OBJECTS[kind]
        _check_object(value, type_name, allowed, where)


def _check_body(body: Any, allowed: Mapping[str, str], type_name: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _read_error("The request body must be a JSON object.")
    _check_object(body, type_name, allowed, "body")
    return body


def zone_for(name: str) -> dt.tzinfo | None:
    """The zone for an IANA or (known) Windows name, or None as Graph's 'not supported'."""
    target = WINDOWS_ZONES.get(name, name)
    if target == "UTC":
        return dt.UTC
    try:
        return ZoneInfo(target)
    except (ZoneInfoNotFoundError, ValueError):
        return None


_FRACTION = re.compile(r"\.(\d{1,7})")


def _parse_local(text: str) -> dt.datetime | None:
    """Graph's ``dateTime``: ``2027-06-16T09:00:00`` with up to 7 fraction digits."""
    trimmed = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text, count=1)
    if "T" not in trimmed:
        return None
    try:
        return dt.datetime.fromisoformat(trimmed)
    except ValueError:
        return None


def parse_date_time_time_zone(value: Mapping[str, Any], where: str) -> dt.datetime:
    """``{"dateTime", "timeZone"}`` → an aware datetime, or the 400 Graph answers."""
    zone_name = value.get("timeZone")
    raw = value.get("dateTime")
    if not isinstance(raw, str) or not isinstance(zone_name, str):
        raise GraphError(400, "ErrorInvalidRequest", f"{where} needs dateTime and timeZone.")
    zone = zone_for(zone_name)
    if zone is None:
        raise GraphError(
            400,
            "TimeZoneNotSupportedException",
            "A valid TimeZone value must be specified. The following TimeZone value is not "
            f"supported: '{zone_name}'.",
        )
    parsed = _parse_local(raw)
    if parsed is None:
        raise GraphError(400, "UnableToDeserializePostBody", "were unable to deserialize ")
    if parsed.tzinfo is not None:
        return parsed.astimezone(zone)
    return parsed.replace(tzinfo=zone)


def format_graph_time(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + ".0000000"


_EXTENDED_ID = re.compile(
    r"^(String|Integer|Boolean|SystemTime|Binary|Double|Currency|Long|Short|Float|CLSID)"
    r" \{[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}"
    r" (Name \S.*|Id 0x[0-9a-fA-F]+)$"
)
_ANY_FILTER = re.compile(
    r"^\s*singleValueExtendedProperties/any\(\s*(\w+)\s*:\s*\1/id\s+eq\s+'((?:[^']|'')*)'"
    r"\s+and\s+\1/value\s+eq\s+'((?:[^']|'')*)'\s*\)\s*$",
    re.IGNORECASE,
)
_EXPAND = re.compile(r"^\s*singleValueExtendedProperties(?:\((.*)\))?\s*$", re.IGNORECASE)
_QUOTED = re.compile(r"'((?:[^']|'')*)'")
_PREFER_TZ = re.compile(r'outlook\.timezone\s*=\s*"([^"]+)"', re.IGNORECASE)


def _unquote_odata(text: str) -> str:
    return text.replace("''", "'")


def _new_id() -> str:
    return "AAMkAD" + base64.urlsafe_b64encode(secrets.token_bytes(30)).decode() + "AAA="


def _new_change_key() -> str:
    return base64.b64encode(secrets.token_bytes(12)).decode()


# --- The server -------------------------------------------------------------------------------


class FakeGraph(FakeServer):
    """Entra ID token endpoints plus the Graph calendar API, on one https port."""

    tls_name = "graph"
    client_max_size = 4 * 1024 * 1024
    #: A client that gave up no longer holds one of its mailbox's concurrent requests.
    handler_cancellation = True

    def __init__(
        self,
        *,
        tenant_id: str = "11111111-2222-3333-4444-555555555555",
        client_id: str = "syncsvc-test-client",
        client_secret: str = "s3cret-value",
        token_lifetime_s: int = TOKEN_LIFETIME_S,
        limits: ThrottleLimits | None = None,
    ) -> None:
        super().__init__()
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_lifetime_s = token_lifetime_s
        self.limits = limits or ThrottleLimits()
        self.faults = FaultPlan()
        self._rng = random.Random(0)
        self._mailboxes: dict[str, _Mailbox] = {}
        #: Entra tenants: the default one (``tenant_id``) has consented to the app already.
        self.directories: dict[str, Directory] = {
            tenant_id: Directory(tenant_id, "Default Org", [], consented=True)
        }
        #: Redirect URIs registered on the app; admin consent refuses any other (AADSTS50011).
        self.redirect_uris: set[str] = set()
        #: Token -> (expiry, the Entra tenant it was issued in, the user of a delegated token).
        self._tokens: dict[str, tuple[float, str, str | None]] = {}
        #: The accounts the user sign-in page offers (each one a mailbox).
        self.accounts: list[str] = []
        #: Authorization codes in flight: code -> (redirect URI, PKCE challenge, nonce, user).
        self._codes: dict[str, tuple[str, str, str, str]] = {}
        #: Refresh token -> the user who granted it; a rotated-out token stays valid (as in
        #: Entra) until the user's grants are revoked.
        self._refresh_tokens: dict[str, str] = {}
        #: Every token request (successful or not), and every HTTP request to Graph.
        self.token_requests = 0
        self.round_trips: list[tuple[str, str]] = []
        #: Every PATCH of an event as (event id, body), to see what an update resent.
        self.patch_bodies: list[tuple[str, Any]] = []
        self._subscriptions: dict[str, FakeSubscription] = {}
        self.deliveries: list[Delivery] = []
        #: Answer deadline given to subscribers for validation requests (Graph: 10 s).
        self.validation_timeout_s = VALIDATION_TIMEOUT_S
        self._seq = 0
        self._delta_tokens: dict[str, _DeltaState] = {}
        self._skip_tokens: dict[str, tuple[list[str], _DeltaState, bool]] = {}
        #: Events per delta page unless the client asks (``Prefer: odata.maxpagesize``).
        self.delta_page_size = GRAPH_PAGE_SIZE_DEFAULT
        #: Delta requests answered 410 SyncStateNotFound, and delta rounds started from scratch.
        self.stale_delta_answers = 0
        self.full_delta_rounds = 0
        self._routes: Routes[Handler] = Routes(
            ("GET", r"/users/([^/]+)/(?:calendar/)?calendarView/delta", self._calendar_view_delta),
            ("POST", r"/users/([^/]+)/(?:calendar/)?events", self._create_event),
            ("GET", r"/users/([^/]+)/(?:calendar/)?events", self._list_events),
            ("GET", r"/users/([^/]+)/(?:calendar/)?events/([^/]+)", self._get_event),
            ("PATCH", r"/users/([^/]+)/(?:calendar/)?events/([^/]+)", self._patch_event),
            ("DELETE", r"/users/([^/]+)/(?:calendar/)?events/([^/]+)", self._delete_event),
            ("GET", r"/users/([^/]+)/(?:calendar/)?calendarView", self._calendar_view),
            (
                "GET",
                r"/users/([^/]+)/mailboxSettings/automaticRepliesSetting",
                self._automatic_replies,
            ),
            ("POST", r"/users/([^/]+)/calendar/getSchedule", self._get_schedule),
        )

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def authority_url(self) -> str:
        """The authority *host*: clients append ``/<tenant id>`` like login.microsoftonline.com."""
        return self.base_url

    @property
    def graph_url(self) -> str:
        return self.base_url + GRAPH_PATH_PREFIX

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._openid)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        app.router.add_get("/{tenant}/oauth2/v2.0/authorize", self._sign_in_page)
        app.router.add_post("/{tenant}/oauth2/v2.0/authorize", self._sign_in_decide)
        app.router.add_get("/organizations/v2.0/adminconsent", self._admin_consent_page)
        app.router.add_post("/organizations/v2.0/adminconsent", self._admin_consent_decide)
        app.router.add_route("*", GRAPH_PATH_PREFIX + "/{tail:.*}", self._graph_http)

    # -- direct access for tests -------------------------------------------------------------

    def add_directory(self, tenant_id: str, name: str, domains: Sequence[str]) -> Directory:
        """Another customer's Entra tenant; the app is not consented there until its admin
        accepts on the admin-consent page (account ``admin@<first domain>``)."""
        directory = Directory(tenant_id, name, list(domains))
        self.directories[tenant_id] = directory
        return directory

    def add_mailbox(
        self, address: str, timezone: str = "UTC", directory: str | None = None
    ) -> None:
        home = self.directories[directory or self.tenant_id]
        domain = address.rpartition("@")[2].lower()
        if home.tenant_id == self.tenant_id and domain not in home.domains:
            home.domains.append(domain)
        box = _Mailbox(address=address, timezone=timezone, directory=home.tenant_id)
        self._mailboxes[address.lower()] = box
        self.set_automatic_replies(address, "disabled")

    def mailbox_events(self, address: str) -> list[FakeEvent]:
        """A copy of the mailbox's events, oldest first."""
        return [copy.deepcopy(e) for e in self._mailbox(address).events.values()]

    def stats(self, address: str) -> MailboxStats:
        return self._mailbox(address).stats

    def deny(self, address: str, denied: bool = True) -> None:
        """Make the mailbox answer 403 ErrorAccessDenied (the app lost its permission)."""
        self._mailbox(address).denied = denied

    def script_faults(self, address: str, *faults: Fault) -> None:
        """The next accepted calls to this mailbox fail with these faults, in order."""
        self._mailbox(address).scripted.extend(faults)

    def reset_throttling(self, limits: ThrottleLimits | None = None) -> None:
        """New limits; forgets windows and penalties (not stats) of every mailbox."""
        self.limits = limits or ThrottleLimits()
        for box in self._mailboxes.values():
            box.window.clear()
            box.penalty_until = 0.0

    def revoke_tokens(self) -> None:
        self._tokens.clear()

    def revoke_consent(self, tenant_id: str) -> None:
        """The directory's admin removed the app: its tokens stop working and new ones are
        refused (AADSTS700016) until an admin consents again."""
        self.directories[tenant_id].consented = False
        self._tokens = {t: v for t, v in self._tokens.items() if v[1] != tenant_id}

    def refresh_tokens_of(self, address: str) -> list[str]:
        """The refresh tokens issued to the user so far, oldest first (all still valid)."""
        return [t for t, u in self._refresh_tokens.items() if u == address.lower()]

    def revoke_user_grants(self, address: str) -> None:
        """The user removed the app at myapps.microsoft.com (or an admin revoked their
        sessions): their refresh tokens answer ``invalid_grant`` (AADSTS50173), their access
        tokens stop working."""
        user = address.lower()
        self._refresh_tokens = {t: u for t, u in self._refresh_tokens.items() if u != user}
        self._tokens = {t: v for t, v in self._tokens.items() if v[2] != user}

    def add_foreign_event(
        self,
        address: str,
        subject: str,
        start: dt.datetime | dt.date,
        end: dt.datetime | dt.date,
        *,
        show_as: str = "busy",
        timezone: str | None = None,
    ) -> str:
        """An event the user made themselves. Dates (not datetimes) make an all-day event;
        ``end`` is exclusive as in Graph."""
        box = self._mailbox(address)
        zone_name = timezone or box.timezone
        zone = zone_for(zone_name)
        assert zone is not None, zone_name
        all_day = not isinstance(start, dt.datetime)

        def as_local(value: dt.datetime | dt.date) -> dt.datetime:
            if isinstance(value, dt.datetime):
                return value.astimezone(zone) if value.tzinfo else value.replace(tzinfo=zone)
            return dt.datetime.combine(value, dt.time(), zone)

        begin, finish = as_local(start), as_local(end)
        props = {
            "subject": subject,
            "showAs": show_as,
            "isAllDay": all_day,
            "start": {"dateTime": format_graph_time(begin), "timeZone": zone_name},
            "end": {"dateTime": format_graph_time(finish), "timeZone": zone_name},
        }
        event = self._store(box, props, begin, finish, all_day, {}, None)
        return event.id

    def set_automatic_replies(
        self,
        address: str,
        status: str,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
    ) -> None:
        """``status`` is disabled / alwaysEnabled / scheduled; the window is kept in UTC."""
        box = self._mailbox(address)
        now = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
        begin = (start or now).astimezone(dt.UTC)
        finish = (end or now + dt.timedelta(days=1)).astimezone(dt.UTC)
        box.auto_replies = {
            "status": status,
            "externalAudience": "all",
            "internalReplyMessage": "I am away.",
            "externalReplyMessage": "I am away.",
            "scheduledStartDateTime": {"dateTime": format_graph_time(begin), "timeZone": "UTC"},
            "scheduledEndDateTime": {"dateTime": format_graph_time(finish), "timeZone": "UTC"},
        }

    # -- Entra ID ------------------------------------------------------------------------------

    def _aad_error(self, status: int, error: str, code: int, description: str) -> web.Response:
        body = {
            "error": error,
            "error_description": f"AADSTS{code}: {description} Trace ID: {uuid.uuid4()}",
            "error_codes": [code],
            "timestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
            "trace_id": str(uuid.uuid4()),
            "correlation_id": str(uuid.uuid4()),
            "error_uri": f"{self.base_url}/error?code={code}",
        }
        return web.json_response(body, status=status)

    def _app_error(self, params: Mapping[str, str]) -> web.Response | None:
        """Both consent pages refuse an unknown app and an unregistered redirect URI."""
        if params.get("client_id") != self.client_id:
            return self._aad_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{params.get('client_id')}' was not found.",
            )
        if params.get("redirect_uri") not in self.redirect_uris:
            return self._aad_error(
                400,
                "invalid_request",
                50011,
                f"The redirect URI '{params.get('redirect_uri')}' specified in the request "
                "does not match the redirect URIs configured for the application.",
            )
        return None

    def _consent_request_error(self, params: Mapping[str, str]) -> web.Response | None:
        refused = self._app_error(params)
        if refused is not None:
            return refused
        if params.get("scope") != GRAPH_SCOPE:
            return self._aad_error(400, "invalid_scope", 70011, "The provided scope is invalid.")
        return None

    async def _admin_consent_page(self, request: web.Request) -> web.Response:
        """The account picker and permissions page an administrator sees (Accept / Cancel)."""
        params = dict(request.query)
        refused = self._consent_request_error(params)
        if refused is not None:
            return refused
        hidden = "".join(
            f'<input type="hidden" name="{k}" value="{escape(params.get(k, ""))}">'
            for k in ("client_id", "redirect_uri", "scope", "state")
        )
        accounts = "".join(
            f'<label><input type="radio" name="account" value="{escape(d.admin)}"'
            f"{' checked' if n == 0 else ''}> {escape(d.admin)} ({escape(d.name)})</label><br>"
            for n, d in enumerate(self.directories.values())
        )
        page = (
            "<!doctype html><html><head><title>Permissions requested</title></head><body>"
            '<h1>Permissions requested</h1><form method="post">'
            f"<fieldset><legend>Pick an account</legend>{accounts}</fieldset>"
            "<p><b>syncsvc</b> needs permission to: Read and write calendars in all mailboxes "
            "(Calendars.ReadWrite), Read organization information. Accepting grants these "
            "permissions for your entire organization.</p>"
            f'{hidden}<button name="action" value="accept">Accept</button> '
            '<button name="action" value="cancel">Cancel</button></form></body></html>'
        )
        return web.Response(text=page, content_type="text/html")

    async def _admin_consent_decide(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        refused = self._consent_request_error(form)
        if refused is not None:
            return refused
        answer: dict[str, str]
        account = form.get("account")
        directory = next((d for d in self.directories.values() if d.admin == account), None)
        if form.get("action") != "accept" or directory is None:
            answer = {
                "error": "access_denied",
                "error_subcode": "cancel",
                "error_description": "AADSTS65004: User declined to consent to access the app.",
            }
        else:
            directory.consented = True
            answer = {"admin_consent": "True", "tenant": directory.tenant_id, "scope": GRAPH_SCOPE}
        answer["state"] = form.get("state", "")
        raise web.HTTPFound(f"{form['redirect_uri']}?{urlencode(answer)}")

    def _organization(self, directory: str) -> Response:
        """``GET /organization``: the token's own directory, with its verified domains."""
        d = self.directories[directory]
        domains = [
            {
                "capabilities": "Email, OfficeCommunicationsOnline",
                "isDefault": n == 0,
                "isInitial": False,
                "name": name,
                "type": "Managed",
            }
            for n, name in enumerate(d.domains)
        ]
        return Response(
            200,
            {
                "@odata.context": f"{self.graph_url}/$metadata#organization",
                "value": [{"id": d.tenant_id, "displayName": d.name, "verifiedDomains": domains}],
            },
        )

    async def _openid(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        if tenant not in self.directories and tenant not in USER_AUTHORITIES:
            return self._aad_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
        root = f"{self.base_url}/{tenant}"
        # A multi-tenant authority names no one issuer: each ID token's is its user's tenant.
        issuer = tenant if tenant in self.directories else "{tenantid}"
        return web.json_response(
            {
                "issuer": f"{self.base_url}/{issuer}/v2.0",
                "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
                "token_endpoint": f"{root}/oauth2/v2.0/token",
                "jwks_uri": f"{root}/discovery/v2.0/keys",
                "response_types_supported": ["code", "id_token", "code id_token", "token id_token"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "tenant_region_scope": "EU",
            }
        )

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = {k: str(v) for k, v in (await request.post()).items()}
        tenant = request.match_info["tenant"]
        grant_type = form.get("grant_type")
        user_grant = grant_type in ("authorization_code", "refresh_token")
        if tenant not in self.directories and not (user_grant and tenant in USER_AUTHORITIES):
            return self._aad_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if grant_type != "client_credentials" and not user_grant:
            return self._aad_error(
                400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type."
            )
        client_id = form.get("client_id", "")
        if client_id != self.client_id:
            return self._aad_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory.",
            )
        if form.get("client_secret") != self.client_secret:
            return self._aad_error(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request "
                "is the client secret value, not the client secret ID.",
            )
        if user_grant:
            return self._user_grant(form, tenant)
        scopes = form.get("scope", "").split()
        if scopes != [GRAPH_SCOPE]:
            return self._aad_error(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {' '.join(scopes)} is not valid. Client "
                "credential flows must have a scope value with /.default suffixed.",
            )
        if not self.directories[tenant].consented:
            return self._aad_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{self.directories[tenant].name}'. This can happen if the application has not "
                "been installed by the administrator of the tenant.",
            )
        token = "fake." + secrets.token_urlsafe(24)
        self._tokens[token] = (time.monotonic() + self.token_lifetime_s, tenant, None)
        return web.json_response(
            {
                "token_type": "Bearer",
                "expires_in": self.token_lifetime_s,
                "ext_expires_in": self.token_lifetime_s,
                "access_token": token,
            }
        )

    # -- a user signs in (authorization code + PKCE, then refresh tokens) ----------------------

    def _sign_in_error(self, params: Mapping[str, str]) -> web.Response | None:
        refused = self._app_error(params)
        if refused is not None:
            return refused
        if params.get("response_type") != "code":
            return self._aad_error(
                400,
                "unsupported_response_type",
                900144,
                "The request body must contain the following parameter: 'response_type'.",
            )
        if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
            return self._aad_error(
                400, "invalid_request", 50148, "The code_challenge parameter is required."
            )
        unknown = set(params.get("scope", "").split()) - USER_SCOPES
        if unknown:
            return self._aad_error(
                400, "invalid_scope", 70011, f"The provided scopes {sorted(unknown)} are invalid."
            )
        return None

    async def _sign_in_page(self, request: web.Request) -> web.Response:
        """The account picker and permissions page a user sees (Accept / Cancel)."""
        params = dict(request.query)
        refused = self._sign_in_error(params)
        if refused is not None:
            return refused
        hidden = "".join(
            f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">'
            for k, v in params.items()
        )
        accounts = "".join(
            f'<label><input type="radio" name="account" value="{escape(a)}"'
            f"{' checked' if n == 0 else ''}> {escape(a)}</label><br>"
            for n, a in enumerate(self.accounts)
        )
        page = (
            "<!doctype html><html><head><title>Sign in to your account</title></head><body>"
            '<h1>Pick an account</h1><form method="post">'
            f"<fieldset><legend>Accounts</legend>{accounts}</fieldset>"
            "<h2>Permissions requested</h2><p><b>syncsvc</b> would like to: Have full access "
            "to your calendars (Calendars.ReadWrite), Read your mailbox settings "
            "(MailboxSettings.Read), Maintain access to data you have given it access to "
            "(offline_access).</p>"
            f'{hidden}<button name="action" value="accept">Accept</button> '
            '<button name="action" value="cancel">Cancel</button></form></body></html>'
        )
        return web.Response(text=page, content_type="text/html")

    async def _sign_in_decide(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        refused = self._sign_in_error(form)
        if refused is not None:
            return refused
        answer: dict[str, str]
        account = form.get("account", "")
        if form.get("action") != "accept" or account not in self.accounts:
            answer = {
                "error": "access_denied",
                "error_subcode": "cancel",
                "error_description": "AADSTS65004: User declined to consent to access the app.",
            }
        else:
            code = "0.A" + secrets.token_urlsafe(48)
            self._codes[code] = (
                form["redirect_uri"],
                form["code_challenge"],
                form.get("nonce", ""),
                account.lower(),
            )
            answer = {"code": code, "session_state": str(uuid.uuid4())}
        answer["state"] = form.get("state", "")
        raise web.HTTPFound(f"{form['redirect_uri']}?{urlencode(answer)}")

    def _user_grant(self, form: Mapping[str, str], tenant: str) -> web.Response:
        """Tokens for a signed-in user: from a code (PKCE checked) or a refresh token."""
        nonce = ""
        if form.get("grant_type") == "authorization_code":
            found = self._codes.pop(form.get("code", ""), None)
            if found is None or found[0] != form.get("redirect_uri"):
                return self._aad_error(
                    400, "invalid_grant", 70000, "Provided grant is invalid or malformed."
                )
            verifier = form.get("code_verifier", "").encode()
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=")
            if challenge.decode() != found[1]:
                return self._aad_error(
                    400,
                    "invalid_grant",
                    501481,
                    "The Code_Verifier does not match the code_challenge supplied in the "
                    "authorization request.",
                )
            nonce, user = found[2], found[3]
        else:
            owner = self._refresh_tokens.get(form.get("refresh_token", ""))
            if owner is None:
                return self._aad_error(
                    400,
                    "invalid_grant",
                    50173,
                    "The provided grant has expired due to it being revoked, a fresh auth "
                    "token is needed. The user might have changed or reset their password.",
                )
            user = owner
        box = self._mailboxes[user]
        if tenant not in (*USER_AUTHORITIES, box.directory):
            return self._aad_error(
                400, "invalid_grant", 50020, f"User account '{user}' does not exist in tenant."
            )
        scopes = set(form.get("scope", "").split())
        if not scopes <= USER_SCOPES:
            return self._aad_error(
                400, "invalid_scope", 70011, f"The provided scopes {sorted(scopes)} are invalid."
            )
        token = "fake.user." + secrets.token_urlsafe(24)
        self._tokens[token] = (time.monotonic() + self.token_lifetime_s, box.directory, user)
        refresh = "0.AR" + secrets.token_urlsafe(48)
        self._refresh_tokens[refresh] = user
        oid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{box.directory}/{user}"))
        now = int(time.time())
        claims = {
            "aud": self.client_id,
            "iss": f"{self.base_url}/{box.directory}/v2.0",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "name": user.partition("@")[0].title(),
            "oid": oid,
            "preferred_username": box.address,
            "sub": hashlib.sha256(f"{oid}{self.client_id}".encode()).hexdigest()[:43],
            "tid": box.directory,
            "ver": "2.0",
            **({"nonce": nonce} if nonce else {}),
        }
        return web.json_response(
            {
                "token_type": "Bearer",
                "scope": " ".join(sorted(scopes - {"openid", "profile", "offline_access"})),
                "expires_in": self.token_lifetime_s,
                "ext_expires_in": self.token_lifetime_s,
                "access_token": token,
                "refresh_token": refresh,
                "id_token": _jwt(claims),
                "client_info": _b64(json.dumps({"uid": oid, "utid": box.directory})),
            }
        )

    # -- Graph over HTTP -----------------------------------------------------------------------

    async def _graph_http(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        self.round_trips.append((request.method, path))
        headers = {k.lower(): v for k, v in request.headers.items()}
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError:
                    return (
                        GraphError(400, "BadRequest", "Unable to read JSON request payload.")
                        .response()
                        .to_web()
                    )
        bearer = self._check_token(headers)
        if isinstance(bearer, Response):
            return bearer.to_web()
        directory, user = bearer
        req = _Request(
            request.method,
            path,
            dict(request.query),
            headers,
            body,
            time.monotonic(),
            directory=directory,
            user=user,
        )
        if path == "/organization" and request.method == "GET":
            result = self._organization(directory)
        elif path == "/$batch" and request.method == "POST":
            result = await self._batch(req)
        elif path == "/subscriptions" or path.startswith("/subscriptions/"):
            result = await self._subscriptions_api(req)
        else:
            result = await self._dispatch(req)
        announced = time.monotonic()
        for box in req.penalized:
            box.penalty_announced_at = announced
        return result.to_web()

    def _check_token(self, headers: Mapping[str, str]) -> Response | tuple[str, str | None]:
        """The token's Entra tenant and delegated user, or the 401 to answer."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        expiry, directory, user = self._tokens.get(token, (0.0, "", None))
        if scheme.lower() != "bearer" or not token:
            error = GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        elif expiry < time.monotonic():
            error = GraphError(
                401, "InvalidAuthenticationToken", "Access token validation failure."
            )
        else:
            return directory, user
        error.headers["WWW-Authenticate"] = 'Bearer realm="", error="invalid_token"'
        return error.response()

    def _mailbox(self, address: str) -> _Mailbox:
        return self._mailboxes[address.lower()]

    async def _dispatch(self, req: _Request) -> Response:
        """Routes one (possibly batched) request: auth was checked by the caller."""
        found = self._routes.find(req.method, req.path)
        if found is None:
            segment = req.path.strip("/").split("/")[0] or req.path
            return GraphError(
                400, "BadRequest", f"Resource not found for the segment '{segment}'."
            ).response()
        handler, match = found
        box = self._mailboxes.get(unquote(match.group(1)).lower())
        if box is None:
            user = unquote(match.group(1))
            return GraphError(
                404, "ErrorInvalidUser", f"The requested user '{user}' is invalid."
            ).response()
        if box.denied or not _may_reach(req, box):
            return GraphError(
                403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."
            ).response()
        return await self._metered(box, req, match, handler)

    # -- throttling and faults -----------------------------------------------------------------

    def _admit(self, box: _Mailbox, req: _Request) -> Response | None:
        """The Outlook limits: a running penalty, the request window, then concurrency.

        A request counts as ``early`` only if it was sent after its client had the 429 in hand
        (not, say, a later item of the very batch that got throttled).
        """
        now = time.monotonic()
        stats = box.stats
        stats.requests += 1
        limits = self.limits
        if now < box.penalty_until:
            announced = box.penalty_announced_at
            if announced is not None and announced <= req.arrived:
                stats.early += 1
            return self._throttled(box, req, now, math.ceil(box.penalty_until - now), None)
        while box.window and box.window[0] <= now - limits.window_s:
            box.window.popleft()
        if len(box.window) >= limits.requests:
            wait_s = max(1, math.ceil(box.window[0] + limits.window_s - now))
            return self._throttled(
                box, req, now, wait_s, "Application is over its MailboxRequests limit."
            )
        if box.in_flight >= limits.concurrency:
            return self._throttled(
                box,
                req,
                now,
                limits.concurrency_retry_after_s,
                "Application is over its MailboxConcurrency limit.",
            )
        box.window.append(now)
        stats.accepted += 1
        stats.accepted_at.append(now)
        return None

    @staticmethod
    def _throttled(
        box: _Mailbox, req: _Request, now: float, wait_s: int, message: str | None
    ) -> Response:
        if message is not None:
            box.penalty_until = now + wait_s
            box.penalty_message = message
            box.penalty_announced_at = None
            req.penalized.append(box)
        box.stats.throttled += 1
        box.stats.throttled_at.append(now)
        return GraphError(
            429, "ApplicationThrottled", box.penalty_message, {"Retry-After": str(wait_s)}
        ).response()

    def _next_fault(self, box: _Mailbox) -> Fault | None:
        if box.scripted:
            return box.scripted.popleft()
        if self.faults.fraction > 0 and self._rng.random() < self.faults.fraction:
            return self.faults.fault
        return None

    def set_faults(self, plan: FaultPlan) -> None:
        self.faults = plan
        self._rng = random.Random(plan.seed)

    async def _metered(
        self, box: _Mailbox, req: _Request, match: re.Match[str], handler: Handler
    ) -> Response:
        rejected = self._admit(box, req)
        if rejected is not None:
            return rejected
        box.in_flight += 1
        box.stats.max_concurrency = max(box.stats.max_concurrency, box.in_flight)
        try:
            if self.limits.latency_s > 0:
                await asyncio.sleep(self.limits.latency_s)
            fault = self._next_fault(box)
            if fault is not None:
                box.stats.faults += 1
                if fault.hang_s is not None:
                    await asyncio.sleep(fault.hang_s)
                headers = (
                    {} if fault.retry_after_s is None else {"Retry-After": str(fault.retry_after_s)}
                )
                code = {503: "ServiceUnavailable", 504: "GatewayTimeout"}.get(
                    fault.status, "InternalServerError"
                )
                return GraphError(fault.status, code, "Injected failure.", headers).response()
            try:
                return await handler(req, box, match)
            except GraphError as error:
                return error.response()
        finally:
            box.in_flight -= 1

    # -- events --------------------------------------------------------------------------------

    def _output_zone(self, req: _Request) -> tuple[str, dt.tzinfo]:
        found = _PREFER_TZ.search(req.headers.get("prefer", ""))
        if found:
            zone = zone_for(found.group(1))
            if zone is not None:
                return found.group(1), zone
        return "UTC", dt.UTC

    def _render(self, box: _Mailbox, event: FakeEvent, req: _Request) -> dict[str, Any]:
        zone_name, zone = self._output_zone(req)
        if event.is_all_day:
            start_text = event.start.strftime("%Y-%m-%dT00:00:00.0000000")
            end_text = event.end.strftime("%Y-%m-%dT00:00:00.0000000")
        else:
            start_text = format_graph_time(event.start.astimezone(zone))
            end_text = format_graph_time(event.end.astimezone(zone))
        props = event.props
        body = props.get("body") or {"contentType": "text", "content": ""}
        location = props.get("location") or {"displayName": ""}
        rendered: dict[str, Any] = {
            "@odata.etag": f'W/"{event.change_key}"',
            "id": event.id,
            "createdDateTime": event.created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "lastModifiedDateTime": event.modified.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "changeKey": event.change_key,
            "categories": props.get("categories") or [],
            "transactionId": event.transaction_id,
            "originalStartTimeZone": (props.get("start") or {}).get("timeZone", "UTC"),
            "originalEndTimeZone": (props.get("end") or {}).get("timeZone", "UTC"),
            "iCalUId": event.ical_uid,
            "reminderMinutesBeforeStart": props.get("reminderMinutesBeforeStart", 15),
            "isReminderOn": props.get("isReminderOn", True),
            "hasAttachments": False,
            "subject": event.subject,
            "bodyPreview": str(body.get("content") or "")[:255],
            "importance": props.get("importance") or "normal",
            "sensitivity": props.get("sensitivity") or "normal",
            "isAllDay": event.is_all_day,
            "isCancelled": False,
            "isOrganizer": True,
            "responseRequested": props.get("responseRequested", True),
            "seriesMasterId": None,
            "showAs": event.show_as,
            "type": "singleInstance",
            "webLink": f"https://outlook.office365.com/owa/?itemid={event.id}&exvsurl=1&path=/calendar/item",
            "onlineMeetingUrl": None,
            "isOnlineMeeting": False,
            "responseStatus": {"response": "organizer", "time": "0001-01-01T00:00:00Z"},
            "body": body,
            "start": {"dateTime": start_text, "timeZone": zone_name},
            "end": {"dateTime": end_text, "timeZone": zone_name},
            "location": location,
            "locations": props.get("locations")
            or ([location] if location.get("displayName") else []),
            "attendees": props.get("attendees") or [],
            "organizer": {"emailAddress": {"name": box.address, "address": box.address}},
        }
        expand = req.query.get("$expand")
        if expand:
            wanted = self._expanded_ids(expand)
            rendered["singleValueExtendedProperties"] = [
                {"id": key, "value": value}
                for key, value in event.extended.items()
                if wanted is None or key.lower() in wanted
            ]
        return rendered

    @staticmethod
    def _expanded_ids(expand: str) -> set[str] | None:
        match = _EXPAND.match(expand)
        if match is None:
            raise GraphError(400, "BadRequest", f"Parsing OData Select and Expand failed: {expand}")
        inner = match.group(1)
        if not inner:
            return None
        return {_unquote_odata(q).lower() for q in _QUOTED.findall(inner)}

    def _validated_event(
        self, body: Any, current: FakeEvent | None
    ) -> tuple[dict[str, Any], dt.datetime, dt.datetime, bool, dict[str, str]]:
        """Checks a create/patch body like Graph; returns the merged props and their meaning."""
        props = _check_body(body, EVENT_PROPERTIES, "microsoft.graph.event")
        merged = dict(current.props) if current else {}
        merged.update(
            {
                k: v
                for k, v in props.items()
                if k not in ("transactionId", "singleValueExtendedProperties")
            }
        )
        for required in ("start", "end"):
            if not isinstance(merged.get(required), dict):
                raise GraphError(
                    400,
                    "ErrorInvalidRequest",
                    f"Your request can't be completed. '{required}' is required.",
                )
        start = parse_date_time_time_zone(merged["start"], "start")
        end = parse_date_time_time_zone(merged["end"], "end")
        all_day = bool(merged.get("isAllDay"))
        if all_day and (
            start.timetz().replace(tzinfo=None) != dt.time()
            or end.timetz().replace(tzinfo=None) != dt.time()
        ):
            raise GraphError(
                400, "ErrorPropertyValidationFailure", "At least one property failed validation."
            )
        if end < start or (all_day and end <= start):
            raise GraphError(
                400,
                "ErrorInvalidRequest",
                "Your request can't be completed. The end date of the event must be later "
                "than the start date.",
            )
        extended = dict(current.extended) if current else {}
        for item in props.get("singleValueExtendedProperties") or []:
            key, value = item.get("id"), item.get("value")
            if not isinstance(key, str) or not _EXTENDED_ID.match(key) or value is None:
                raise GraphError(
                    400, "ErrorInvalidProperty", f"The extended property id '{key}' is not valid."
                )
            extended[key] = value
        return merged, start, end, all_day, extended

    def _store(
        self,
        box: _Mailbox,
        props: dict[str, Any],
        start: dt.datetime,
        end: dt.datetime,
        all_day: bool,
        extended: dict[str, str],
        transaction_id: str | None,
    ) -> FakeEvent:
        now = dt.datetime.now(dt.UTC)
        event = FakeEvent(
            id=_new_id(),
            change_key=_new_change_key(),
            ical_uid="040000008200E00074C5B7101A82E008" + secrets.token_hex(28).upper(),
            created=now,
            modified=now,
            props=props,
            start=start,
            end=end,
            is_all_day=all_day,
            extended=extended,
            transaction_id=transaction_id,
        )
        box.events[event.id] = event
        if transaction_id:
            box.by_transaction[transaction_id] = event.id
        self._changed(box, event.id, "created")
        return event

    async def _create_event(
        self, req: _Request, box: _Mailbox | None, _m: re.Match[str]
    ) -> Response:
        assert box is not None
        transaction_id = req.body.get("transactionId") if isinstance(req.body, dict) else None
        props, start, end, all_day, extended = self._validated_event(req.body, None)
        if isinstance(transaction_id, str) and transaction_id in box.by_transaction:
            existing = box.events[box.by_transaction[transaction_id]]
            return Response(201, self._render(box, existing, req))
        event = self._store(box, props, start, end, all_day, extended, transaction_id)
        return Response(201, self._render(box, event, req))

    def _event(self, box: _Mailbox, match: re.Match[str]) -> FakeEvent:
        event = box.events.get(unquote(match.group(2)))
        if event is None:
            raise GraphError(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        return event

    async def _get_event(
        self, req: _Request, box: _Mailbox | None, match: re.Match[str]
    ) -> Response:
        assert box is not None
        return Response(200, self._render(box, self._event(box, match), req))

    async def _patch_event(
        self, req: _Request, box: _Mailbox | None, match: re.Match[str]
    ) -> Response:
        assert box is not None
        event = self._event(box, match)
        self.patch_bodies.append((event.id, req.body))
        props, start, end, all_day, extended = self._validated_event(req.body, event)
        event.props, event.start, event.end, event.is_all_day = props, start, end, all_day
        event.extended = extended
        event.change_key = _new_change_key()
        event.modified = dt.datetime.now(dt.UTC)
        self._changed(box, event.id, "updated")
        return Response(200, self._render(box, event, req))

    async def _delete_event(
        self, req: _Request, box: _Mailbox | None, match: re.Match[str]
    ) -> Response:
        assert box is not None
        event = self._event(box, match)
        del box.events[event.id]
        if event.transaction_id:
            box.by_transaction.pop(event.transaction_id, None)
        self._changed(box, event.id, "deleted")
        return Response(204)

    def _page(self, req: _Request, items: list[dict[str, Any]], context: str) -> Response:
        try:
            top = int(req.query.get("$top", GRAPH_PAGE_SIZE_DEFAULT))
            skip = int(req.query.get("$skip", 0))
        except ValueError as exc:
            raise GraphError(400, "BadRequest", "Invalid $top or $skip.") from exc
        if not 1 <= top <= GRAPH_PAGE_SIZE_MAX or skip < 0:
            raise GraphError(400, "BadRequest", f"Invalid page size {top}.")
        body: dict[str, Any] = {
            "@odata.context": f"{self.graph_url}/$metadata#{context}",
            "value": items[skip : skip + top],
        }
        if skip + top < len(items):
            query = {**req.query, "$top": str(top), "$skip": str(skip + top)}
            body["@odata.nextLink"] = f"{self.graph_url}{req.path}?{urlencode(query)}"
        return Response(200, body)

    @staticmethod
    def _ordered(events: list[FakeEvent]) -> list[FakeEvent]:
        return sorted(events, key=lambda e: (e.start, e.created))

    async def _list_events(
        self, req: _Request, box: _Mailbox | None, _m: re.Match[str]
    ) -> Response:
        assert box is not None
        events = list(box.events.values())
        text = req.query.get("$filter")
        if text:
            match = _ANY_FILTER.match(text)
            if match is None:
                raise GraphError(
                    400, "ErrorInvalidUrlQueryFilter", f"Invalid filter clause: {text}"
                )
            key, value = _unquote_odata(match.group(2)).lower(), _unquote_odata(match.group(3))
            events = [
                e
                for e in events
                if any(k.lower() == key and v == value for k, v in e.extended.items())
            ]
        rendered = [self._render(box, e, req) for e in self._ordered(events)]
        return self._page(req, rendered, f"users('{box.address}')/events")

    async def _calendar_view(
        self, req: _Request, box: _Mailbox | None, _m: re.Match[str]
    ) -> Response:
        assert box is not None
        begin, finish = _window(req)
        hits = [e for e in box.events.values() if e.start < finish and e.end > begin]
        rendered = [self._render(box, e, req) for e in self._ordered(hits)]
        return self._page(req, rendered, f"users('{box.address}')/calendarView")

    async def _automatic_replies(
        self, req: _Request, box: _Mailbox | None, _m: re.Match[str]
    ) -> Response:
        assert box is not None
        body = {
            "@odata.context": f"{self.graph_url}/$metadata#users('{box.address}')"
            "/mailboxSettings/automaticRepliesSetting",
            **box.auto_replies,
        }
        return Response(200, body)

    async def _get_schedule(
        self, req: _Request, box: _Mailbox | None, _m: re.Match[str]
    ) -> Response:
        assert box is not None
        body = _check_body(req.body, GET_SCHEDULE_PROPERTIES, "microsoft.graph.getSchedule")
        schedules = body.get("schedules")
        if not schedules or len(schedules) > GET_SCHEDULE_MAX_SCHEDULES:
            raise GraphError(
                400, "ErrorInvalidParameter", "schedules must list 1 to 100 addresses."
            )
        for required in ("startTime", "endTime"):
            if not isinstance(body.get(required), dict):
                raise GraphError(400, "ErrorInvalidParameter", f"'{required}' is required.")
        begin = parse_date_time_time_zone(body["startTime"], "startTime")
        finish = parse_date_time_time_zone(body["endTime"], "endTime")
        interval_min = body.get("availabilityViewInterval") or 30
        if not 5 <= interval_min <= 1440 or finish <= begin:
            raise GraphError(400, "ErrorInvalidParameter", "Invalid time window or interval.")
        zone_name, zone = self._output_zone(req)
        answers = []
        for address in schedules:
            other = self._mailboxes.get(address.lower())
            if other is None:
                answers.append(
                    {
                        "scheduleId": address,
                        "availabilityView": "",
                        "error": {
                            "message": "The user's mailbox couldn't be found.",
                            "responseCode": "ErrorMailRecipientNotFound",
                        },
                    }
                )
                continue
            hits = self._ordered(
                [e for e in other.events.values() if e.start < finish and e.end > begin]
            )
            answers.append(
                {
                    "scheduleId": address,
                    "availabilityView": _availability_view(hits, begin, finish, interval_min),
                    "scheduleItems": [
                        {
                            "isPrivate": False,
                            "status": e.show_as,
                            "subject": e.subject,
                            "location": str(
                                (e.props.get("location") or {}).get("displayName") or ""
                            ),
                            "start": {
                                "dateTime": format_graph_time(e.start.astimezone(zone)),
                                "timeZone": zone_name,
                            },
                            "end": {
                                "dateTime": format_graph_time(e.end.astimezone(zone)),
                                "timeZone": zone_name,
                            },
                        }
                        for e in hits
                    ],
                    "workingHours": {
                        "daysOfWeek": ["monday", "tuesday", "wednesday", "thursday", "friday"],
                        "startTime": "08:00:00.0000000",
                        "endTime": "17:00:00.0000000",
                        "timeZone": {"name": other.timezone},
                    },
                }
            )
        return Response(
            200,
            {
                "@odata.context": f"{self.graph_url}/$metadata"
                "#Collection(microsoft.graph.scheduleInformation)",
                "value": answers,
            },
        )

    # -- $batch --------------------------------------------------------------------------------

    async def _batch(self, req: _Request) -> Response:
        """JSON batching: ≤ 20 relative requests, each routed, throttled and answered alone."""
        try:
            items = self._batch_items(req.body)
        except GraphError as error:
            return error.response()
        answers: dict[str, Response] = {}
        if any(item.get("dependsOn") for item in items):
            for item in items:
                failed = [
                    d
                    for d in item.get("dependsOn") or []
                    if answers.get(d, Response(424)).status >= 400
                ]
                if failed:
                    answers[item["id"]] = GraphError(
                        424, "FailedDependency", "A dependency failed."
                    ).response()
                else:
                    answers[item["id"]] = await self._dispatch(self._sub_request(item, req))
        else:
            lanes: dict[str, asyncio.Semaphore] = {}

            async def run(item: dict[str, Any]) -> None:
                sub = self._sub_request(item, req)
                parts = sub.path.strip("/").split("/")
                lane = parts[1].lower() if len(parts) > 1 and parts[0] == "users" else ""
                gate = lanes.setdefault(lane, asyncio.Semaphore(max(1, self.limits.concurrency)))
                async with gate:
                    answers[item["id"]] = await self._dispatch(sub)

            await asyncio.gather(*(run(item) for item in items))
        responses = []
        for item in reversed(items):  # Graph answers in no particular order; clients map by id.
            answer = answers[item["id"]]
            entry: dict[str, Any] = {
                "id": item["id"],
                "status": answer.status,
                "headers": {"Content-Type": "application/json", **answer.headers},
            }
            if answer.body is not None:
                entry["body"] = answer.body
            responses.append(entry)
        return Response(200, {"responses": responses})

    @staticmethod
    def _batch_items(body: Any) -> list[dict[str, Any]]:
        if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
            raise GraphError(400, "BadRequest", "Invalid batch payload format.")
        items = body["requests"]
        if not items:
            raise GraphError(400, "BadRequest", "Invalid batch payload format.")
        if len(items) > GRAPH_BATCH_MAX:
            raise GraphError(
                400,
                "BadRequest",
                f"Number of batch requests exceeds the limit of {GRAPH_BATCH_MAX}.",
            )
        seen: set[str] = set()
        for item in items:
            if not isinstance(item, dict) or not all(
                isinstance(item.get(k), str) for k in ("id", "method", "url")
            ):
                raise GraphError(400, "BadRequest", "Each batch request needs id, method and url.")
            if item["id"] in seen:
                raise GraphError(
                    400, "BadRequest", f"Batch request id '{item['id']}' is duplicated."
                )
            seen.add(item["id"])
            if "://" in item["url"]:
                raise GraphError(400, "BadRequest", "Invalid request URL: batch URLs are relative.")
            headers = {k.lower(): v for k, v in (item.get("headers") or {}).items()}
            if item["method"].upper() in ("POST", "PATCH", "PUT") and (
                "body" not in item or "content-type" not in headers
            ):
                raise GraphError(
                    400,
                    "BadRequest",
                    f"Write request id : {item['id']} does not contain Content-Type header "
                    "or body.",
                )
            unknown = [d for d in item.get("dependsOn") or [] if d not in seen - {item["id"]}]
            if unknown:
                raise GraphError(400, "BadRequest", f"dependsOn names unknown ids {unknown}.")
        return list(items)

    @staticmethod
    def _sub_request(item: dict[str, Any], outer: _Request) -> _Request:
        url = "/" + item["url"].lstrip("/")
        path, _, query_text = url.partition("?")
        query: dict[str, str] = {}
        for pair in query_text.split("&") if query_text else []:
            key, _, value = pair.partition("=")
            query[unquote(key)] = unquote(value.replace("+", " "))
        headers = {k.lower(): str(v) for k, v in (item.get("headers") or {}).items()}
        return _Request(
            item["method"].upper(),
            path,
            query,
            headers,
            item.get("body"),
            outer.arrived,
            outer.penalized,
            outer.directory,
            outer.user,
        )

    # -- change notifications and delta (test accessors first) ---------------------------------

    def subscriptions(self, mailbox: str | None = None) -> list[FakeSubscription]:
        """Copies of the live subscriptions (of one mailbox, if given)."""
        return [
            copy.copy(s)
            for s in self._subscriptions.values()
            if mailbox is None or s.mailbox.lower() == mailbox.lower()
        ]

    async def user_move_event(
        self,
        address: str,
        event_id: str,
        start: dt.datetime,
        end: dt.datetime,
        *,
        subject: str | None = None,
    ) -> list[Delivery]:
        """The user drags an event (and maybe renames it) in Outlook; returns the
        notifications delivered to the subscribers, once they answered."""
        box = self._mailbox(address)
        event = box.events[event_id]
        zone_name = str((event.props.get("start") or {}).get("timeZone") or "UTC")
        zone = zone_for(zone_name) or dt.UTC
        event.start, event.end = start, end
        event.props["start"] = {
            "dateTime": format_graph_time(start.astimezone(zone)),
            "timeZone": zone_name,
        }
        event.props["end"] = {
            "dateTime": format_graph_time(end.astimezone(zone)),
            "timeZone": zone_name,
        }
        if subject is not None:
            event.props["subject"] = subject
        event.change_key = _new_change_key()
        event.modified = dt.datetime.now(dt.UTC)
        self._log_change(box, event_id)
        return await self._notify(box, event_id, "updated")

    async def user_delete_event(self, address: str, event_id: str) -> list[Delivery]:
        """The user deletes an event in Outlook; returns the notifications delivered."""
        box = self._mailbox(address)
        event = box.events.pop(event_id)
        if event.transaction_id:
            box.by_transaction.pop(event.transaction_id, None)
        self._log_change(box, event_id)
        return await self._notify(box, event_id, "deleted")

    async def send_lifecycle(self, subscription_id: str, lifecycle_event: str) -> Delivery:
        """A lifecycle notification (``reauthorizationRequired``, ``subscriptionRemoved``,
        ``missed``) to the subscription's lifecycle URL; ``subscriptionRemoved`` also ends it."""
        sub = self._subscriptions[subscription_id]
        body = {
            "value": [
                {
                    "subscriptionId": sub.id,
                    "subscriptionExpirationDateTime": _graph_instant(sub.expires),
                    "tenantId": self.tenant_id,
                    "clientState": sub.client_state,
                    "lifecycleEvent": lifecycle_event,
                }
            ]
        }
        if lifecycle_event == "subscriptionRemoved":
            del self._subscriptions[sub.id]
        delivery, _, _ = await self._post(
            "lifecycle", sub.lifecycle_url or sub.notification_url, body
        )
        return delivery

    def expire_delta_tokens(self, address: str) -> None:
        """Every delta and skip token of the mailbox answers 410 SyncStateNotFound from now on."""
        self._mailbox(address).delta_generation += 1

    async def drain_notifications(self) -> None:
        """Waits for the notifications of API changes, which are sent in the background."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _log_change(self, box: _Mailbox, event_id: str) -> None:
        self._seq += 1
        box.changes.append((self._seq, event_id))

    def _changed(self, box: _Mailbox, event_id: str, change_type: str) -> None:
        """An API change: logged for delta, notified in the background like Graph does."""
        self._log_change(box, event_id)
        if self._watching(box):
            self._spawn(self._notify(box, event_id, change_type))

    def _watching(self, box: _Mailbox) -> list[FakeSubscription]:
        now = dt.datetime.now(dt.UTC)
        return [
            s
            for s in self._subscriptions.values()
            if s.mailbox.lower() == box.address.lower() and s.expires > now
        ]

    async def _notify(self, box: _Mailbox, event_id: str, change_type: str) -> list[Delivery]:
        delivered = []
        for sub in self._watching(box):
            if change_type not in sub.change_type.split(","):
                continue
            resource = f"Users/{box.address}/Events/{event_id}"
            event = box.events.get(event_id)
            item = {
                "subscriptionId": sub.id,
                "subscriptionExpirationDateTime": _graph_instant(sub.expires),
                "changeType": change_type,
                "resource": resource,
                "resourceData": {
                    "@odata.type": "#Microsoft.Graph.Event",
                    "@odata.id": resource,
                    "@odata.etag": f'W/"{event.change_key}"' if event else None,
                    "id": event_id,
                },
                "clientState": sub.client_state,
                "tenantId": self.tenant_id,
            }
            delivery, _, _ = await self._post(
                "notification", sub.notification_url, {"value": [item]}
            )
            delivered.append(delivery)
        return delivered

    async def _post(
        self,
        kind: str,
        url: str,
        body: Any,
        *,
        validation_token: str | None = None,
        timeout_s: float = NOTIFICATION_TIMEOUT_S,
    ) -> tuple[Delivery, str, str]:
        """POSTs to a subscriber; returns the record, the answer's media type and text."""
        assert self._http is not None, "start() the fake first"
        started = time.monotonic()
        status: int | None = None
        media_type, text = "", ""
        kwargs: dict[str, Any] = (
            {"json": body}
            if body is not None
            else {"data": b"", "headers": {"Content-Type": "text/plain; charset=utf-8"}}
        )
        if validation_token is not None:
            kwargs["params"] = {"validationToken": validation_token}
        try:
            async with self._http.post(
                url, timeout=aiohttp.ClientTimeout(total=timeout_s), **kwargs
            ) as response:
                status = response.status
                media_type = response.content_type
                text = await response.text()
        except (TimeoutError, aiohttp.ClientError):
            status = None
        delivery = Delivery(kind, url, status, time.monotonic() - started, body)
        self.deliveries.append(delivery)
        return delivery, media_type, text

    async def _validate_url(self, url: str) -> bool:
        """Graph's handshake: the token must come back as text/plain within the time limit."""
        token = (
            "Validation: Testing client application reachability for subscription "
            f"Request-Id: {uuid.uuid4()}"
        )
        delivery, media_type, text = await self._post(
            "validation", url, None, validation_token=token, timeout_s=self.validation_timeout_s
        )
        return delivery.status == 200 and media_type == "text/plain" and text == token

    def _subscription_json(self, sub: FakeSubscription) -> dict[str, Any]:
        return {
            "@odata.context": f"{self.graph_url}/$metadata#subscriptions/$entity",
            "id": sub.id,
            "resource": sub.resource,
            "applicationId": self.client_id,
            "changeType": sub.change_type,
            "clientState": sub.client_state,
            "notificationUrl": sub.notification_url,
            "lifecycleNotificationUrl": sub.lifecycle_url,
            "expirationDateTime": _graph_instant(sub.expires),
            "creatorId": str(uuid.uuid5(uuid.NAMESPACE_URL, self.client_id)),
            "latestSupportedTlsVersion": "v1_2",
            "notificationContentType": "application/json",
            "includeResourceData": False,
        }

    @staticmethod
    def _expiry(value: Any) -> dt.datetime:
        parsed = _parse_graph_instant(value) if isinstance(value, str) else None
        if parsed is None:
            raise GraphError(
                400, "InvalidRequest", "expirationDateTime is required and must be a date."
            )
        now = dt.datetime.now(dt.UTC)
        if parsed <= now or parsed > now + dt.timedelta(minutes=SUBSCRIPTION_MAX_MIN + 1):
            raise GraphError(
                400,
                "InvalidRequest",
                f"Subscription expiration can only be {SUBSCRIPTION_MAX_MIN} minutes "
                "in the future.",
            )
        return parsed

    async def _subscriptions_api(self, req: _Request) -> Response:
        parts = req.path.strip("/").split("/")
        try:
            if len(parts) == 1 and req.method == "POST":
                return await self._create_subscription(req)
            if len(parts) == 1 and req.method == "GET":
                return Response(
                    200,
                    {"value": [self._subscription_json(s) for s in self._subscriptions.values()]},
                )
            sub = self._subscriptions.get(unquote(parts[1])) if len(parts) == 2 else None
            if sub is None:
                raise GraphError(404, "ResourceNotFound", "The object was not found.")
            if req.method == "GET":
                return Response(200, self._subscription_json(sub))
            if req.method == "DELETE":
                del self._subscriptions[sub.id]
                return Response(204)
            if req.method == "PATCH":
                body = req.body if isinstance(req.body, dict) else {}
                expires = self._expiry(body.get("expirationDateTime"))
                if not await self._validate_url(sub.notification_url):
                    raise GraphError(
                        400,
                        "ValidationError",
                        "Subscription validation request failed. Notification endpoint must "
                        "respond with 200 OK to validation request.",
                    )
                sub.expires = expires
                sub.renewals += 1
                return Response(200, self._subscription_json(sub))
            raise GraphError(405, "MethodNotAllowed", "The method is not allowed.")
        except GraphError as error:
            return error.response()

    async def _create_subscription(self, req: _Request) -> Response:
        body = req.body if isinstance(req.body, dict) else {}
        change_type = body.get("changeType")
        if not isinstance(change_type, str) or not set(change_type.split(",")) <= {
            "created",
            "updated",
            "deleted",
        }:
            raise GraphError(400, "InvalidRequest", "changeType is invalid.")
        resource = body.get("resource")
        match = _SUBSCRIPTION_RESOURCE.match(resource) if isinstance(resource, str) else None
        if match is None:
            raise GraphError(400, "InvalidRequest", f"Resource '{resource}' is not supported.")
        box = self._mailboxes.get(unquote(match.group(1)).lower())
        if box is None:
            raise GraphError(404, "ErrorInvalidUser", "The requested user is invalid.")
        if not _may_reach(req, box):
            raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials.")
        urls = []
        for name in ("notificationUrl", "lifecycleNotificationUrl"):
            url = body.get(name)
            if url is None and name == "lifecycleNotificationUrl":
                continue
            if not isinstance(url, str) or not url.startswith(("https://", "http://127.0.0.1")):
                raise GraphError(400, "InvalidRequest", f"{name} must be an https URL.")
            urls.append(url)
        client_state = body.get("clientState")
        if client_state is not None and (
            not isinstance(client_state, str) or len(client_state) > CLIENT_STATE_MAX_CHARS
        ):
            raise GraphError(400, "InvalidRequest", "clientState is longer than 128 characters.")
        expires = self._expiry(body.get("expirationDateTime"))
        for url in dict.fromkeys(urls):
            if not await self._validate_url(url):
                raise GraphError(
                    400,
                    "ValidationError",
                    "Subscription validation request failed. Notification endpoint must respond "
                    "with 200 OK to validation request.",
                )
        sub = FakeSubscription(
            id=str(uuid.uuid4()),
            mailbox=box.address,
            resource=resource if isinstance(resource, str) else "",
            change_type=change_type,
            notification_url=urls[0],
            lifecycle_url=urls[1] if len(urls) > 1 else None,
            client_state=client_state,
            expires=expires,
        )
        self._subscriptions[sub.id] = sub
        return Response(201, self._subscription_json(sub))

    async def _calendar_view_delta(
        self, req: _Request, box: _Mailbox | None, _m: re.Match[str]
    ) -> Response:
        assert box is not None
        skip, token = req.query.get("$skiptoken"), req.query.get("$deltatoken")
        if skip is not None:
            pending = self._skip_tokens.pop(skip, None)
            if pending is None or pending[1].generation != box.delta_generation:
                raise _sync_state_not_found(self, box)
            ids, state, full = pending
        elif token is not None:
            old = self._delta_tokens.get(token)
            if old is None or old.generation != box.delta_generation or old.mailbox != box.address:
                raise _sync_state_not_found(self, box)
            ids = list(dict.fromkeys(e for seq, e in box.changes if seq > old.seq))
            state = _DeltaState(box.address, old.begin, old.finish, self._seq, box.delta_generation)
            full = False
        else:
            begin, finish = _window(req)
            hits = [e for e in box.events.values() if e.start < finish and e.end > begin]
            ids = [e.id for e in self._ordered(hits)]
            state = _DeltaState(box.address, begin, finish, self._seq, box.delta_generation)
            full = True
            self.full_delta_rounds += 1
        size = self._delta_page_size(req)
        page, rest = ids[:size], ids[size:]
        base = f"{self.graph_url}/users/{box.address}/calendarView/delta"
        body: dict[str, Any] = {
            "@odata.context": f"{self.graph_url}/$metadata#Collection(event)",
            "value": [self._delta_item(box, event_id, state, req, full) for event_id in page],
        }
        if rest:
            next_token = secrets.token_urlsafe(24)
            self._skip_tokens[next_token] = (rest, state, full)
            body["@odata.nextLink"] = f"{base}?$skiptoken={next_token}"
        else:
            next_token = secrets.token_urlsafe(24)
            self._delta_tokens[next_token] = state
            body["@odata.deltaLink"] = f"{base}?$deltatoken={next_token}"
        return Response(200, body)

    def _delta_page_size(self, req: _Request) -> int:
        found = re.search(r"odata\.maxpagesize\s*=\s*(\d+)", req.headers.get("prefer", ""))
        return max(1, int(found.group(1))) if found else self.delta_page_size

    def _delta_item(
        self, box: _Mailbox, event_id: str, state: _DeltaState, req: _Request, full: bool
    ) -> dict[str, Any]:
        event = box.events.get(event_id)
        if event is None or not (event.start < state.finish and event.end > state.begin):
            return {
                "@odata.type": "#microsoft.graph.event",
                "id": event_id,
                "@removed": {"reason": "deleted"},
            }
        return self._render(box, event, req)


def _may_reach(req: _Request, box: _Mailbox) -> bool:
    """An app token reaches its own directory's mailboxes; a delegated token only its user's."""
    return box.directory == req.directory and req.user in (None, box.address.lower())


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def _jwt(claims: Mapping[str, Any]) -> str:
    """An ID token as Entra shapes it; nobody checks the signature of one that came straight
    from the token endpoint over TLS."""
    header = {"typ": "JWT", "alg": "RS256", "kid": "fake-signing-key"}
    return f"{_b64(json.dumps(header))}.{_b64(json.dumps(claims))}.c2ln"


def _sync_state_not_found(fake: FakeGraph, box: _Mailbox) -> GraphError:
    fake.stale_delta_answers += 1
    return GraphError(
        410,
        "SyncStateNotFound",
        f"The sync state generation is not found; generation={box.delta_generation - 1};"
        f"[highest={box.delta_generation}].",
    )


def _graph_instant(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.0000000Z")


def _parse_graph_instant(text: str) -> dt.datetime | None:
    """``2027-06-16T07:00:00.0000000Z`` (seven fraction digits, like Graph writes them)."""
    head, dot, rest = text.replace("Z", "+00:00").partition(".")
    if dot:
        digits = "".join(c for c in rest if c.isdigit())
        head = f"{head}.{digits[:6]}{rest[len(digits) :]}"
    try:
        parsed = dt.datetime.fromisoformat(head)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _window(req: _Request) -> tuple[dt.datetime, dt.datetime]:
    """calendarView's required ``startDateTime`` / ``endDateTime``."""
    bounds = []
    for name in ("startDateTime", "endDateTime"):
        raw = req.query.get(name)
        parsed = _parse_instant(raw) if raw else None
        if parsed is None:
            raise GraphError(
                400,
                "ErrorInvalidParameter",
                "This request requires a time window specified by the query string "
                "parameters StartDateTime and EndDateTime.",
            )
        bounds.append(parsed)
    return bounds[0], bounds[1]


def _parse_instant(text: str) -> dt.datetime | None:
    """calendarView bounds: ISO 8601, an offset or ``Z``, or none (then UTC)."""
    parsed = _parse_local(text.replace("Z", "+00:00"))
    if parsed is None:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _availability_view(
    events: list[FakeEvent], begin: dt.datetime, finish: dt.datetime, interval_min: int
) -> str:
    step = dt.timedelta(minutes=interval_min)
    digits = []
    slot = begin
    while slot < finish:
        statuses = {e.show_as for e in events if e.start < slot + step and e.end > slot}
        winner = next((s for s in STATUS_PRECEDENCE if s in statuses), "free")
        digits.append(AVAILABILITY_DIGIT[winner])
        slot += step
    return "".join(digits)


@asynccontextmanager
async def running_fake_graph(**kwargs: Any) -> AsyncIterator[FakeGraph]:
    """A started fake with its certificate in a temporary folder; stopped on exit."""
    fake = FakeGraph(**kwargs)
    with tempfile.TemporaryDirectory(prefix="fake-graph-") as folder:
        await fake.start(Path(folder))
        try:
            yield fake
        finally:
            await fake.stop()
