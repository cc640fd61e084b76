"""CRM users: their zone, country, days off and calendar connection.

Secret parts of a connection (a CalDAV password, Google OAuth tokens) are split off here and
stored only encrypted in ``User.calendar_secret``; nothing that reads a user back gets them.
"""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import holidays
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.errors import (
    AuthFailed,
    Conflict,
    ErrorDetail,
    NotFound,
    ProviderError,
    ValidationError,
)
from syncsvc.providers import egress
from syncsvc.providers.caldav import NoCalendarFound
from syncsvc.service import mailboxes
from syncsvc.service.tenant_connections import ConnectionState
from syncsvc.store.crypto import SecretBox
from syncsvc.store.models import User

PROVIDERS = ("graph", "google", "caldav", "none")
#: Fields of a calendar connection that are encrypted at rest and never returned.
SECRET_FIELDS: Mapping[str, tuple[str, ...]] = {"caldav": ("password",), "google": ("oauth",)}
#: Without ``to``, the days-off window runs this long from ``from``.
DAYS_OFF_DEFAULT_WINDOW_DAYS = 365
#: The widest days-off window asked for at once.
DAYS_OFF_MAX_WINDOW_DAYS = 3 * 366
#: Order of sources for one date: what the CRM said first.
SOURCE_ORDER = ("crm", "holiday", "graph", "google", "caldav")


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


@functools.cache
def _countries() -> Mapping[str, tuple[str, ...]]:
    return {code: tuple(subs) for code, subs in holidays.list_supported_countries().items()}


def timezones() -> tuple[str, ...]:
    """Every accepted zone name, sorted (the API documents them as an enum)."""
    return tuple(sorted(_zones()))


def countries() -> tuple[str, ...]:
    """Every accepted country code, sorted."""
    return tuple(sorted(_countries()))


def check_http_url(value: str) -> str:
    """Addresses we call for a tenant (CalDAV servers, the CRM) pass the egress policy."""
    return egress.current().check_url(value)


def check_timezone(name: str) -> str:
    """An IANA zone name known to this machine's tz database (``Europe/Copenhagen``)."""
    if name not in _zones():
        raise ValueError(f"unknown IANA time zone {name!r}")
    return name


def check_country(code: str) -> str:
    """A country the ``holidays`` package knows (ISO 3166-1 alpha-2), so holidays can be
    skipped for it."""
    if code not in _countries():
        raise ValueError(f"unsupported country {code!r} (ISO 3166-1 alpha-2, e.g. DK)")
    return code


def check_subdivision(country: str, subdivision: str) -> str:
    known = _countries().get(country, ())
    if subdivision not in known:
        hint = ", ".join(known[:10]) if known else "none"
        raise ValueError(f"unknown subdivision {subdivision!r} of {country} (known: {hint})")
    return subdivision


#: Finds the calendar collection from a CalDAV server's URL: (URL, username, password) → URL.
DiscoverCalendar = Callable[[str, str, str], Awaitable[str]]


async def resolve_calendar(
    session: AsyncSession,
    box: SecretBox,
    tenant_id: str,
    user_id: str,
    calendar: Mapping[str, Any],
    discover: DiscoverCalendar,
) -> dict[str, Any]:
    """The connection to store: a CalDAV connection given by its ``server_url`` gets the
    ``url`` of its calendar, discovered now (so the CRM sees it in the answer and syncs never
    look for it), or kept from the stored connection when server, username and password are
    the same. A server where no calendar is found, or that refuses, is a 422 saying why."""
    resolved = {k: v for k, v in calendar.items() if v is not None}
    server_url = resolved.get("server_url")
    if resolved.get("provider") != "caldav" or server_url is None:
        return resolved
    username, password = str(resolved.get("username", "")), str(resolved.get("password", ""))
    user = await session.get(User, (tenant_id, user_id))
    if user is not None and user.calendar_provider == "caldav" and user.calendar_secret:
        stored = user.calendar_config
        same = stored.get("server_url") == server_url and stored.get("username") == username
        if same and box.decrypt(user.calendar_secret).get("password") == password:
            return {**resolved, "url": stored["url"]}
    loc = ("body", "calendar", "server_url")
    try:
        url = await discover(server_url, username, password)
    except NoCalendarFound as exc:
        raise ValidationError(
            f"no calendar for events found on {server_url}",
            [ErrorDetail(loc, tried) for tried in exc.tried],
        ) from exc
    except AuthFailed as exc:
        raise ValidationError(
            f"{server_url} refused the username or password",
            [ErrorDetail(("body", "calendar", "password"), str(exc))],
        ) from exc
    except ProviderError as exc:
        raise ValidationError(
            f"the calendar could not be looked up on {server_url}", [ErrorDetail(loc, str(exc))]
        ) from exc
    try:
        return {**resolved, "url": check_http_url(url)}
    except ValueError as exc:  # the server named a calendar elsewhere that we may not call
        raise ValidationError(
            f"the calendar found on {server_url} is at {url}", [ErrorDetail(loc, str(exc))]
        ) from exc


@dataclass(frozen=True, slots=True)
class UserSpec:
    """What the CRM says about a user; ``calendar`` holds ``provider`` and its fields."""

    name: str
    email: str
    mobile: str
    timezone: str
    country: str | None
    subdivision: str | None
    days_off: Sequence[date]
    calendar: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class DayOff:
    day: date
    source: str
    name: str


@dataclass(frozen=True, slots=True)
class DaysOff:
    start: date
    end: date
    days: Sequence[DayOff]


