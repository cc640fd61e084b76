"""A faithful local fake of the Google Calendar API v3 and Google's OAuth token endpoint.

The real ``google-api-python-client`` and ``google-auth`` talk to it unchanged: point
``api_endpoint`` at :attr:`FakeGoogle.api_url` and ``token_uri`` at :attr:`FakeGoogle.token_url`.
It behaves as Google does where syncsvc depends on it: client-chosen base32hex ids with
``409 duplicate``, deleted events lingering as ``cancelled`` (``410 deleted``), private extended
properties, incremental sync tokens (``410 fullSyncRequired``), free/busy, multipart batches whose
parts are metered one by one, per-user rate limits answered with ``403``/``429`` and no
``Retry-After``, and bodies validated against the schemas of the ``calendar.v3.json`` discovery
document that ships inside ``googleapiclient``.

Push channels (``events.watch`` / ``channels.stop``) deliver real HTTP notifications to the
channel's address, as Google does: a ``sync`` message right after the channel is created, then
``exists`` after changes to the watched calendar (several quick changes coalesce into one
message), each with an empty body and the ``X-Goog-*`` headers; expired and stopped channels
fall silent. Every delivery is recorded in :attr:`FakeGoogle.deliveries`.

Routes live in :data:`_ROUTES` (method, path regex, handler).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import email.parser
import email.policy
import email.utils
import hashlib
import html
import json
import random
import re
import secrets
import time
import urllib.parse
import zoneinfo
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import cache
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
import googleapiclient
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import exceptions as google_auth_exceptions
from google.auth import jwt as google_jwt

from tests.fakes._server import FakeServer, Response, Routes

#: google-auth always signs service-account assertions for this audience, whatever token_uri is.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
CALENDAR_SCOPE = "https://www.googleapis.com/auth/calendar"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
BATCH_MAX_PARTS = 1000
LIST_DEFAULT_RESULTS = 250
LIST_MAX_RESULTS = 2500
REMINDER_MAX_OVERRIDES = 5
REMINDER_MAX_MINUTES = 40320
EVENT_ID_RE = re.compile(r"^[a-v0-9]{5,1024}$")
RFC3339_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(?P<offset>Z|z|[+-]\d{2}:\d{2})?$"
)
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
EVENT_TYPES = frozenset(
    {"default", "outOfOffice", "focusTime", "workingLocation", "fromGmail", "birthday"}
)
EVENT_ENUMS: Mapping[str, frozenset[str]] = {
    "status": frozenset({"confirmed", "tentative", "cancelled"}),
    "transparency": frozenset({"opaque", "transparent"}),
    "visibility": frozenset({"default", "public", "private", "confidential"}),
    "eventType": EVENT_TYPES,
}
#: Query parameters that Google refuses next to a syncToken.
SYNC_TOKEN_EXCLUSIVE_PARAMS = (
    "iCalUID",
    "orderBy",
    "privateExtendedProperty",
    "q",
    "sharedExtendedProperty",
    "timeMin",
    "timeMax",
    "updatedMin",
)
STATUS_NAMES: Mapping[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    410: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
JSON_TYPE = "application/json; charset=UTF-8"
#: Channel ids: at most 64 characters of this alphabet (Google's push guide).
CHANNEL_ID_RE = re.compile(r"^[A-Za-z0-9\-_+/=]{1,64}$")
CHANNEL_TOKEN_MAX_CHARS = 256
CHANNEL_TYPES = frozenset({"web_hook", "webhook"})
#: Hosts a channel address may use plain http for (Google itself insists on https).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
NOTIFY_TIMEOUT_S = 10.0
RATE_LIMIT_MESSAGES = {"userRateLimitExceeded": "User Rate Limit Exceeded"}


@cache
def discovery_document() -> dict[str, Any]:
    """The calendar.v3 discovery document the installed client library builds from."""
    path = (
        Path(googleapiclient.__file__).parent / "discovery_cache" / "documents" / "calendar.v3.json"
    )
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return doc


@cache
def _known_time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) | {"UTC"}


# --------------------------------------------------------------------------------------------
# Configuration, stats and the state tests can reach directly.


@dataclass(slots=True)
class FakeGoogleConfig:
    """Knobs tests turn; the defaults are Google's published per-user figures."""

    quota_requests: int = 600
    quota_window_s: float = 60.0
    #: ``403`` (with ``throttle_reason``) or ``429`` (always ``rateLimitExceeded``).
    throttle_status: int = 403
    throttle_reason: str = "rateLimitExceeded"
    #: Requests per project before ``403 quotaExceeded`` (the daily quota); ``None`` = unlimited.
    project_daily_requests: int | None = None
    access_token_lifetime_s: int = 3600
    #: Lifetime of a channel that asks for none, and the longest one granted (a longer
    #: requested ``expiration`` is cut to it).
    channel_default_ttl_s: float = 7 * 24 * 3600.0
    channel_max_ttl_s: float = 30 * 24 * 3600.0


@dataclass(slots=True)
class FailureMode:
    """Injected trouble: a ``fraction`` of API calls fail with ``status`` or hang ``hang_s``."""

    fraction: float
    status: int = 503
    reason: str = "backendError"
    hang_s: float | None = None


@dataclass(slots=True)
class UserStats:
    """What one user's traffic looked like at the fake, for assertions on rates."""

    #: API calls, each batch part counted on its own (Google meters them so).
    requests: int = 0
    #: HTTP round trips that carried this user's calls (a batch is one).
    http_requests: int = 0
    throttled: int = 0
    failures_injected: int = 0
    request_times: list[float] = field(default_factory=list)
    throttled_times: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """One successful token request: which grant and whom the token speaks for."""

    grant_type: str
    client: str
    subject: str


@dataclass(slots=True)
class Channel:
    """A push channel on one user's primary calendar, as created by ``events.watch``."""

    id: str
    resource_id: str
    resource_uri: str
    user: str
    address: str
    token: str | None
    expiration_ms: int
    message_number: int = 0
    stopped: bool = False

    def active(self, now_ms: int) -> bool:
        return not self.stopped and now_ms < self.expiration_ms


@dataclass(frozen=True, slots=True)
class Delivery:
    """One notification POSTed to a channel address and what the receiver answered."""

    channel_id: str
    state: str
    message_number: int
    #: HTTP status of the answer; 0 when the address could not be reached.
    status: int
    elapsed_s: float


@dataclass(slots=True)
class _ServiceAccount:
    client_email: str
    public_key_pem: str
    #: Domains the account may impersonate users of (domain-wide delegation); ``None`` = any.
    delegated_domains: frozenset[str] | None


