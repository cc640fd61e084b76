"""Plans: the HTTP body plus the tenant's stored users and the clock make a ``PlanRequest``.

The planner is pure; everything it needs from the database (users, their days off, the
tenant's closing days, existing activities as busy time) is read here, once per request.
With ``avoid_busy`` the users' own calendars are read too (``CalendarBusy``): the plan is made
once without them to learn its window, then again with their busy times (a few rounds if
skipping busy slots pushed the plan past the window read).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from time import monotonic
from typing import Any, cast

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.errors import ErrorDetail, NotFound, SyncSvcError, ValidationError
from syncsvc.planner import plan
from syncsvc.planner.model import (
    WEEKDAYS,
    Assignment,
    AssignmentMode,
    Contact,
    Grouping,
    Kind,
    Plan,
    PlanRequest,
    PlanUser,
    Schedule,
    Target,
    Template,
    Weekday,
    Window,
)
from syncsvc.planner.preview import busy_skipped_warnings, unread_busy_warning
from syncsvc.providers.base import CalendarProvider
from syncsvc.queue.outbox import chunks
from syncsvc.store.models import Activity, Tenant, User

#: The service's clock: injectable so tests and benchmarks plan at a fixed instant.
Clock = Callable[[], datetime]
Interval = tuple[datetime, datetime]

log = logging.getLogger(__name__)

#: A calendar's busy times are reused this long: a preview and the commit that follows it
#: (the CRM's "looks good → commit") read each calendar once.
BUSY_CACHE_TTL_S = 120.0
#: Cached windows kept at most (oldest dropped first).
BUSY_CACHE_MAX = 10_000
#: One provider read covers at most this much (Graph's getSchedule takes at most 62 days).
BUSY_READ_SPAN = timedelta(days=60)
#: Calendars read at once for one plan, and how long one may take before the plan goes on.
BUSY_READ_CONCURRENCY = 8
BUSY_READ_TIMEOUT_S = 15.0
#: The window read reaches this far past the plan's last slot, and is widened at most this
#: many times when skipping busy slots pushed the plan past it.
BUSY_WINDOW_SLACK = timedelta(days=7)
BUSY_ROUNDS = 4


def system_clock() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class PlanSpec:
    """A validated plan body: everything the planner needs except the users and ``now``."""

    targets: tuple[Target, ...]
    template: Template
    schedule: Schedule
    assignment: Assignment
    targetgroup_name: str = ""
    exclude: frozenset[str] = frozenset()
    one_per_organisation: bool = False
    #: The body as JSON, stored with a committed batch so it can be re-rendered later (its
    #: targets are stored from ``targets``, see ``target_json``).
    body: Mapping[str, Any] = field(default_factory=dict)


def parse_hhmm(value: str) -> time:
    """``"09:30"`` → 09:30 (the API has checked the shape)."""
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def parse_span(value: str) -> timedelta:
    """``"01:15"`` → 75 minutes."""
    hours, minutes = value.split(":")
    return timedelta(hours=int(hours), minutes=int(minutes))


def contact_from_json(raw: Mapping[str, Any]) -> Contact:
    return Contact(
        id=str(raw["id"]),
        first_name=str(raw.get("first_name", "")),
        last_name=str(raw.get("last_name", "")),
        email=str(raw.get("email", "")),
        phone=str(raw.get("phone", "")),
        mobile=str(raw.get("mobile", "")),
        block_mass_email=bool(raw.get("block_mass_email", False)),
        status=str(raw.get("status", "active")),
    )


def target_from_json(raw: Mapping[str, Any]) -> Target:
    return Target(
        id=str(raw["id"]),
        name=str(raw.get("name", "")),
        email=str(raw.get("email", "")),
        phone=str(raw.get("phone", "")),
        postcode=str(raw.get("postcode", "")),
        owner_id=raw.get("owner_id"),
        second_owner_id=raw.get("second_owner_id"),
        organisation_id=raw.get("organisation_id"),
        contacts=tuple(contact_from_json(c) for c in raw.get("contacts", [])),
    )


def target_json(target: Target) -> dict[str, Any]:
    """The inverse of :func:`target_from_json`: a target as the stored plan body keeps it."""
    return {
        "id": target.id,
        "name": target.name,
        "email": target.email,
        "phone": target.phone,
        "postcode": target.postcode,
        "owner_id": target.owner_id,
        "second_owner_id": target.second_owner_id,
        "organisation_id": target.organisation_id,
        "contacts": [
            {
                "id": c.id,
                "first_name": c.first_name,
                "last_name": c.last_name,
                "email": c.email,
                "phone": c.phone,
                "mobile": c.mobile,
                "block_mass_email": c.block_mass_email,
                "status": c.status,
            }
            for c in target.contacts
        ],
    }


def template_from_json(raw: Mapping[str, Any]) -> Template:
    return Template(
        kind=cast(Kind, raw["kind"]),
        subject=str(raw["subject"]),
        description=str(raw.get("description", "")),
        location=str(raw.get("location", "")),
        status=str(raw.get("status", "planned")),
        priority=str(raw.get("priority", "normal")),
        reminder_minutes=raw.get("reminder_minutes"),
        invite_contacts=bool(raw.get("invite_contacts", False)),
        grouping=cast(Grouping, raw.get("grouping", "per_target")),
        due_days=raw.get("due_days"),
        fields=dict(raw.get("fields") or {}),
    )


def schedule_from_json(raw: Mapping[str, Any]) -> Schedule:
    """A schedule from its JSON form; ``week`` left out (or null) is the default week."""
    extra: dict[str, Any] = {}
    week = raw.get("week")
    if week is not None:
        extra["week"] = week_from_json(week)
    day_starts_at = raw.get("day_starts_at")
    return Schedule(
        start_date=date.fromisoformat(str(raw["start_date"])),
        duration=parse_span(str(raw["duration"])),
        interval=parse_span(str(raw.get("interval") or "00:00")),
        max_per_day=raw.get("max_per_day"),
        day_starts_at=parse_hhmm(day_starts_at) if day_starts_at else None,
        skip_public_holidays=bool(raw.get("skip_public_holidays", True)),
        skip_days_off=bool(raw.get("skip_days_off", True)),
        avoid_busy=bool(raw.get("avoid_busy", False)),
        **extra,
    )


def week_from_json(raw: Mapping[str, Any]) -> dict[Weekday, tuple[Window, ...]]:
    return {
        day: tuple((parse_hhmm(a), parse_hhmm(b)) for a, b in raw.get(day) or ())
        for day in WEEKDAYS
    }


def spec_from_json(body: Mapping[str, Any], targets: tuple[Target, ...] | None = None) -> PlanSpec:
    """The one conversion from a (validated) JSON plan body to planner values (``targets``
    when the caller has them already, as the API does).

    The API validates the shape first; a stored batch's body converts the same way later.
    """
    assignment = body["assignment"]
    return PlanSpec(
        targets=targets
        if targets is not None
        else tuple(target_from_json(t) for t in body["targets"]),
        template=template_from_json(body["template"]),
        schedule=schedule_from_json(body["schedule"]),
        assignment=Assignment(
            mode=cast(AssignmentMode, assignment["mode"]),
            users=tuple(assignment.get("users") or ()),
            fallback_user=assignment.get("fallback_user"),
        ),
        targetgroup_name=str(body.get("targetgroup_name", "")),
        exclude=frozenset(body.get("exclude") or ()),
        one_per_organisation=bool(body.get("one_per_organisation", False)),
        body=body,
    )


@dataclass(frozen=True, slots=True)
class PlanContext:
    """A planned request with the inputs it was planned from (a batch stores them)."""

    request: PlanRequest
    plan: Plan
    users: Mapping[str, User]


def referenced_users(spec: PlanSpec) -> dict[str, tuple[str | int, ...]]:
    """Every user id the plan may assign to, with where in the body it was named first."""
    named: dict[str, tuple[str | int, ...]] = {}
    for index, user_id in enumerate(spec.assignment.users):
        named.setdefault(user_id, ("assignment", "users", index))
    if spec.assignment.fallback_user is not None:
        named.setdefault(spec.assignment.fallback_user, ("assignment", "fallback_user"))
    owner_field = {"owner": "owner_id", "second_owner": "second_owner_id"}.get(spec.assignment.mode)
    if owner_field is not None:
        for index, target in enumerate(spec.targets):
            if target.id in spec.exclude:
                continue
            owner = getattr(target, owner_field)
            if owner is not None:
                named.setdefault(owner, ("targets", index, owner_field))
    return named


async def load_users(
    session: AsyncSession, tenant_id: str, wanted: Mapping[str, tuple[str | int, ...]]
) -> dict[str, User]:
    """The tenant's users by id; an id the tenant does not have is a 422 naming where it was."""
    found: dict[str, User] = {}
    ids = list(wanted)
    for chunk in chunks(ids):
        rows = await session.scalars(
            select(User).where(User.tenant_id == tenant_id, User.id.in_(chunk))
        )
        found.update({u.id: u for u in rows})
    missing = [
        ErrorDetail(loc, f"unknown user {uid!r}") for uid, loc in wanted.items() if uid not in found
    ]
    if missing:
        raise ValidationError(missing[0].msg if len(missing) == 1 else "unknown users", missing)
    return found


