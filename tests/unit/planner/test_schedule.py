"""Standard week, caps, now, skipped days, busy times and time zones, by hand-computed examples."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, time, timedelta
from zoneinfo import ZoneInfo

from syncsvc.planner import next_free_slot, plan
from syncsvc.planner.model import Schedule, WindowCapacity
from tests.unit.planner.factory import HOUR, QUARTER, at, request, starts, user

MON = date(2027, 6, 14)


def test_seed_standard_week_fits_25() -> None:
    result = plan(request(1, start=MON))
    assert result.standard_week_max == 25
    assert result.standard_week["mon"] == (
        WindowCapacity(time(9), time(12), 2),
        WindowCapacity(time(12, 30), time(16), 3),
    )
    assert result.standard_week["sat"] == () and result.standard_week["sun"] == ()
    assert set(result.standard_week) == {"mon", "tue", "wed", "thu", "fri", "sat", "sun"}


def test_ninety_minutes_fit_once_in_the_morning_and_preview_suggests_moving_lunch() -> None:
    result = plan(request(1, start=MON, duration=timedelta(minutes=90)))
    assert [w.count for w in result.standard_week["fri"]] == [1, 2]
    assert result.standard_week_max == 15
    slack = [w for w in result.warnings if w.code == "window_slack"]
    assert len(slack) == 1
    # 09:00-10:30, next 10:45-12:15: 15 minutes short; the afternoon keeps 2 at 12:45-16:00.
    assert "lunch break 12:00–12:30 15 minutes later (12:15–12:45)" in slack[0].suggestion
    assert "each morning on Mon–Fri (+5 a week)" in slack[0].suggestion


def test_seed_meetings_pack_from_window_start_with_interval() -> None:
    result = plan(request(5, start=MON))
    assert starts(result.activities) == [
        "2027-06-14T09:00:00+02:00",
        "2027-06-14T10:15:00+02:00",
        "2027-06-14T12:30:00+02:00",
        "2027-06-14T13:45:00+02:00",
        "2027-06-14T15:00:00+02:00",
    ]
    assert result.activities[0].end is not None
    assert result.activities[0].end.isoformat() == "2027-06-14T10:00:00+02:00"


def test_seed_49_over_two_users_started_at_14_40() -> None:
    """The seed's preview: 25 for Christine (last 23-06), 24 for Jørgen (last 21-06).

    Planned at 14:40 on the start date only the 15:00 slot is left that day; Christine is
    off on 19 and 20 June.
    """
    wed = date(2017, 6, 14)
    ck = user(
        "ck", name="Christine Kayser", days_off=frozenset({date(2017, 6, 19), date(2017, 6, 20)})
    )
    jr = user("jr", name="Jørgen Rode")
    result = plan(request(49, start=wed, now=at(wed, 14, 40), users=[ck, jr]))
    assert result.total == 49
    assert [(u.id, u.count, u.first, u.last) for u in result.users] == [
        ("ck", 25, wed, date(2017, 6, 23)),
        ("jr", 24, wed, date(2017, 6, 21)),
    ]
    assert [a.user_id for a in result.activities] == ["ck"] * 25 + ["jr"] * 24
    assert result.activities[0].start == at(wed, 15)
    assert result.activities[25].start == at(wed, 15)


def test_day_starts_at_clips_the_first_window_and_packing_restarts_there() -> None:
    result = plan(request(3, start=MON, day_starts_at=time(10)))
    assert starts(result.activities)[:2] == [
        "2027-06-14T10:00:00+02:00",
        "2027-06-14T12:30:00+02:00",
    ]
    assert [w.count for w in result.standard_week["mon"]] == [1, 3]
    assert result.standard_week_max == 20


def test_max_per_day_caps_each_user_each_day() -> None:
    result = plan(request(5, start=MON, max_per_day=3))
    assert starts(result.activities) == [
        "2027-06-14T09:00:00+02:00",
        "2027-06-14T10:15:00+02:00",
        "2027-06-14T12:30:00+02:00",
        "2027-06-15T09:00:00+02:00",
        "2027-06-15T10:15:00+02:00",
    ]
    assert result.standard_week_max == 15


def test_now_in_the_middle_of_the_start_day_skips_earlier_slots() -> None:
    result = plan(request(2, start=MON, now=at(MON, 11)))
    assert starts(result.activities) == ["2027-06-14T12:30:00+02:00", "2027-06-14T13:45:00+02:00"]


def test_start_date_in_the_past_begins_at_now() -> None:
    wed = MON + timedelta(days=2)
    result = plan(request(1, start=MON, now=at(wed, 13)))
    assert starts(result.activities) == ["2027-06-16T13:45:00+02:00"]
    assert [w.code for w in result.warnings if w.code == "start_in_past"] == ["start_in_past"]


def test_avoid_busy_skips_overlapping_slots_only_when_asked() -> None:
    busy = ((at(MON, 12), at(MON, 13)),)
    u = user("u1", busy=busy)
    asked = plan(request(4, start=MON, users=[u], avoid_busy=True))
    assert starts(asked.activities) == [
        "2027-06-14T09:00:00+02:00",
        "2027-06-14T10:15:00+02:00",
        "2027-06-14T13:45:00+02:00",
        "2027-06-14T15:00:00+02:00",
    ]
    not_asked = plan(request(3, start=MON, users=[u]))
    assert starts(not_asked.activities)[2] == "2027-06-14T12:30:00+02:00"


def test_danish_easter_2027_is_skipped_and_dst_changes_the_offset() -> None:
    """Wed 24 March, then Maundy Thursday, Good Friday, the weekend, Easter Monday: Tue 30."""
    wed = date(2027, 3, 24)
    result = plan(request(6, start=wed))
    assert starts(result.activities)[4:] == [
        "2027-03-24T15:00:00+01:00",
        "2027-03-30T09:00:00+02:00",
    ]
    kept = plan(request(6, start=wed, skip_public_holidays=False))
    assert starts(kept.activities)[5] == "2027-03-25T09:00:00+01:00"


def test_tenant_closing_days_and_personal_days_off() -> None:
    req = request(6, start=MON, users=[user("u1", days_off=frozenset({MON + timedelta(days=1)}))])
    closed = replace(req, closing_days=frozenset({MON}))
    assert starts(plan(closed).activities)[0] == "2027-06-16T09:00:00+02:00"
    assert starts(plan(req).activities)[5] == "2027-06-16T09:00:00+02:00"
    ignoring = replace(req, schedule=Schedule(MON, HOUR, QUARTER, skip_days_off=False))
    assert starts(plan(ignoring).activities)[5] == "2027-06-15T09:00:00+02:00"


SUNDAY_NIGHT = {"sun": ((time(1, 30), time(4)),)}


def test_spring_forward_gap_slots_are_skipped() -> None:
    """Copenhagen, Sunday 28 March 2027: 02:00-03:00 does not exist."""
    sun = date(2027, 3, 28)
    result = plan(
        request(
            3,
            start=sun,
            week=SUNDAY_NIGHT,
            duration=timedelta(minutes=30),
            interval=timedelta(0),
            skip_public_holidays=False,
        )
    )
    assert starts(result.activities) == [
        "2027-03-28T01:30:00+01:00",
        "2027-03-28T03:00:00+02:00",
        "2027-03-28T03:30:00+02:00",
    ]
    # 01:30-02:00 ends in the gap: it ends at the real instant, 03:00 summer time.
    first_end = result.activities[0].end
    assert first_end is not None and first_end.isoformat() == "2027-03-28T03:00:00+02:00"


def test_fall_back_ambiguous_slots_take_the_first_occurrence() -> None:
    """Copenhagen, Sunday 31 October 2027: 02:00-03:00 happens twice; fold=0 is +02:00."""
    sun = date(2027, 10, 31)
    result = plan(
        request(
            5,
            start=sun,
            week=SUNDAY_NIGHT,
            duration=timedelta(minutes=30),
            interval=timedelta(0),
            skip_public_holidays=False,
        )
    )
    assert starts(result.activities) == [
        "2027-10-31T01:30:00+02:00",
        "2027-10-31T02:00:00+02:00",
        "2027-10-31T02:30:00+02:00",
        "2027-10-31T03:00:00+01:00",
        "2027-10-31T03:30:00+01:00",
    ]


def test_a_week_across_dst_packs_by_local_wall_time() -> None:
    fri = date(2027, 10, 29)
    result = plan(request(10, start=fri))
    assert starts(result.activities)[4:6] == [
        "2027-10-29T15:00:00+02:00",
        "2027-11-01T09:00:00+01:00",
    ]


def test_windows_are_in_each_users_own_zone() -> None:
    ny = user("ny", timezone="America/New_York", country="US")
    result = plan(request(2, start=MON, users=[user("u1"), ny]))
    assert starts(result.activities) == ["2027-06-14T09:00:00+02:00", "2027-06-14T09:00:00-04:00"]
    assert result.activities[1].start is not None
    assert result.activities[1].start.tzinfo == ZoneInfo("America/New_York")


def test_next_free_slot_after_an_instant_skips_taken_and_counts_the_daily_cap() -> None:
    schedule = Schedule(MON, HOUR, QUARTER)
    u = user("u1")
    taken = ((at(MON, 12, 30), at(MON, 13, 30)),)
    assert next_free_slot(schedule, u, at(MON, 11), taken) == (at(MON, 13, 45), at(MON, 14, 45))
    capped = Schedule(MON, HOUR, QUARTER, max_per_day=1)
    tue = MON + timedelta(days=1)
    assert next_free_slot(capped, u, at(MON, 11), taken) == (at(tue, 9), at(tue, 10))
    assert next_free_slot(schedule, u, at(MON, 9)) == (at(MON, 9), at(MON, 10))
