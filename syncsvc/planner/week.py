"""Windows → slots: the standard week, packed once per (windows, duration, interval, day start).

A day's slots are the same every week, so they are computed once and reused for every user and
every day; the calendar only decides which days (and which slots) are taken away.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import time, timedelta
from functools import lru_cache

from syncsvc.errors import ErrorDetail
from syncsvc.planner.model import WEEKDAYS, Weekday, Window

SECONDS_PER_HOUR = 3600
SECONDS_PER_MINUTE = 60

#: The local wall-clock start and end of one slot.
SlotTime = tuple[time, time]
#: Seven tuples (Monday first) of windows, each already checked and sorted.
Week = tuple[tuple[Window, ...], ...]


@dataclass(frozen=True, slots=True)
class WeekSlots:
    """The slots of a standard week, Monday first, and how many fit in each window."""

    #: Per weekday, the slots in time order.
    days: tuple[tuple[SlotTime, ...], ...]
    #: Per weekday, per window (as in ``windows``), how many slots fit.
    counts: tuple[tuple[int, ...], ...]
    #: Per weekday, the windows as given (sorted), for the preview table.
    windows: Week
    #: Per weekday, each window after ``day_starts_at`` clipped it; ``None`` if nothing is left.
    effective: tuple[tuple[Window | None, ...], ...]


def seconds_of(t: time) -> int:
    """Seconds since local midnight; windows are planned to the second."""
    return t.hour * SECONDS_PER_HOUR + t.minute * SECONDS_PER_MINUTE + t.second


def time_of(seconds: int) -> time:
    return time(seconds // SECONDS_PER_HOUR, seconds % SECONDS_PER_HOUR // 60, seconds % 60)


def whole_seconds(span: timedelta) -> int:
    """A duration in whole seconds, rounded up so that a slot never ends early."""
    return math.ceil(span.total_seconds())


def window_count(length_s: int, duration_s: int, interval_s: int) -> int:
    """How many meetings fit in a window: the first at its start, each next one after a gap."""
    if length_s < duration_s:
        return 0
    return 1 + (length_s - duration_s) // (duration_s + interval_s)


def shortfall_for_one_more(length_s: int, duration_s: int, interval_s: int) -> int:
    """Seconds a window lacks to fit one meeting more than it does now."""
    n = window_count(length_s, duration_s, interval_s)
    return (n + 1) * duration_s + n * interval_s - length_s


def check_week(week: Mapping[Weekday, Sequence[Window]]) -> tuple[Week, list[ErrorDetail]]:
    """Sort each day's windows; report inverted, zoned and overlapping ones by their input index."""
    details: list[ErrorDetail] = []
    base = ("schedule", "week")
    for key in week:
        if key not in WEEKDAYS:
            details.append(ErrorDetail((*base, str(key)), "unknown weekday; use mon..sun"))
    days: list[tuple[Window, ...]] = []
    for day in WEEKDAYS:
        good: list[tuple[Window, int]] = []
        for index, (start, end) in enumerate(week.get(day, ())):
            loc = (*base, day, index)
            if start.tzinfo is not None or end.tzinfo is not None:
                details.append(ErrorDetail(loc, "window times are local wall-clock, without zone"))
            elif not start < end:
                details.append(ErrorDetail(loc, f"window ends ({end}) at or before it starts"))
            else:
                good.append(((start, end), index))
        good.sort()
        for (prev, _), (cur, index) in itertools.pairwise(good):
            if cur[0] < prev[1]:
                details.append(
                    ErrorDetail(
                        (*base, day, index),
                        f"window {cur[0]:%H:%M}-{cur[1]:%H:%M} overlaps "
                        f"{prev[0]:%H:%M}-{prev[1]:%H:%M}",
                    )
                )
        days.append(tuple(window for window, _ in good))
    return tuple(days), details


def clip(window: Window, day_starts_at: time | None) -> Window | None:
    """``day_starts_at`` cuts off the day's early windows; packing restarts at the cut."""
    start, end = window
    if day_starts_at is None or day_starts_at <= start:
        return window
    if end <= day_starts_at:
        return None
    return (day_starts_at, end)


@lru_cache(maxsize=256)
def build_week(
    windows: Week, duration_s: int, interval_s: int, day_starts_at: time | None
) -> WeekSlots:
    """Pack every window of the week once; cached because every user shares the result."""
    days: list[tuple[SlotTime, ...]] = []
    counts: list[tuple[int, ...]] = []
    effective: list[tuple[Window | None, ...]] = []
    for day_windows in windows:
        slots: list[SlotTime] = []
        day_counts: list[int] = []
        day_effective: list[Window | None] = []
        for window in day_windows:
            clipped = clip(window, day_starts_at)
            day_effective.append(clipped)
            if clipped is None:
                day_counts.append(0)
                continue
            start_s, end_s = seconds_of(clipped[0]), seconds_of(clipped[1])
            n = window_count(end_s - start_s, duration_s, interval_s)
            step_s = duration_s + interval_s
            slots.extend(
                (time_of(start_s + i * step_s), time_of(start_s + i * step_s + duration_s))
                for i in range(n)
            )
            day_counts.append(n)
        days.append(tuple(slots))
        counts.append(tuple(day_counts))
        effective.append(tuple(day_effective))
    return WeekSlots(tuple(days), tuple(counts), windows, tuple(effective))