def plan_user(user: User, busy: Iterable[tuple[datetime, datetime]] = ()) -> PlanUser:
    """Days off are the CRM's and the calendar's together: either keeps the user away."""
    days_off = frozenset(
        date.fromisoformat(str(d)) for d in (*user.days_off, *user.provider_days_off)
    )
    return PlanUser(
        id=user.id,
        name=user.name,
        email=user.email,
        mobile=user.mobile,
        timezone=user.timezone,
        country=user.country,
        subdivision=user.subdivision,
        days_off=days_off,
        busy=tuple(busy),
    )


async def busy_times(
    session: AsyncSession, tenant_id: str, user_ids: Iterable[str], since: datetime
) -> dict[str, list[tuple[datetime, datetime]]]:
    """Activities already planned for these users: a user is not in two meetings at once."""
    busy: dict[str, list[tuple[datetime, datetime]]] = {}
    for chunk in chunks(list(user_ids)):
        rows = await session.execute(
            select(Activity.user_id, Activity.start, Activity.end).where(
                Activity.tenant_id == tenant_id,
                Activity.user_id.in_(chunk),
                Activity.deleted.is_(False),
                Activity.status != "cancelled",
                Activity.end > since,
            )
        )
        for user_id, start, end in rows:
            if start is not None and end is not None:
                busy.setdefault(user_id, []).append((start, end))
    return busy


