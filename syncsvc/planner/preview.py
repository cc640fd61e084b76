"""What the CRM shows before it commits: the standard week, per-user summaries, warnings.

Warnings carry a concrete suggestion computed from the schedule (the seed's "moving the lunch
break 15 minutes later fits one more meeting each morning"), and come in a fixed order so the
same request always previews the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import date, datetime, time, timedelta

from syncsvc.planner.model import (
    WEEKDAYS,
    PlannedActivity,
    PlanUser,
    PlanWarning,
    UserSummary,
    Weekday,
    Window,
    WindowCapacity,
)
from syncsvc.planner.week import (
    SECONDS_PER_MINUTE,
    WeekSlots,
    seconds_of,
    shortfall_for_one_more,
    time_of,
    window_count,
)

#: A window whose next meeting is at most this far out gets a ``window_slack`` warning.
SLACK_SUGGEST_MAX_S = 30 * SECONDS_PER_MINUTE
#: A plan that runs longer than this gets a ``long_plan`` warning.
LONG_PLAN_WEEKS = 26
LAST_SECOND_OF_DAY_S = 24 * 3600 - 1
#: Windows ending by then are "mornings", starting from then "afternoons", in suggestions.
NOON = time(12, 0)
DAY_NAMES = {d: d.capitalize() for d in WEEKDAYS}


def standard_week(
    week: WeekSlots | None, windows: Sequence[tuple[Window, ...]], max_per_day: int | None
) -> tuple[dict[Weekday, tuple[WindowCapacity, ...]], int]:
    """Each window as entered with how many fit (after ``day_starts_at``), and the weekly max.

    The maximum counts ``max_per_day``; tasks take no slot, so their week is all zeros.
    """
    table: dict[Weekday, tuple[WindowCapacity, ...]] = {}
    weekly = 0
    for index, day in enumerate(WEEKDAYS):
        counts = week.counts[index] if week is not None else (0,) * len(windows[index])
        table[day] = tuple(
            WindowCapacity(start, end, n)
            for (start, end), n in zip(windows[index], counts, strict=True)
        )
        day_total = sum(counts)
        weekly += day_total if max_per_day is None else min(day_total, max_per_day)
    return table, weekly


def summaries(
    order: Sequence[str], users: Mapping[str, PlanUser], activities: Sequence[PlannedActivity]
) -> tuple[UserSummary, ...]:
    count = dict.fromkeys(order, 0)
    first: dict[str, date] = {}
    last: dict[str, date] = {}
    for activity in activities:
        day = activity.start.date() if activity.start is not None else activity.due
        uid = activity.user_id
        count[uid] += 1
        if day is not None:
            if uid not in first or day < first[uid]:
                first[uid] = day
            if uid not in last or day > last[uid]:
                last[uid] = day
    return tuple(
        UserSummary(uid, users[uid].name, count[uid], first.get(uid), last.get(uid))
        for uid in order
    )


def _hhmm(t: time) -> str:
    return f"{t:%H:%M}"


def _days_text(days: Sequence[int]) -> str:
    """ "Mon–Fri" for a run of weekdays, otherwise a list."""
    if len(days) > 2 and list(days) == list(range(days[0], days[-1] + 1)):
        return f"{DAY_NAMES[WEEKDAYS[days[0]]]}–{DAY_NAMES[WEEKDAYS[days[-1]]]}"
    return ", ".join(DAY_NAMES[WEEKDAYS[d]] for d in days)


def _where(window: Window) -> str:
    if window[1] <= NOON:
        return "each morning"
    if window[0] >= NOON:
        return "each afternoon"
    return f"in {_hhmm(window[0])}–{_hhmm(window[1])}"


def _slack_fix(
    week: WeekSlots, day: int, index: int, duration_s: int, interval_s: int
) -> str | None:
    """The smallest window move (≤ 30 min) that fits one more meeting, in words, or None.

    Tried in this order: shift the break after the window (if the next window keeps its
    count), end the window later (keeping some break), start it earlier.
    """
    window = week.effective[day][index]
    if window is None:
        return None
    start_s, end_s = seconds_of(window[0]), seconds_of(window[1])
    short_s = shortfall_for_one_more(end_s - start_s, duration_s, interval_s)
    if short_s > SLACK_SUGGEST_MAX_S:
        return None
    move_s = math.ceil(short_s / SECONDS_PER_MINUTE) * SECONDS_PER_MINUTE
    minutes = move_s // SECONDS_PER_MINUTE
    later = week.effective[day][index + 1] if index + 1 < len(week.effective[day]) else None
    if later is not None:
        next_start_s, next_end_s = seconds_of(later[0]), seconds_of(later[1])
        before = week.counts[day][index + 1]
        if next_start_s + move_s < next_end_s and before == window_count(
            next_end_s - next_start_s - move_s, duration_s, interval_s
        ):
            name = (
                "lunch break" if window[1] >= time(11, 0) and later[0] <= time(14, 0) else "break"
            )
            return (
                f"moving the {name} {_hhmm(window[1])}–{_hhmm(later[0])} {minutes} minutes "
                f"later ({_hhmm(time_of(end_s + move_s))}–{_hhmm(time_of(next_start_s + move_s))})"
                f" fits one more meeting {_where(window)}"
            )
    end_limit_s = LAST_SECOND_OF_DAY_S + 1 if later is None else seconds_of(later[0])
    if end_s + move_s < end_limit_s:
        return (
            f"ending {_hhmm(window[0])}–{_hhmm(window[1])} {minutes} minutes later, at "
            f"{_hhmm(time_of(end_s + move_s))}, fits one more meeting {_where(window)}"
        )
    earlier = week.effective[day][index - 1] if index > 0 else None
    floor_s = seconds_of(earlier[1]) if earlier is not None else 0
    if window == week.windows[day][index] and start_s - move_s >= floor_s:
        return (
            f"starting {_hhmm(window[0])}–{_hhmm(window[1])} {minutes} minutes earlier, at "
            f"{_hhmm(time_of(start_s - move_s))}, fits one more meeting {_where(window)}"
        )
    return None


def slack_warnings(
    week: WeekSlots, duration_s: int, interval_s: int, max_per_day: int | None
) -> list[PlanWarning]:
    """One ``window_slack`` warning per distinct window and fix, naming the weekdays it helps."""
    grouped: dict[tuple[Window, int, int, str], list[int]] = {}
    for day in range(len(WEEKDAYS)):
        if max_per_day is not None and sum(week.counts[day]) >= max_per_day:
            continue
        for index, window in enumerate(week.effective[day]):
            fix = _slack_fix(week, day, index, duration_s, interval_s)
            if window is None or fix is None:
                continue
            length_s = seconds_of(window[1]) - seconds_of(window[0])
            n = week.counts[day][index]
            used_s = n * duration_s + max(n - 1, 0) * interval_s
            grouped.setdefault((window, n, length_s - used_s, fix), []).append(day)
    warnings: list[PlanWarning] = []
    for (window, n, unused_s, fix), days in grouped.items():
        when = _days_text(days)
        warnings.append(
            PlanWarning(
                "window_slack",
                f"{_hhmm(window[0])}–{_hhmm(window[1])} on {when} fits {n} meeting"
                f"{'' if n == 1 else 's'} and leaves {unused_s // SECONDS_PER_MINUTE} minutes "
                "unused",
                f"{fix[0].upper()}{fix[1:]} on {when} (+{len(days)} a week).",
            )
        )
    return warnings


def empty_user_warnings(summary: Sequence[UserSummary], mode: str) -> list[PlanWarning]:
    why = (
        "has no free slot before the others are done"
        if mode == "balanced_finish"
        else "gets no activities: there are fewer targets than users"
    )
    return [
        PlanWarning(
            "user_without_activities",
            f"User {s.name or s.id} ({s.id}) {why}.",
            "Choose fewer users, or check this user's days off.",
        )
        for s in summary
        if s.count == 0
    ]


def long_plan_warning(
    start: date, summary: Sequence[UserSummary], weekly: int
) -> list[PlanWarning]:
    lasts = [s.last for s in summary if s.last is not None]
    if not lasts or max(lasts) - start <= timedelta(weeks=LONG_PLAN_WEEKS):
        return []
    end = max(lasts)
    weeks = (end - start).days // 7
    return [
        PlanWarning(
            "long_plan",
            f"The plan runs until {end.isoformat()}, {weeks} weeks after its start date.",
            f"Add users, widen the windows or shorten the duration; a standard week fits "
            f"{weekly} per user.",
        )
    ]


#: Skipped slots named in a ``busy_skipped`` warning before "and N more".
BUSY_SKIPPED_LISTED = 10


def busy_skipped_warnings(
    unaware: Sequence[PlannedActivity],
    busy: Mapping[str, Sequence[tuple[datetime, datetime]]],
    users: Mapping[str, PlanUser],
) -> list[PlanWarning]:
    """One warning per user naming the slots skipped as busy in their calendar: the slots a
    plan made without the calendars (``unaware``) would have taken that overlap a busy time."""
    skipped: dict[str, list[PlannedActivity]] = {}
    for activity in unaware:
        start, end = activity.start, activity.end
        if start is None or end is None:
            continue
        if any(
            b_start < end and start < b_end for b_start, b_end in busy.get(activity.user_id, ())
        ):
            skipped.setdefault(activity.user_id, []).append(activity)
    warnings = []
    for uid, activities in skipped.items():
        user = users[uid]
        slots = [
            f"{a.start:%a %Y-%m-%d %H:%M}–{a.end:%H:%M}"
            for a in activities[:BUSY_SKIPPED_LISTED]
            if a.start is not None and a.end is not None
        ]
        more = len(activities) - len(slots)
        listed = ", ".join(slots) + (f" and {more} more" if more else "")
        warnings.append(
            PlanWarning(
                "busy_skipped",
                f"User {user.name or uid} ({uid}): {len(activities)} slot(s) skipped as busy in "
                f"their calendar: {listed}.",
                "The activities moved to the next free slots.",
            )
        )
    return warnings


def unread_busy_warning(users: Sequence[PlanUser]) -> PlanWarning:
    names = ", ".join(f"{u.name or u.id} ({u.id})" for u in users)
    return PlanWarning(
        "busy_unread",
        f"Busy times of {names} could not be read from their calendar; the plan avoids only "
        "the activities syncsvc knows.",
        "Check the calendar connection, or preview again later.",
    )