@dataclass(slots=True)
class _Calendar:
    calendar_id: str
    owner: str
    time_zone: str = "UTC"
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Change sequence number of each event (for sync tokens).
    changed_at: dict[str, int] = field(default_factory=dict)
    seq: int = 0
    #: Raised to invalidate every sync token issued so far.
    token_epoch: int = 0


class _ApiError(Exception):
    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        domain: str = "global",
        location: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.domain = domain
        self.location = location

    def body(self) -> dict[str, Any]:
        item: dict[str, Any] = {
            "domain": self.domain,
            "reason": self.reason,
            "message": self.message,
        }
        if self.location is not None:
            item["locationType"] = "parameter"
            item["location"] = self.location
        error: dict[str, Any] = {"code": self.status, "message": self.message, "errors": [item]}
        if self.status in STATUS_NAMES:
            error["status"] = STATUS_NAMES[self.status]
        return {"error": error}


def _invalid(message: str, reason: str = "invalid") -> _ApiError:
    return _ApiError(400, reason, message)


def _time_range_empty() -> _ApiError:
    return _ApiError(400, "timeRangeEmpty", "The specified time range is empty.", domain="calendar")


def _json(status: int, payload: Mapping[str, Any]) -> Response:
    """A JSON answer, its media type spelt as Google does."""
    return Response(status, payload, content_type=JSON_TYPE)


@dataclass(frozen=True, slots=True)
class _Call:
    """One API call, from a plain HTTP request or from a batch part."""

    user: str
    method: str
    path: str
    query: Mapping[str, list[str]]
    body: bytes


# --------------------------------------------------------------------------------------------
# Schema validation against the discovery document.


def _validate(value: Any, schema: Mapping[str, Any], path: str) -> None:
    """Refuses what Google's JSON parser refuses: unknown fields, wrong types, bad formats."""
    if "$ref" in schema:
        schema = discovery_document()["schemas"][schema["$ref"]]
    if value is None:
        return
    kind = schema.get("type")
    fmt = schema.get("format")
    if kind == "object":
        if not isinstance(value, dict):
            raise _invalid(f"Invalid value at '{path}': expected an object.")
        props: Mapping[str, Any] = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                _validate(item, props[key], f"{path}.{key}")
            elif extra is not None:
                _validate(item, extra, f"{path}[{key!r}]")
            else:
                raise _invalid(
                    f"Invalid JSON payload received. Unknown name \"{key}\" at '{path}': "
                    "Cannot find field."
                )
    elif kind == "array":
        if not isinstance(value, list):
            raise _invalid(f"Invalid value at '{path}': expected a list.")
        for index, item in enumerate(value):
            _validate(item, schema.get("items", {}), f"{path}[{index}]")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise _invalid(f"Invalid value at '{path}' ({type(value).__name__}), expected bool.")
    elif kind == "integer":
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and re.fullmatch(r"-?\d+", value) is not None
        )
        if not ok:
            raise _invalid(f"Invalid value at '{path}' ({value!r}), expected an integer.")
    elif kind == "string":
        if not isinstance(value, str):
            raise _invalid(f"Invalid value at '{path}' ({value!r}), expected a string.")
        if fmt == "date-time":
            _parse_rfc3339(value, path, offset_required=False)
        elif fmt == "date":
            _parse_date(value, path)
        elif fmt == "int64" and re.fullmatch(r"-?\d+", value) is None:
            raise _invalid(f"Invalid value at '{path}' ({value!r}), expected an int64.")


def _parse_rfc3339(value: str, where: str, *, offset_required: bool = True) -> datetime:
    match = RFC3339_RE.match(value)
    if match is None or (offset_required and match.group("offset") is None):
        raise _invalid(f"Invalid value at '{where}' ({value!r}): not an RFC 3339 timestamp.")
    try:
        return datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError as exc:
        raise _invalid(f"Invalid value at '{where}' ({value!r}): {exc}.") from exc


def _parse_date(value: str, where: str) -> date:
    if DATE_RE.match(value) is None:
        raise _invalid(f"Invalid value at '{where}' ({value!r}): expected yyyy-mm-dd.")
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise _invalid(f"Invalid value at '{where}' ({value!r}): {exc}.") from exc