@dataclass(frozen=True, slots=True)
class _Cached:
    expires_s: float
    start: datetime
    end: datetime
    intervals: tuple[Interval, ...]


@dataclass(frozen=True, slots=True)
class BusyRead:
    """Busy intervals per user id, and the users whose calendar could not be read."""

    busy: Mapping[str, tuple[Interval, ...]]
    unread: tuple[str, ...] = ()


class CalendarBusy:
    """Reads users' busy times from their calendars (Graph getSchedule, Google freeBusy, CalDAV
    time-range query), concurrently, each cached for ``ttl_s`` per tenant, user, connection and
    window. A calendar that fails or times out is reported as unread, never raised: a plan
    without one user's calendar is still a plan (the preview warns)."""

    def __init__(
        self,
        providers: Callable[[User], Awaitable[CalendarProvider]],
        *,
        ttl_s: float = BUSY_CACHE_TTL_S,
        timeout_s: float = BUSY_READ_TIMEOUT_S,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self._providers = providers
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._cache: dict[tuple[str, str, str], _Cached] = {}
        self._gate = asyncio.Semaphore(BUSY_READ_CONCURRENCY)
        #: Provider reads made (one per user and ``BUSY_READ_SPAN``); benchmarks print it.
        self.reads = 0

    async def read(self, users: Iterable[User], start: datetime, end: datetime) -> BusyRead:
        connected = [u for u in users if u.calendar_provider not in ("", "none")]
        answers = await asyncio.gather(*(self._one(u, start, end) for u in connected))
        busy = {u.id: got for u, got in zip(connected, answers, strict=True) if got is not None}
        unread = tuple(u.id for u, got in zip(connected, answers, strict=True) if got is None)
        return BusyRead(busy, unread)

    async def _one(self, user: User, start: datetime, end: datetime) -> tuple[Interval, ...] | None:
        key = (user.tenant_id, user.id, user.calendar_provider + repr(user.calendar_config))
        now_s = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit.expires_s > now_s and hit.start <= start and end <= hit.end:
            return hit.intervals
        try:
            async with self._gate, asyncio.timeout(self._timeout_s):
                provider = await self._providers(user)
                found: list[Interval] = []
                low = start
                while low < end:
                    high = min(low + BUSY_READ_SPAN, end)
                    self.reads += 1
                    found += [
                        (b.start, b.end)
                        for b in await provider.busy(low, high)
                        if b.start.tzinfo and b.end.tzinfo and b.start < b.end  # the planner's rule
                    ]
                    low = high
        except (SyncSvcError, OSError, TimeoutError) as exc:
            log.warning("busy times of user %s could not be read: %s", user.id, exc)
            return None
        intervals = tuple(found)
        if len(self._cache) >= BUSY_CACHE_MAX:
            self._cache = {k: v for k, v in self._cache.items() if v.expires_s > now_s}
            while len(self._cache) >= BUSY_CACHE_MAX:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = _Cached(now_s + self._ttl_s, start, end, intervals)
        return intervals


def plan_window(result: Plan, now: datetime, start_date: date) -> tuple[datetime, datetime] | None:
    """The span whose calendar busy times matter to ``result``: from its first day (or now)
    to ``BUSY_WINDOW_SLACK`` past its last slot; ``None`` when nothing has a slot (tasks)."""
    ends = [a.end for a in result.activities if a.end is not None]
    if not ends:
        return None
    # A day early: the first day starts at midnight in the users' zones, not in UTC.
    first = datetime.combine(start_date - timedelta(days=1), time(), UTC)
    return max(first, now), max(ends) + BUSY_WINDOW_SLACK


async def closing_days(session: AsyncSession, tenant_id: str) -> frozenset[date]:
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"tenant {tenant_id!r} not found")
    return frozenset(date.fromisoformat(str(d)) for d in tenant.closing_days)