def split_calendar(calendar: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(provider, public settings, secret settings)`` of a connection."""
    provider = str(calendar["provider"])
    secret_names = SECRET_FIELDS.get(provider, ())
    public = {k: v for k, v in calendar.items() if k != "provider" and k not in secret_names}
    secret = {k: v for k in secret_names if (v := calendar.get(k)) is not None}
    return provider, public, secret


async def put_user(
    session: AsyncSession, box: SecretBox, tenant_id: str, user_id: str, spec: UserSpec
) -> tuple[User, bool]:
    """Creates or replaces the user; returns it and whether it was created."""
    provider, public, secret = split_calendar(spec.calendar)
    user = await session.get(User, (tenant_id, user_id))
    created = user is None
    if user is None:
        user = User(tenant_id=tenant_id, id=user_id)
        session.add(user)
    user.name = spec.name
    user.email = spec.email
    user.mobile = spec.mobile
    user.timezone = spec.timezone
    user.country = spec.country
    user.subdivision = spec.subdivision
    user.days_off = sorted({d.isoformat() for d in spec.days_off})
    await set_calendar(session, box, user, provider, public, secret, created=created)
    return user, created


async def set_calendar(
    session: AsyncSession,
    box: SecretBox,
    user: User,
    provider: str,
    public: dict[str, Any],
    secret: dict[str, Any],
    *,
    created: bool = False,
    signed_in: bool = False,
) -> None:
    """Points the user at a calendar, claiming its mailbox (``signed_in``: the account the
    user signed in with, which may be outside the tenant's domains) and letting the old go."""
    await mailboxes.claim(session, user.tenant_id, provider, public, signed_in=signed_in)
    before = (user.calendar_provider, dict(user.calendar_config or {}))
    if provider != user.calendar_provider or public != user.calendar_config:
        # Days off read from another calendar do not belong to the new one.
        user.provider_days_off = []
    user.calendar_provider = provider
    user.calendar_config = public
    user.calendar_secret = box.encrypt(secret) if secret else None
    user.connection_state = ConnectionState.CONNECTED if signed_in else None
    user.connection_error = None
    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict(
            "the user was created concurrently; retry", [ErrorDetail(("path", "user_id"), "busy")]
        ) from exc
    if not created and before != (provider, public):
        await mailboxes.release(session, user.tenant_id, *before)


async def get_user(session: AsyncSession, tenant_id: str, user_id: str) -> User:
    """The tenant's user; another tenant's id is as unknown as a missing one."""
    user = await session.get(User, (tenant_id, user_id))
    if user is None:
        raise NotFound("no such user", [ErrorDetail(("path", "user_id"), "unknown user")])
    return user


async def list_users(
    session: AsyncSession, tenant_id: str, after: str | None, limit: int
) -> Sequence[User]:
    """Up to ``limit`` users ordered by id, after the id ``after``."""
    query = select(User).where(User.tenant_id == tenant_id).order_by(User.id).limit(limit)
    if after is not None:
        query = query.where(User.id > after)
    return (await session.scalars(query)).all()


async def iter_users(session: AsyncSession, tenant_id: str) -> AsyncIterator[User]:
    """Every user of the tenant by id, streamed for exports."""
    result = await session.stream_scalars(
        select(User).where(User.tenant_id == tenant_id).order_by(User.id)
    )
    async for user in result:
        yield user


async def days_off(
    session: AsyncSession,
    tenant_id: str,
    user_id: str,
    start: date | None,
    end: date | None,
    now: datetime,
) -> DaysOff:
    """The user's days off in ``[start, end]`` from every source, one entry per (day, source).

    Without ``start`` the window starts today in the user's zone; without ``end`` it lasts
    ``DAYS_OFF_DEFAULT_WINDOW_DAYS``.
    """
    user = await get_user(session, tenant_id, user_id)
    if start is None:
        start = now.astimezone(zoneinfo.ZoneInfo(user.timezone)).date()
    if end is None:
        end = start + timedelta(days=DAYS_OFF_DEFAULT_WINDOW_DAYS)
    if end < start:
        raise ValidationError(
            "the window is empty", [ErrorDetail(("query", "to"), "must not be before from")]
        )
    if (end - start).days > DAYS_OFF_MAX_WINDOW_DAYS:
        raise ValidationError(
            "the window is too wide",
            [ErrorDetail(("query", "to"), f"at most {DAYS_OFF_MAX_WINDOW_DAYS} days after from")],
        )
    found: dict[tuple[date, str], str] = {}
    for day in _dates(user.days_off):
        found[(day, "crm")] = ""
    if user.country:
        years = range(start.year, end.year + 1)
        calendar = holidays.country_holidays(user.country, subdiv=user.subdivision, years=years)
        for day, name in calendar.items():
            found[(day, "holiday")] = str(name)
    provider_source = user.calendar_provider if user.calendar_provider != "none" else "calendar"
    for day in _dates(user.provider_days_off):
        found[(day, provider_source)] = ""
    rank = {source: i for i, source in enumerate(SOURCE_ORDER)}
    days = sorted(
        (DayOff(day, source, name) for (day, source), name in found.items() if start <= day <= end),
        key=lambda d: (d.day, rank.get(d.source, len(rank)), d.source),
    )
    return DaysOff(start, end, days)


def _dates(values: Sequence[Any]) -> list[date]:
    return [date.fromisoformat(str(v)) for v in values]