def _instant(edt: Mapping[str, Any], default_tz: str) -> datetime:
    """An event boundary as an aware datetime (all-day dates at midnight in the calendar's zone)."""
    if edt.get("dateTime"):
        moment = datetime.fromisoformat(str(edt["dateTime"]).replace("z", "Z"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=zoneinfo.ZoneInfo(edt.get("timeZone") or default_tz))
        return moment
    day = date.fromisoformat(str(edt["date"]))
    return datetime(day.year, day.month, day.day, tzinfo=zoneinfo.ZoneInfo(default_tz))


def _check_event(event: Mapping[str, Any]) -> None:
    """Meaning checks the schema cannot express: the ones Google answers with a 400."""
    for name in ("start", "end"):
        edt = event.get(name)
        if not isinstance(edt, dict) or not (edt.get("date") or edt.get("dateTime")):
            raise _ApiError(400, "required", f"Missing {name} time.")
        if edt.get("date") and edt.get("dateTime"):
            raise _invalid(f"Invalid {name} time: both date and dateTime are set.")
        zone = edt.get("timeZone")
        if zone and zone not in _known_time_zones():
            raise _invalid(f"Invalid time zone definition for {name} time.")
        if edt.get("dateTime"):
            match = RFC3339_RE.match(edt["dateTime"])
            if match is None:
                raise _invalid(f"Invalid {name} time: not an RFC 3339 timestamp.")
            if match.group("offset") is None and not zone:
                raise _invalid(f"Missing time zone definition for {name} time.")
    start, end = event["start"], event["end"]
    if bool(start.get("date")) != bool(end.get("date")):
        raise _invalid("Start and end times must either both be date or both be dateTime.")
    if _instant(end, "UTC") <= _instant(start, "UTC"):
        raise _time_range_empty()
    for key, allowed in EVENT_ENUMS.items():
        if event.get(key) is not None and event[key] not in allowed:
            raise _invalid(f"Invalid value for {key}: {event[key]!r}.")
    reminders = event.get("reminders") or {}
    overrides = reminders.get("overrides") or []
    if reminders.get("useDefault") and overrides:
        raise _invalid(
            "Cannot specify both default reminders and overrides at the same time.",
            "cannotUseDefaultRemindersAndSpecifyOverride",
        )
    if len(overrides) > REMINDER_MAX_OVERRIDES:
        raise _invalid("Too many reminders.", "tooManyReminders")
    for reminder in overrides:
        if reminder.get("method") not in ("email", "popup"):
            raise _ApiError(400, "required", "Missing or invalid reminder method.")
        minutes = int(reminder.get("minutes") or 0)
        if not 0 <= minutes <= REMINDER_MAX_MINUTES:
            raise _invalid("Invalid reminder minutes.")


# --------------------------------------------------------------------------------------------
# The fake.


Handler = Callable[["FakeGoogle", _Call, "re.Match[str]"], Awaitable[Response]]


class FakeGoogle(FakeServer):
    """Google Calendar API v3 + OAuth token endpoint on 127.0.0.1, with accessors for tests."""

    client_max_size = 64 * 1024 * 1024

    def __init__(self, config: FakeGoogleConfig | None = None, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config or FakeGoogleConfig()
        self.failure: FailureMode | None = None
        self.token_grants: list[TokenGrant] = []
        self._random = random.Random(seed)
        self._reset_state()
        self._oauth_clients: dict[str, str] = {}
        self._redirect_uris: dict[str, set[str]] = {}
        self._service_accounts: dict[str, _ServiceAccount] = {}
        #: The accounts the consent page offers ("Choose an account").
        self.accounts: list[str] = []
        #: Authorization codes in flight: code -> (client, redirect URI, PKCE challenge, user).
        self._codes: dict[str, tuple[str, str, str, str]] = {}

    def _reset_state(self) -> None:
        self._calendars: dict[str, _Calendar] = {}
        self._stats: dict[str, UserStats] = {}
        self._windows: dict[str, deque[float]] = {}
        self._access_tokens: dict[str, tuple[str, float]] = {}
        self._refresh_tokens: dict[str, tuple[str, str]] = {}
        self._project_requests = 0
        self.token_grants = []
        self.failure = None
        self._channels: dict[str, Channel] = {}
        self._notify_pending: set[str] = set()
        self.deliveries: list[Delivery] = []

    # -- lifecycle ------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/token", self._handle_token)
        app.router.add_get("/o/oauth2/v2/auth", self._consent_page)
        app.router.add_post("/o/oauth2/v2/auth", self._consent_decide)
        app.router.add_post("/batch/calendar/v3", self._handle_batch)
        app.router.add_route("*", "/calendar/v3/{tail:.*}", self._handle_api)

    @property
    def api_url(self) -> str:
        """What ``client_options={"api_endpoint": ...}`` must be (ends in ``/calendar/v3/``)."""
        return f"{self.base_url}/calendar/v3/"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def batch_url(self) -> str:
        return f"{self.base_url}/batch/calendar/v3"

    # -- accessors for tests --------------------------------------------------------------

    def reset(self) -> None:
        """Forgets events, tokens, stats and injected failures; keeps registered clients."""
        self._reset_state()

    def register_oauth_client(
        self, client_id: str, client_secret: str, redirect_uris: tuple[str, ...] = ()
    ) -> None:
        self._oauth_clients[client_id] = client_secret
        self._redirect_uris[client_id] = set(redirect_uris)

    def revoke_user_grants(self, user: str) -> None:
        """The user removed the app at myaccount.google.com: refresh tokens stop working."""
        self._refresh_tokens = {t: v for t, v in self._refresh_tokens.items() if v[1] != user}
        self._access_tokens = {t: v for t, v in self._access_tokens.items() if v[0] != user}

    def issue_refresh_token(self, client_id: str, user: str) -> str:
        """A refresh token the user granted ``client_id`` (the OAuth consent, done)."""
        token = "1//" + secrets.token_urlsafe(24)
        self._refresh_tokens[token] = (client_id, user)
        return token

    def revoke_refresh_token(self, token: str) -> None:
        self._refresh_tokens.pop(token, None)

    def new_service_account(
        self, client_email: str, *, delegated_domains: frozenset[str] | None = None
    ) -> dict[str, str]:
        """Generates a key pair, registers the public half, and returns the JSON key file."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        public_pem = (
            key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        key_id = secrets.token_hex(20)
        self._service_accounts[client_email] = _ServiceAccount(
            client_email, public_pem, delegated_domains
        )
        return {
            "type": "service_account",
            "project_id": "syncsvc-test",
            "private_key_id": key_id,
            "private_key": private_pem,
            "client_email": client_email,
            "client_id": str(self._random.randrange(10**20, 10**21)),
            "token_uri": self.token_url,
        }

    def expire_access_tokens(self) -> None:
        """Every issued access token now answers 401, as after an hour at Google."""
        self._access_tokens.clear()

    def stats(self, user: str) -> UserStats:
        return self._stats.setdefault(user, UserStats())

    def set_time_zone(self, user: str, time_zone: str) -> None:
        self._calendar_of(user).time_zone = time_zone

    def events(self, user: str, *, include_cancelled: bool = True) -> list[dict[str, Any]]:
        """The user's primary-calendar events as stored (copies), cancelled ones included."""
        calendar = self._calendar_of(user)
        return [
            copy.deepcopy(event)
            for event in calendar.events.values()
            if include_cancelled or event["status"] != "cancelled"
        ]

    def add_event(self, user: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Adds an event the user made themselves (e.g. an ``outOfOffice`` block), validated."""
        payload = dict(body)
        _validate(payload, {"$ref": "Event"}, "resource")
        return copy.deepcopy(self._store_new(self._calendar_of(user), payload, creator=user))

    def invalidate_sync_tokens(self, user: str) -> None:
        self._calendar_of(user).token_epoch += 1

    def user_patch_event(
        self, user: str, event_id: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The user edits one event in their calendar app (moves it, renames it): patch
        semantics, validated like ``events.patch``; watchers are notified."""
        calendar = self._calendar_of(user)
        event = calendar.events.get(event_id)
        if event is None or event["status"] == "cancelled":
            raise KeyError(event_id)
        _validate(dict(patch), {"$ref": "Event"}, "resource")
        return copy.deepcopy(_apply_change(self, calendar, event, patch, replace=False))

    def user_delete_event(self, user: str, event_id: str) -> None:
        """The user deletes one event in their calendar app; it lingers as ``cancelled``."""
        calendar = self._calendar_of(user)
        event = calendar.events[event_id]
        event["status"] = "cancelled"
        self._touch(calendar, event)

    def channels(self, user: str | None = None) -> list[Channel]:
        """Every channel created so far (stopped and expired ones included), copies."""
        return [copy.copy(c) for c in self._channels.values() if user is None or c.user == user]

    async def settle(self, timeout_s: float = 5.0) -> None:
        """Waits until every notification scheduled so far has been delivered."""
        deadline = time.monotonic() + timeout_s
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(set(self._tasks), timeout=deadline - time.monotonic())

    # -- token endpoint -------------------------------------------------------------------

    @property
    def auth_url(self) -> str:
        return f"{self.base_url}/o/oauth2/v2/auth"

    def _authorize_error(self, params: Mapping[str, str]) -> web.Response | None:
        client = params.get("client_id", "")
        if client not in self._oauth_clients:
            return web.Response(status=401, text="Error 401: invalid_client")
        if params.get("redirect_uri") not in self._redirect_uris.get(client, set()):
            return web.Response(status=400, text="Error 400: redirect_uri_mismatch")
        if params.get("response_type") != "code" or params.get("code_challenge_method") != "S256":
            return web.Response(status=400, text="Error 400: invalid_request")
        return None

    async def _consent_page(self, request: web.Request) -> web.Response:
        """Google's account chooser and consent screen (Allow / Cancel)."""
        params = dict(request.query)
        refused = self._authorize_error(params)
        if refused is not None:
            return refused
        hidden = "".join(
            f'<input type="hidden" name="{k}" value="{html.escape(v)}">' for k, v in params.items()
        )
        accounts = "".join(
            f'<label><input type="radio" name="account" value="{html.escape(a)}"'
            f"{' checked' if n == 0 else ''}> {html.escape(a)}</label><br>"
            for n, a in enumerate(self.accounts)
        )
        page = (
            "<!doctype html><html><head><title>Sign in - Google Accounts</title></head><body>"
            '<h1>Choose an account</h1><form method="post">'
            f"<fieldset><legend>to continue to syncsvc</legend>{accounts}</fieldset>"
            "<p>syncsvc wants to access your Google Account: See, edit, share, and "
            "permanently delete all the calendars you can access using Google Calendar.</p>"
            f'{hidden}<button name="action" value="allow">Allow</button> '
            '<button name="action" value="cancel">Cancel</button></form></body></html>'
        )
        return web.Response(text=page, content_type="text/html")

    async def _consent_decide(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        refused = self._authorize_error(form)
        if refused is not None:
            return refused
        answer: dict[str, str]
        if form.get("action") != "allow" or form.get("account") not in self.accounts:
            answer = {"error": "access_denied"}
        else:
            code = "4/0" + secrets.token_urlsafe(32)
            self._codes[code] = (
                form["client_id"],
                form["redirect_uri"],
                form["code_challenge"],
                form["account"],
            )
            answer = {"code": code, "scope": form.get("scope", "")}
        answer["state"] = form.get("state", "")
        raise web.HTTPFound(f"{form['redirect_uri']}?{urllib.parse.urlencode(answer)}")

    def _code_grant(self, form: Mapping[str, str], client_id: str) -> web.Response:
        found = self._codes.pop(form.get("code", ""), None)
        if found is None or found[0] != client_id or found[1] != form.get("redirect_uri"):
            return _oauth_error(400, "invalid_grant", "Malformed auth code.")
        verifier = form.get("code_verifier", "").encode()
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=")
        if challenge.decode() != found[2]:
            return _oauth_error(400, "invalid_grant", "Invalid code verifier.")
        user = found[3]
        answer = json.loads(self._grant("authorization_code", client_id, user).text or "{}")
        claims = {
            "iss": "https://accounts.google.com",
            "aud": client_id,
            "sub": hashlib.sha256(user.encode()).hexdigest()[:21],
            "email": user,
            "email_verified": True,
            "iat": int(time.time()),
            "exp": int(time.time()) + 3600,
        }
        parts = [{"alg": "RS256", "typ": "JWT"}, claims]
        segments = [base64.urlsafe_b64encode(json.dumps(p).encode()).rstrip(b"=") for p in parts]
        answer["id_token"] = b".".join([*segments, b"c2ln"]).decode()
        answer["refresh_token"] = self.issue_refresh_token(client_id, user)
        answer["scope"] = " ".join(sorted(set(answer["scope"].split()) | {"openid", "email"}))
        return web.json_response(answer)

    async def _handle_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant_type = str(form.get("grant_type", ""))
        if grant_type == "authorization_code":
            client_id, secret = str(form.get("client_id", "")), form.get("client_secret")
            basic = request.headers.get("Authorization", "")
            if basic.startswith("Basic "):  # client_secret_basic, as requests-oauthlib sends
                pair = base64.b64decode(basic[6:]).decode()
                client_id, _, secret = (urllib.parse.unquote(p) for p in pair.partition(":"))
            if self._oauth_clients.get(client_id) != secret:
                return _oauth_error(401, "invalid_client", "The OAuth client was not found.")
            return self._code_grant({k: str(v) for k, v in form.items()}, client_id)
        if grant_type == "refresh_token":
            client_id = str(form.get("client_id", ""))
            if self._oauth_clients.get(client_id) != form.get("client_secret"):
                return _oauth_error(401, "invalid_client", "The OAuth client was not found.")
            owner = self._refresh_tokens.get(str(form.get("refresh_token", "")))
            if owner is None or owner[0] != client_id:
                return _oauth_error(400, "invalid_grant", "Token has been expired or revoked.")
            return self._grant(grant_type, client_id, owner[1])
        if grant_type == JWT_BEARER_GRANT:
            return self._jwt_grant(str(form.get("assertion", "")))
        return _oauth_error(400, "unsupported_grant_type", f"Invalid grant_type: {grant_type}")

    def _jwt_grant(self, assertion: str) -> web.Response:
        try:
            unverified = google_jwt.decode(assertion, verify=False)
        except (ValueError, google_auth_exceptions.GoogleAuthError):
            return _oauth_error(400, "invalid_grant", "Invalid JWT: malformed.")
        account = self._service_accounts.get(str(unverified.get("iss", "")))
        if account is None:
            return _oauth_error(400, "invalid_grant", "Invalid grant: account not found")
        try:
            claims = google_jwt.decode(
                assertion, certs=account.public_key_pem, audience=GOOGLE_TOKEN_AUDIENCE
            )
        except (ValueError, google_auth_exceptions.GoogleAuthError):
            return _oauth_error(400, "invalid_grant", "Invalid JWT Signature.")
        if CALENDAR_SCOPE not in str(claims.get("scope", "")).split():
            return _oauth_error(400, "invalid_scope", "Invalid OAuth scope or ID token audience.")
        subject = str(claims.get("sub") or account.client_email)
        domain = subject.rpartition("@")[2]
        delegated = account.delegated_domains
        if "sub" in claims and delegated is not None and domain not in delegated:
            return _oauth_error(
                401,
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, or "
                "client not authorized for any of the scopes requested.",
            )
        return self._grant(JWT_BEARER_GRANT, account.client_email, subject)

    def _grant(self, grant_type: str, client: str, subject: str) -> web.Response:
        token = "ya29." + secrets.token_urlsafe(32)
        lifetime = self.config.access_token_lifetime_s
        self._access_tokens[token] = (subject, time.monotonic() + lifetime)
        self.token_grants.append(TokenGrant(grant_type, client, subject))
        return web.json_response(
            {
                "access_token": token,
                "expires_in": lifetime,
                "token_type": "Bearer",
                "scope": CALENDAR_SCOPE,
            }
        )

    def _user_for(self, authorization: str | None) -> str | None:
        if not authorization or not authorization.startswith("Bearer "):
            return None
        entry = self._access_tokens.get(authorization.removeprefix("Bearer ").strip())
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    # -- HTTP entry points ----------------------------------------------------------------

    async def _handle_api(self, request: web.Request) -> web.StreamResponse:
        user = self._user_for(request.headers.get("Authorization"))
        if user is not None:
            self.stats(user).http_requests += 1
        response = await self._serve(user, request.method, request.raw_path, await request.read())
        return response.to_web()

    async def _handle_batch(self, request: web.Request) -> web.Response:
        raw = await request.read()
        content_type = request.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/mixed"):
            return _json(400, _invalid("Batch requests must be multipart/mixed.").body()).to_web()
        message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
        )
        parts = message.get_payload()
        if not isinstance(parts, list) or not parts:
            return _json(400, _invalid("The batch is empty.").body()).to_web()
        if len(parts) > BATCH_MAX_PARTS:
            return _json(
                400, _invalid(f"A batch may hold at most {BATCH_MAX_PARTS} calls.").body()
            ).to_web()
        outer_auth = request.headers.get("Authorization")
        counted: set[str] = set()
        boundary = "batch_" + secrets.token_urlsafe(18)
        chunks: list[str] = []
        for part in parts:
            method, target, headers, body = _parse_part(str(part.get_payload()))
            user = self._user_for(headers.get("authorization") or outer_auth)
            if user is not None and user not in counted:
                counted.add(user)
                self.stats(user).http_requests += 1
            answer = await self._serve(user, method, target, body)
            content_id = str(part.get("Content-ID", "")).strip()
            chunks.append(_format_part(boundary, content_id, answer))
        chunks.append(f"--{boundary}--\r\n")
        multipart = f"multipart/mixed; boundary={boundary}"
        return Response(200, "".join(chunks).encode(), content_type=multipart).to_web()

    async def _serve(self, user: str | None, method: str, target: str, body: bytes) -> Response:
        """Authenticates, meters and routes one API call; errors become Google's error JSON."""
        if user is None:
            error = _ApiError(401, "authError", "Invalid Credentials", location="Authorization")
            return _json(401, error.body())
        parsed = urllib.parse.urlsplit(target)
        call = _Call(
            user=user,
            method=method.upper(),
            path=parsed.path,
            query=urllib.parse.parse_qs(parsed.query, keep_blank_values=True),
            body=body,
        )
        try:
            self._meter(user)
            await self._maybe_fail(user)
            found = _ROUTES.find(call.method, call.path)
            if found is None:
                raise _ApiError(404, "notFound", "Not Found")
            handler, match = found
            return await handler(self, call, match)
        except _ApiError as exc:
            return _json(exc.status, exc.body())

    def _meter(self, user: str) -> None:
        now = time.monotonic()
        stats = self.stats(user)
        window = self._windows.setdefault(user, deque())
        while window and window[0] <= now - self.config.quota_window_s:
            window.popleft()
        daily = self.config.project_daily_requests
        if daily is not None and self._project_requests >= daily:
            stats.throttled += 1
            stats.throttled_times.append(now)
            raise _ApiError(
                403, "quotaExceeded", "Calendar usage limits exceeded.", domain="usageLimits"
            )
        if len(window) >= self.config.quota_requests:
            stats.throttled += 1
            stats.throttled_times.append(now)
            if self.config.throttle_status == 429:
                raise _ApiError(
                    429, "rateLimitExceeded", "Rate Limit Exceeded", domain="usageLimits"
                )
            reason = self.config.throttle_reason
            message = (
                "User Rate Limit Exceeded"
                if reason == "userRateLimitExceeded"
                else "Rate Limit Exceeded"
            )
            raise _ApiError(403, reason, message, domain="usageLimits")
        window.append(now)
        self._project_requests += 1
        stats.requests += 1
        stats.request_times.append(now)

    async def _maybe_fail(self, user: str) -> None:
        failure = self.failure
        if failure is None or self._random.random() >= failure.fraction:
            return
        self.stats(user).failures_injected += 1
        if failure.hang_s is not None:
            await asyncio.sleep(failure.hang_s)
        message = "Backend Error" if failure.status >= 500 else "Injected failure"
        raise _ApiError(failure.status, failure.reason, message)

    # -- state helpers --------------------------------------------------------------------

    def _calendar_of(self, user: str) -> _Calendar:
        calendar = self._calendars.get(user)
        if calendar is None:
            calendar = self._calendars[user] = _Calendar(calendar_id=user, owner=user)
        return calendar

    def _calendar(self, call: _Call, calendar_id: str) -> _Calendar:
        """Each user sees their own primary calendar, as ``primary`` or by their address."""
        calendar_id = urllib.parse.unquote(calendar_id)
        if calendar_id not in ("primary", call.user):
            raise _ApiError(404, "notFound", "Not Found")
        return self._calendar_of(call.user)

    def _touch(self, calendar: _Calendar, event: dict[str, Any]) -> None:
        calendar.seq += 1
        calendar.changed_at[event["id"]] = calendar.seq
        event["etag"] = f'"{3_400_000_000_000_000 + calendar.seq}"'
        event["updated"] = _now_rfc3339()
        self._changed(calendar.owner)

    # -- push channels --------------------------------------------------------------------

    def _changed(self, user: str) -> None:
        """Queues one ``exists`` message per active channel on the user's calendar; changes
        made before it goes out ride on the same message."""
        now = _now_ms()
        for channel in self._channels.values():
            if channel.user != user or not channel.active(now):
                continue
            if channel.id in self._notify_pending:
                continue
            self._notify_pending.add(channel.id)
            self._spawn(self._deliver(channel, "exists"))

    async def _deliver(self, channel: Channel, state: str) -> None:
        await asyncio.sleep(0)  # the watch answer (or the change's own answer) goes first
        self._notify_pending.discard(channel.id)
        if not channel.active(_now_ms()):
            return
        channel.message_number += 1
        expires = datetime.fromtimestamp(channel.expiration_ms / 1000, UTC)
        headers = {
            "X-Goog-Channel-ID": channel.id,
            "X-Goog-Channel-Expiration": email.utils.format_datetime(expires, usegmt=True),
            "X-Goog-Resource-ID": channel.resource_id,
            "X-Goog-Resource-URI": channel.resource_uri,
            "X-Goog-Resource-State": state,
            "X-Goog-Message-Number": str(channel.message_number),
        }
        if channel.token is not None:
            headers["X-Goog-Channel-Token"] = channel.token
        assert self._http is not None, "start() the fake first"
        timeout = aiohttp.ClientTimeout(total=NOTIFY_TIMEOUT_S)
        started = time.monotonic()
        try:
            async with self._http.post(
                channel.address, data=b"", headers=headers, timeout=timeout
            ) as answer:
                await answer.read()
                status = answer.status
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        self.deliveries.append(
            Delivery(channel.id, state, channel.message_number, status, time.monotonic() - started)
        )

    def _open_channel(self, user: str, body: Mapping[str, Any], calendar_path: str) -> Channel:
        channel_id = str(body.get("id") or "")
        if not CHANNEL_ID_RE.match(channel_id):
            raise _ApiError(
                400, "required", "Channel id must be 1 to 64 characters [A-Za-z0-9-_+/=]."
            )
        if channel_id in self._channels:
            raise _ApiError(400, "channelIdNotUnique", f"Channel id {channel_id} not unique")
        if body.get("type") not in CHANNEL_TYPES:
            raise _ApiError(400, "push.webhookTypeInvalid", "Invalid channel type.")
        address = str(body.get("address") or "")
        parsed = urllib.parse.urlsplit(address)
        if parsed.scheme != "https" and not (
            parsed.scheme == "http" and parsed.hostname in LOOPBACK_HOSTS
        ):
            raise _ApiError(
                400, "push.webhookUrlNotHttps", "WebHook callback must be HTTPS: " + address
            )
        token = body.get("token")
        if token is not None and len(str(token)) > CHANNEL_TOKEN_MAX_CHARS:
            raise _invalid(f"Channel token longer than {CHANNEL_TOKEN_MAX_CHARS} characters.")
        now = _now_ms()
        longest = now + int(self.config.channel_max_ttl_s * 1000)
        requested = body.get("expiration")
        expiration = (
            min(int(requested), longest)
            if requested is not None
            else now + int(self.config.channel_default_ttl_s * 1000)
        )
        if expiration <= now:
            raise _invalid("Channel expiration must be in the future.")
        channel = Channel(
            id=channel_id,
            resource_id=_resource_id(user),
            resource_uri=f"{self.api_url}calendars/{calendar_path}/events?alt=json",
            user=user,
            address=address,
            token=None if token is None else str(token),
            expiration_ms=expiration,
        )
        self._channels[channel_id] = channel
        self._spawn(self._deliver(channel, "sync"))
        return channel

    def _store_new(self, calendar: _Calendar, body: dict[str, Any], creator: str) -> dict[str, Any]:
        _check_event(body)
        event_id = body.get("id") or _random_event_id(self._random)
        if not EVENT_ID_RE.match(event_id):
            raise _invalid("Invalid resource id value.")
        if event_id in calendar.events:
            raise _ApiError(409, "duplicate", "The requested identifier already exists.")
        now = _now_rfc3339()
        event: dict[str, Any] = {
            "kind": "calendar#event",
            "id": event_id,
            "status": "confirmed",
            "htmlLink": f"https://www.google.com/calendar/event?eid={event_id}",
            "created": now,
            "creator": {"email": creator, "self": True},
            "organizer": {"email": calendar.calendar_id, "self": True},
            "iCalUID": f"{event_id}@google.com",
            "sequence": 0,
            "reminders": {"useDefault": True},
            "eventType": "default",
        }
        for key, value in body.items():
            if key not in _READ_ONLY and value is not None:
                event[key] = value
        event["id"] = event_id
        calendar.events[event_id] = event
        self._touch(calendar, event)
        return event


_READ_ONLY = frozenset(
    {"kind", "etag", "htmlLink", "created", "updated", "creator", "iCalUID", "hangoutLink"}
)


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _random_event_id(rng: random.Random) -> str:
    alphabet = "0123456789abcdefghijklmnopqrstuv"
    return "".join(rng.choice(alphabet) for _ in range(26))


def _json_body(call: _Call) -> dict[str, Any]:
    try:
        payload = json.loads(call.body or b"{}")
    except ValueError as exc:
        raise _ApiError(400, "parseError", "Parse Error") from exc
    if not isinstance(payload, dict):
        raise _ApiError(400, "parseError", "Parse Error")
    return payload


def _check_params(call: _Call, method_id: str) -> None:
    """Refuses query parameters of the wrong type or outside their enum, as Google does."""
    resource, _, method = method_id.partition(".")
    spec = discovery_document()["resources"][resource]["methods"][method].get("parameters", {})
    standard = discovery_document()["parameters"]
    for name, values in call.query.items():
        definition = spec.get(name) or standard.get(name)
        if definition is None or definition.get("location") == "path":
            continue
        if len(values) > 1 and not definition.get("repeated"):
            raise _invalid(f"Parameter {name} may be given once.")
        for value in values:
            if definition.get("type") == "integer":
                if re.fullmatch(r"-?\d+", value) is None:
                    raise _invalid(f"Invalid value '{value}' for {name}.")
                low = definition.get("minimum")
                high = definition.get("maximum")
                if (low is not None and int(value) < int(low)) or (
                    high is not None and int(value) > int(high)
                ):
                    raise _invalid(f"Invalid value '{value}' for {name}.")
            elif definition.get("type") == "boolean" and value not in ("true", "false"):
                raise _invalid(f"Invalid value '{value}' for {name}.")
            enum = definition.get("enum")
            if enum is not None and value not in enum:
                raise _invalid(f"Invalid value '{value}' for {name}.")


def _one(call: _Call, name: str) -> str | None:
    values = call.query.get(name)
    return values[0] if values else None


# -- handlers ------------------------------------------------------------------------------


async def _insert(fake: FakeGoogle, call: _Call, match: re.Match[str]) -> Response:
    _check_params(call, "events.insert")
    calendar = fake._calendar(call, match["cal"])
    body = _json_body(call)
    _validate(body, {"$ref": "Event"}, "resource")
    return _json(200, fake._store_new(calendar, body, creator=call.user))


def _existing(calendar: _Calendar, event_id: str) -> dict[str, Any]:
    event = calendar.events.get(urllib.parse.unquote(event_id))
    if event is None:
        raise _ApiError(404, "notFound", "Not Found")
    return event


async def _get(fake: FakeGoogle, call: _Call, match: re.Match[str]) -> Response:
    _check_params(call, "events.get")
    event = _existing(fake._calendar(call, match["cal"]), match["event"])
    return _json(200, event)


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """Patch semantics: objects merge field by field, arrays and scalars replace, null clears."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


async def _patch(fake: FakeGoogle, call: _Call, match: re.Match[str]) -> Response:
    _check_params(call, "events.patch")
    calendar = fake._calendar(call, match["cal"])
    event = _existing(calendar, match["event"])
    body = _json_body(call)
    _validate(body, {"$ref": "Event"}, "resource")
    return _json(200, _apply_change(fake, calendar, event, body, replace=False))


async def _update(fake: FakeGoogle, call: _Call, match: re.Match[str]) -> Response:
    _check_params(call, "events.update")
    calendar = fake._calendar(call, match["cal"])
    event = _existing(calendar, match["event"])
    body = _json_body(call)
    _validate(body, {"$ref": "Event"}, "resource")
    return _json(200, _apply_change(fake, calendar, event, body, replace=True))


def _apply_change(
    fake: FakeGoogle,
    calendar: _Calendar,
    event: dict[str, Any],
    body: Mapping[str, Any],
    *,
    replace: bool,
) -> dict[str, Any]:
    changes = {k: v for k, v in body.items() if k not in _READ_ONLY and k != "id"}
    if replace:
        kept = {k: event[k] for k in (*_READ_ONLY, "id", "organizer", "sequence") if k in event}
        candidate = {"status": "confirmed", "eventType": "default", **kept}
        _merge(candidate, changes)
    else:
        candidate = copy.deepcopy(event)
        _merge(candidate, changes)
    _check_event(candidate)
    if candidate.get("start") != event.get("start") or candidate.get("end") != event.get("end"):
        candidate["sequence"] = int(event.get("sequence", 0)) + 1
    event.clear()
    event.update(candidate)
    fake._touch(calendar, event)
    return event


async def _delete(fake: FakeGoogle, call: _Call, match: re.Match[str]) -> Response:
    _check_params(call, "events.delete")
    calendar = fake._calendar(call, match["cal"])
    event = _existing(calendar, match["event"])
    if event["status"] == "cancelled":
        raise _ApiError(410, "deleted", "Resource has been deleted")
    event["status"] = "cancelled"
    fake._touch(calendar, event)
    return Response(204)


def _sync_token(calendar: _Calendar) -> str:
    raw = json.dumps([calendar.calendar_id, calendar.token_epoch, calendar.seq]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _read_sync_token(calendar: _Calendar, token: str) -> int:
    gone = _ApiError(
        410, "fullSyncRequired", "Sync token is no longer valid, a full sync is required."
    )
    try:
        owner, epoch, seq = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except ValueError as exc:
        raise gone from exc
    if owner != calendar.calendar_id or epoch != calendar.token_epoch or not isinstance(seq, int):
        raise gone
    return seq


async def _list(fake: FakeGoogle, call: _Call, match: re.Match[str]) -> Response:
    _check_params(call, "events.list")
    calendar = fake._calendar(call, match["cal"])
    sync_token = _one(call, "syncToken")
    items = list(calendar.events.values())
    if sync_token is not None:
        for name in SYNC_TOKEN_EXCLUSIVE_PARAMS:
            if name in call.query:
                raise _invalid(f"{name} cannot be used together with syncToken.")
        since = _read_sync_token(calendar, sync_token)
        items = [e for e in items if calendar.changed_at[e["id"]] > since]
    elif _one(call, "showDeleted") != "true":
        items = [e for e in items if e["status"] != "cancelled"]
    items = _filter(calendar, call, items)
    if _one(call, "orderBy") == "startTime":
        if _one(call, "singleEvents") != "true":
            raise _invalid("The requested ordering is not available for the particular query.")
        items.sort(key=lambda e: _instant(e["start"], calendar.time_zone))
    elif _one(call, "orderBy") == "updated":
        items.sort(key=lambda e: e["updated"])
    page_size = min(int(_one(call, "maxResults") or LIST_DEFAULT_RESULTS), LIST_MAX_RESULTS)
    page_token = _one(call, "pageToken")
    try:
        offset = int(page_token) if page_token else 0
    except ValueError as exc:
        raise _invalid("Invalid page token value.") from exc
    page = items[offset : offset + page_size]
    result: dict[str, Any] = {
        "kind": "calendar#events",
        "etag": f'"p{calendar.seq}"',
        "summary": calendar.calendar_id,
        "updated": _now_rfc3339(),
        "timeZone": calendar.time_zone,
        "accessRole": "owner",
        "defaultReminders": [{"method": "popup", "minutes": 10}],
        "items": page,
    }
    if offset + page_size < len(items):
        result["nextPageToken"] = str(offset + page_size)
    else:
        result["nextSyncToken"] = _sync_token(calendar)
    return _json(200, result)


def _filter(calendar: _Calendar, call: _Call, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    time_min = _one(call, "timeMin")
    time_max = _one(call, "timeMax")
    low = _parse_rfc3339(time_min, "timeMin") if time_min else None
    high = _parse_rfc3339(time_max, "timeMax") if time_max else None
    if low is not None and high is not None and high <= low:
        raise _time_range_empty()
    updated_min = _one(call, "updatedMin")
    updated_low = _parse_rfc3339(updated_min, "updatedMin") if updated_min else None
    wanted_types = set(call.query.get("eventTypes", []))
    wanted_props = []
    for prop in call.query.get("privateExtendedProperty", []):
        key, sep, value = prop.partition("=")
        if not sep:
            raise _invalid("Invalid privateExtendedProperty: expected propertyName=value.")
        wanted_props.append((key, value))
    ical_uid = _one(call, "iCalUID")
    text = (_one(call, "q") or "").lower()
    out = []
    for event in items:
        if low is not None and _instant(event["end"], calendar.time_zone) <= low:
            continue
        if high is not None and _instant(event["start"], calendar.time_zone) >= high:
            continue
        if updated_low is not None and datetime.fromisoformat(event["updated"]) < updated_low:
            continue
        if wanted_types and event.get("eventType", "default") not in wanted_types:
            continue
        private = (event.get("extendedProperties") or {}).get("private") or {}
        if any(private.get(key) != value for key, value in wanted_props):
            continue
        if ical_uid is not None and event.get("iCalUID") != ical_uid:
            continue
        haystack = " ".join(str(event.get(k, "")) for k in ("summary", "description", "location"))
        if text and text not in haystack.lower():
            continue
        out.append(event)
    return out


async def _freebusy(fake: FakeGoogle, call: _Call, match: re.Match[str]) -> Response:
    _check_params(call, "freebusy.query")
    body = _json_body(call)
    _validate(body, {"$ref": "FreeBusyRequest"}, "resource")
    for name in ("timeMin", "timeMax"):
        if not body.get(name):
            raise _ApiError(400, "required", f"Missing {name} parameter.")
    low = _parse_rfc3339(body["timeMin"], "timeMin")
    high = _parse_rfc3339(body["timeMax"], "timeMax")
    if high <= low:
        raise _time_range_empty()
    calendars: dict[str, Any] = {}
    for item in body.get("items") or []:
        requested = str(item.get("id", ""))
        if requested not in ("primary", call.user):
            calendars[requested] = {
                "errors": [{"domain": "global", "reason": "notFound"}],
                "busy": [],
            }
            continue
        calendar = fake._calendar_of(call.user)
        spans = []
        for event in calendar.events.values():
            if event["status"] == "cancelled" or event.get("transparency") == "transparent":
                continue
            start = max(_instant(event["start"], calendar.time_zone), low)
            end = min(_instant(event["end"], calendar.time_zone), high)
            if start < end:
                spans.append((start, end))
        calendars[requested] = {"busy": [_span_json(s, e) for s, e in _merge_spans(spans)]}
    return _json(
        200,
        {
            "kind": "calendar#freeBusy",
            "timeMin": _utc_text(low),
            "timeMax": _utc_text(high),
            "calendars": calendars,
        },
    )


def _merge_spans(spans: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _span_json(start: datetime, end: datetime) -> dict[str, str]:
    return {"start": _utc_text(start), "end": _utc_text(end)}


async def _watch(fake: FakeGoogle, call: _Call, match: re.Match[str]) -> Response:
    _check_params(call, "events.watch")
    calendar = fake._calendar(call, match["cal"])
    body = _json_body(call)
    _validate(body, {"$ref": "Channel"}, "resource")
    channel = fake._open_channel(calendar.owner, body, match["cal"])
    answer: dict[str, Any] = {
        "kind": "api#channel",
        "id": channel.id,
        "resourceId": channel.resource_id,
        "resourceUri": channel.resource_uri,
        "expiration": str(channel.expiration_ms),
    }
    if channel.token is not None:
        answer["token"] = channel.token
    return _json(200, answer)


async def _stop(fake: FakeGoogle, call: _Call, match: re.Match[str]) -> Response:
    """``channels.stop``: the channel must exist for this user with this resource id."""
    body = _json_body(call)
    _validate(body, {"$ref": "Channel"}, "resource")
    channel = fake._channels.get(str(body.get("id") or ""))
    if (
        channel is None
        or channel.stopped
        or channel.user != call.user
        or channel.resource_id != body.get("resourceId")
    ):
        raise _ApiError(404, "notFound", f"Channel '{body.get('id')}' not found for project")
    channel.stopped = True
    return Response(204)


def _resource_id(user: str) -> str:
    """Opaque and stable per watched collection, as Google's is."""
    digest = hashlib.sha256(b"events:" + user.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")[:27]


def _now_ms() -> int:
    return int(time.time() * 1000)


_CAL = r"/calendar/v3/calendars/(?P<cal>[^/]+)"
_ROUTES: Routes[Handler] = Routes(
    ("POST", _CAL + r"/events/watch", _watch),
    ("POST", r"/calendar/v3/channels/stop", _stop),
    ("POST", _CAL + r"/events", _insert),
    ("GET", _CAL + r"/events", _list),
    ("GET", _CAL + r"/events/(?P<event>[^/]+)", _get),
    ("PATCH", _CAL + r"/events/(?P<event>[^/]+)", _patch),
    ("PUT", _CAL + r"/events/(?P<event>[^/]+)", _update),
    ("DELETE", _CAL + r"/events/(?P<event>[^/]+)", _delete),
    ("POST", r"/calendar/v3/freeBusy", _freebusy),
)


# -- wire helpers --------------------------------------------------------------------------


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _parse_part(payload: str) -> tuple[str, str, dict[str, str], bytes]:
    """An ``application/http`` part: request line, headers, body (as googleapiclient writes it)."""
    request_line, _, rest = payload.lstrip("\r\n").partition("\n")
    method, target, *_ = request_line.strip().split(" ")
    inner = email.parser.Parser(policy=email.policy.compat32).parsestr(rest)
    headers = {key.lower(): str(value) for key, value in inner.items()}
    body = inner.get_payload()
    return method, target, headers, str(body).encode() if body else b""


def _format_part(boundary: str, content_id: str, answer: Response) -> str:
    """One response part; ``Content-ID: <response-…>`` as Google answers and the client parses."""
    reason = HTTPStatus(answer.status).phrase
    lines = [f"--{boundary}", "Content-Type: application/http"]
    if content_id.startswith("<") and content_id.endswith(">"):
        lines.append(f"Content-ID: <response-{content_id[1:-1]}>")
    lines += ["", f"HTTP/1.1 {answer.status} {reason}"]
    body = answer.to_bytes()
    if body:
        lines.append(f"Content-Type: {answer.content_type}")
    lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines) + "\r\n\r\n" + body.decode() + "\r\n"


@asynccontextmanager
async def running_fake(
    config: FakeGoogleConfig | None = None, *, seed: int = 0
) -> AsyncIterator[FakeGoogle]:
    """A started fake on a free port, stopped on exit."""
    fake = FakeGoogle(config, seed=seed)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
