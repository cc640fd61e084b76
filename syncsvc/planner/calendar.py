"""Which days and slots a user can be planned in: zones, holidays, days off, busy times.

Windows are local wall-clock times, so each slot is placed in the user's own IANA zone; a day
with a DST change is checked slot by slot (a start in the spring-forward gap is skipped, an
end in it is moved to the real instant the meeting ends, an ambiguous time takes its first
occurrence, ``fold=0``); every other day takes the fast path.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays

from syncsvc.planner.errors import PlanError
from syncsvc.planner.model import PlanUser
from syncsvc.planner.week import WeekSlots

#: Give up on a user after this many consecutive days without a single free slot (~5 years).
MAX_EMPTY_DAYS = 5 * 366
ONE_DAY = timedelta(days=1)

#: One planned slot: aware start and end in the user's zone.
Slot = tuple[datetime, datetime]


def resolve_zone(name: str, loc: tuple[str | int, ...]) -> ZoneInfo:
    """The user's IANA zone, or a PlanError naming the field (never a bare ZoneInfo error)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise PlanError.at(loc, f"unknown time zone {name!r}") from exc


@lru_cache(maxsize=4096)
def public_holidays(country: str, subdivision: str | None, year: int) -> frozenset[date]:
    """Public holidays of one year, cached: thousands of users share a handful of countries."""
    return frozenset(holidays.country_holidays(country, subdiv=subdivision, years=year))


def check_country(user: PlanUser, year: int) -> None:
    """Fail early (with the field named) on a country or subdivision ``holidays`` lacks."""
    if user.country is None:
        return
    try:
        public_holidays(user.country.upper(), user.subdivision, year)
    except NotImplementedError as exc:
        field = "subdivision" if user.subdivision else "country"
        raise PlanError.at(
            ("users", user.id, field),
            f"no public holidays known for {user.country!r} / {user.subdivision!r}",
        ) from exc


class Busy:
    """Disjoint, sorted intervals (epoch seconds) with a fast overlap test for a slot."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, intervals: Iterable[tuple[datetime, datetime]]) -> None:
        merged: list[list[float]] = []
        for start, end in sorted((s.timestamp(), e.timestamp()) for s, e in intervals):
            if end <= start:
                continue
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._starts = [s for s, _ in merged]
        self._ends = [e for _, e in merged]

    def __bool__(self) -> bool:
        return bool(self._starts)

    def overlaps(self, start: float, end: float) -> bool:
        i = bisect.bisect_right(self._ends, start)
        return i < len(self._starts) and self._starts[i] < end


@dataclass(frozen=True, slots=True)
class UserCalendar:
    """Everything that takes days or slots away from one user."""

    zone: ZoneInfo
    #: Upper-cased country whose public holidays are skipped, or ``None``.
    country: str | None
    subdivision: str | None
    #: Tenant closing days and (when asked) personal days off, merged.
    closed: frozenset[date]
    busy: Busy

    def skipped(self, day: date) -> bool:
        if day in self.closed:
            return True
        return self.country is not None and day in public_holidays(
            self.country, self.subdivision, day.year
        )


def user_calendar(
    user: PlanUser,
    *,
    skip_public_holidays: bool,
    skip_days_off: bool,
    avoid_busy: bool,
    closing_days: frozenset[date],
    extra_busy: Iterable[tuple[datetime, datetime]] = (),
) -> UserCalendar:
    zone = resolve_zone(user.timezone, ("users", user.id, "timezone"))
    for index, (start, end) in enumerate(user.busy):
        if start.tzinfo is None or end.tzinfo is None or end < start:
            raise PlanError.at(
                ("users", user.id, "busy", index), "busy intervals need aware start <= end"
            )
    country = user.country.upper() if skip_public_holidays and user.country else None
    closed = closing_days | user.days_off if skip_days_off else closing_days
    busy = Busy([*(user.busy if avoid_busy else ()), *extra_busy])
    return UserCalendar(zone, country, user.subdivision if country else None, closed, busy)


def _is_real(local: datetime) -> bool:
    """False for a wall time in a spring-forward gap: it does not survive a round trip."""
    back = local.astimezone(UTC).astimezone(local.tzinfo)
    return back.replace(tzinfo=None) == local.replace(tzinfo=None)


def free_days(
    week: WeekSlots,
    cal: UserCalendar,
    *,
    first_day: date,
    now: datetime,
    max_per_day: int | None,
    day_load: Mapping[date, int] | None = None,
) -> Iterator[tuple[date, list[Slot]]]:
    """Yield each day with at least one free slot, in order, from ``first_day`` or today.

    Stops after ``MAX_EMPTY_DAYS`` consecutive days with nothing free (or at the end of the
    calendar), so an impossible request ends instead of looping; callers that still need
    slots turn that into a PlanError. ``day_load`` counts slots already taken per local day
    against ``max_per_day``.
    """
    zone = cal.zone
    combine = datetime.combine
    today = now.astimezone(zone).date()
    day = max(first_day, today)
    busy = cal.busy if cal.busy else None
    empty_days = 0
    while empty_days < MAX_EMPTY_DAYS:
        day_slots = week.days[day.weekday()]
        cap = max_per_day if max_per_day is not None else len(day_slots)
        if day_load:
            cap -= day_load.get(day, 0)
        found: list[Slot] = []
        if day_slots and cap > 0 and not cal.skipped(day):
            if day == date.max:
                return
            midnight = combine(day, datetime.min.time(), zone)
            dst_day = (
                midnight.utcoffset() != combine(day + ONE_DAY, midnight.time(), zone).utcoffset()
            )
            for start_t, end_t in day_slots:
                start = combine(day, start_t, zone)
                end = combine(day, end_t, zone)
                if dst_day:
                    if not _is_real(start):
                        continue
                    if not _is_real(end):
                        end = end.astimezone(UTC).astimezone(zone)
                if day == today and start < now:
                    continue
                if busy is not None and busy.overlaps(start.timestamp(), end.timestamp()):
                    continue
                found.append((start, end))
                if len(found) >= cap:
                    break
        if found:
            empty_days = 0
            yield day, found
        else:
            empty_days += 1
        if day == date.max:
            return
        day += ONE_DAY


def take_slots(days: Iterator[tuple[date, list[Slot]]], count: int) -> list[Slot]:
    """The first ``count`` free slots (fewer if the horizon runs out)."""
    out: list[Slot] = []
    if count <= 0:
        return out
    for _, slots in days:
        out.extend(slots)
        if len(out) >= count:
            del out[count:]
            break
    return out