async def prepare(
    session: AsyncSession,
    tenant_id: str,
    spec: PlanSpec,
    now: datetime,
    calendars: CalendarBusy | None = None,
) -> PlanContext:
    """Reads what the plan needs and plans it; a ``PlanError`` is already a 422.

    With ``avoid_busy`` and ``calendars``, the users' calendar busy times count too.
    """
    users = await load_users(session, tenant_id, referenced_users(spec))
    busy: Mapping[str, list[tuple[datetime, datetime]]] = {}
    if spec.schedule.avoid_busy:
        busy = await busy_times(session, tenant_id, users, now)
    request = PlanRequest(
        targets=spec.targets,
        template=spec.template,
        schedule=spec.schedule,
        assignment=spec.assignment,
        users={uid: plan_user(u, busy.get(uid, ())) for uid, u in users.items()},
        now=now,
        targetgroup_name=spec.targetgroup_name,
        exclude=spec.exclude,
        one_per_organisation=spec.one_per_organisation,
        closing_days=await closing_days(session, tenant_id),
    )
    result = await asyncio.to_thread(plan, request)  # pure and CPU-bound: off the loop
    if spec.schedule.avoid_busy and calendars is not None:
        request, result = await _around_calendars(request, result, users, calendars, busy)
    return PlanContext(request=request, plan=result, users=users)


async def _around_calendars(
    request: PlanRequest,
    first: Plan,
    users: Mapping[str, User],
    calendars: CalendarBusy,
    own: Mapping[str, Sequence[Interval]],
) -> tuple[PlanRequest, Plan]:
    """Plans again around the calendars' busy times until the window read covers the plan."""
    window = plan_window(first, request.now, request.schedule.start_date)
    if window is None:
        return request, first
    result = first
    read = BusyRead({})
    for _ in range(BUSY_ROUNDS):
        read = await calendars.read(users.values(), *window)
        request = replace(
            request,
            users={
                uid: replace(u, busy=(*own.get(uid, ()), *read.busy.get(uid, ())))
                for uid, u in request.users.items()
            },
        )
        result = await asyncio.to_thread(plan, request)
        wider = plan_window(result, request.now, request.schedule.start_date)
        if wider is None or wider[1] - BUSY_WINDOW_SLACK <= window[1]:
            break
        window = (window[0], wider[1])
    extra = busy_skipped_warnings(first.activities, read.busy, request.users)
    if read.unread:
        extra.append(unread_busy_warning([request.users[u] for u in read.unread]))
    return request, replace(result, warnings=(*result.warnings, *extra))


async def preview(
    session: AsyncSession,
    tenant_id: str,
    spec: PlanSpec,
    now: datetime,
    calendars: CalendarBusy | None = None,
) -> Plan:
    """``POST /v1/plans``: the plan as it would be committed now; writes nothing."""
    return (await prepare(session, tenant_id, spec, now, calendars)).plan
