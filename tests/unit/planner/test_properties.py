"""Properties over random requests: every plan keeps the rules, and junk only ever fails cleanly."""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter, defaultdict
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import holidays
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncsvc.planner import PlanError, plan
from syncsvc.planner.model import (
    WEEKDAYS,
    Assignment,
    PlanRequest,
    PlanUser,
    Schedule,
    Target,
    Template,
    Window,
)

ZONES = ["Europe/Copenhagen", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata", "UTC"]
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def quarter(n: int) -> time:
    return time(n // 4, n % 4 * 15)


@st.composite
def day_windows(draw: st.DrawFn) -> tuple[Window, ...]:
    cuts = sorted(draw(st.sets(st.integers(1, 95), max_size=4)))
    pairs = list(zip(cuts[::2], cuts[1::2], strict=False))
    return tuple((quarter(a), quarter(b)) for a, b in pairs)


@st.composite
def requests(draw: st.DrawFn) -> PlanRequest:
    start = draw(st.dates(date(2026, 1, 1), date(2028, 12, 31)))
    week = {d: draw(day_windows()) for d in WEEKDAYS}
    week["mon"] = ((time(8), time(17)),)  # always some capacity
    n_users = draw(st.integers(1, 3))
    users = {}
    for i in range(n_users):
        zone = draw(st.sampled_from(ZONES))
        off = draw(st.frozensets(st.integers(0, 40), max_size=8))
        busy_starts = draw(st.lists(st.integers(0, 40 * 96), max_size=5))
        tz = ZoneInfo(zone)
        base = datetime.combine(start, time(0), tz)
        users[f"u{i}"] = PlanUser(
            f"u{i}",
            f"User {i}",
            timezone=zone,
            country=draw(st.sampled_from([None, "DK", "US"])),
            days_off=frozenset(start + timedelta(days=k) for k in off),
            busy=tuple(
                (base + timedelta(minutes=15 * b), base + timedelta(minutes=15 * b + 90))
                for b in busy_starts
            ),
        )
    mode = draw(st.sampled_from(["users", "balanced_finish", "owner"]))
    n = draw(st.integers(1, 40))
    ids = list(users)
    targets = tuple(Target(f"t{i}", f"T{i}", owner_id=draw(st.sampled_from(ids))) for i in range(n))
    schedule = Schedule(
        start_date=start,
        duration=timedelta(minutes=draw(st.integers(3, 36)) * 5),
        interval=timedelta(minutes=draw(st.integers(0, 12)) * 5),
        week=week,
        max_per_day=draw(st.none() | st.integers(1, 6)),
        day_starts_at=draw(st.none() | st.integers(28, 44).map(quarter)),
        skip_public_holidays=draw(st.booleans()),
        skip_days_off=draw(st.booleans()),
        avoid_busy=draw(st.booleans()),
    )
    now = datetime.combine(start, time(0), UTC) + timedelta(
        minutes=draw(st.integers(-3 * 1440, 3 * 1440))
    )
    return PlanRequest(
        targets=targets,
        template=Template(draw(st.sampled_from(["meeting", "call"])), "Visit $account-name$"),
        schedule=schedule,
        assignment=Assignment(mode, tuple(ids)),  # type: ignore[arg-type]
        users=users,
        now=now,
        closing_days=frozenset({start + timedelta(days=draw(st.integers(0, 10)))}),
    )


def window_of(req: PlanRequest, start: datetime, end: datetime) -> Window | None:
    """The (day_starts_at-clipped) window holding a local slot, if any."""
    s = req.schedule
    for a, b in s.week.get(WEEKDAYS[start.weekday()], ()):
        if max(a, s.day_starts_at or a) <= start.time() and end.time() <= b and end > start:
            return (a, b)
    return None


def skipped(req: PlanRequest, user: PlanUser, day: date) -> bool:
    s = req.schedule
    if day in req.closing_days or (s.skip_days_off and day in user.days_off):
        return True
    return bool(
        s.skip_public_holidays
        and user.country
        and day in holidays.country_holidays(user.country, years=day.year)
    )


@QUICK
@given(requests())
def test_every_plan_keeps_the_rules(req: PlanRequest) -> None:
    try:
        result = plan(req)
    except PlanError:
        return  # e.g. a busy, mostly closed calendar; refusing cleanly is allowed
    s = req.schedule
    assert result.total == len(result.activities) == sum(u.count for u in result.users)
    assert [a.target_id for a in result.activities] == [t.id for t in req.targets]
    by_user: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    by_window: dict[tuple[str, date, Window | None], list[tuple[datetime, datetime]]]
    by_window = defaultdict(list)
    for activity in result.activities:
        assert activity.start is not None and activity.end is not None
        user = req.users[activity.user_id]
        zone = ZoneInfo(user.timezone)
        start, end = activity.start.astimezone(zone), activity.end.astimezone(zone)
        assert activity.start >= req.now
        assert not skipped(req, user, start.date())
        window = window_of(req, start, end)
        assert window is not None or end.utcoffset() != start.utcoffset()
        if s.avoid_busy:
            assert all(not (start < b_end and b_start < end) for b_start, b_end in user.busy)
        by_user[activity.user_id].append((activity.start, activity.end))
        by_window[(activity.user_id, start.date(), window)].append((start, end))
    for uid, slots in by_user.items():
        utc = [(a.astimezone(UTC), b.astimezone(UTC)) for a, b in slots]
        assert utc == sorted(utc), f"{uid}'s activities must follow the input order"
        for (_, prev_end), (next_start, _) in itertools.pairwise(utc):
            assert prev_end <= next_start
        days = Counter(a.astimezone(ZoneInfo(req.users[uid].timezone)).date() for a, _ in slots)
        assert s.max_per_day is None or max(days.values()) <= s.max_per_day
    for (_, _, window), in_window in by_window.items():
        for (_, prev_end), (next_start, _) in itertools.pairwise(in_window):
            if window is not None and prev_end.utcoffset() == next_start.utcoffset():
                assert next_start - prev_end >= s.interval
    assert plan(req) == result


junk_times = st.times() | st.times(timezones=st.just(UTC))
junk_window = st.tuples(junk_times, junk_times)


@st.composite
def junk(draw: st.DrawFn) -> PlanRequest:
    ids = draw(st.lists(st.sampled_from(["u1", "u2", "", "ghost"]), max_size=3))
    users = {
        uid: PlanUser(
            uid,
            draw(st.text(max_size=5)),
            timezone=draw(st.sampled_from([*ZONES, "", "Mars/Base", "../etc", "\x00", "UTC+1"])),
            country=draw(st.sampled_from([None, "DK", "dk", "XX", ""])),
            subdivision=draw(st.sampled_from([None, "ZZ"])),
        )
        for uid in draw(st.lists(st.sampled_from(["u1", "u2"]), max_size=2))
    }
    return PlanRequest(
        targets=tuple(
            Target(draw(st.text(max_size=3)), "n", owner_id=draw(st.sampled_from([None, *ids])))
            for _ in range(draw(st.integers(0, 4)))
        ),
        template=Template(
            draw(st.sampled_from(["meeting", "call", "task", "party"])),  # type: ignore[arg-type]
            draw(st.sampled_from(["x", "$user-name$", "$nope-tag$", "$$", "$account-name"])),
            status=draw(st.sampled_from(["planned", "lost"])),
            grouping=draw(st.sampled_from(["per_target", "shared", "mixed"])),  # type: ignore[arg-type]
            due_days=draw(st.none() | st.integers(-5, 10**9)),
        ),
        schedule=Schedule(
            start_date=draw(st.dates()),
            duration=draw(st.timedeltas(timedelta(days=-2), timedelta(days=2))),
            interval=draw(st.timedeltas(timedelta(days=-1), timedelta(days=2))),
            week={d: tuple(draw(st.lists(junk_window, max_size=3))) for d in WEEKDAYS},
            max_per_day=draw(st.none() | st.integers(-2, 5)),
            day_starts_at=draw(st.none() | junk_times),
        ),
        assignment=Assignment(
            draw(st.sampled_from(["owner", "second_owner", "users", "balanced_finish", "x"])),  # type: ignore[arg-type]
            tuple(ids),
            draw(st.sampled_from([None, "u1", "ghost"])),
        ),
        users=users,
        now=draw(st.datetimes(timezones=st.just(UTC)) | st.datetimes()),
        exclude=frozenset(draw(st.lists(st.text(max_size=3), max_size=2))),
    )


@QUICK
@given(junk())
def test_junk_only_ever_raises_plan_error(req: PlanRequest) -> None:
    with contextlib.suppress(PlanError):
        plan(req)
