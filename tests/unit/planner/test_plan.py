"""Targets, assignment, content (tags, invitations, grouping, tasks) and every refusal."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta

import pytest

from syncsvc.errors import ValidationError
from syncsvc.planner import PlanError, plan
from syncsvc.planner.model import Contact, PlanRequest, Schedule, Target, Template
from tests.unit.planner.factory import HOUR, QUARTER, at, request, starts, user

MON = date(2027, 6, 14)


def fails(req: PlanRequest) -> PlanError:
    with pytest.raises(PlanError) as info:
        plan(req)
    assert isinstance(info.value, ValidationError)
    return info.value


def locs(err: PlanError) -> list[tuple[str | int, ...]]:
    return [d.loc for d in err.details]


# --- targets and assignment ---


def test_exclusions_first_then_one_per_organisation_keeps_first_occurrence() -> None:
    rows = [
        Target("p1", "Person 1 at A", organisation_id="A"),
        Target("p2", "Person 2 at A", organisation_id="A"),
        Target("x", "Excluded", organisation_id="B"),
        Target("p3", "Person at B", organisation_id="B"),
        Target("solo", "No organisation"),
        Target("solo", "No organisation, again"),
    ]
    req = replace(request(rows, start=MON), exclude=frozenset({"x"}), one_per_organisation=True)
    assert [a.target_id for a in plan(req).activities] == ["p1", "p3", "solo"]
    everyone = replace(req, one_per_organisation=False)
    assert [a.target_id for a in plan(everyone).activities] == ["p1", "p2", "p3", "solo", "solo"]


def test_users_mode_splits_49_into_25_and_24_contiguous_blocks() -> None:
    result = plan(request(49, start=MON, users=[user("u1"), user("u2")]))
    assert [(u.id, u.count) for u in result.users] == [("u1", 25), ("u2", 24)]
    assert next(a.target_id for a in result.activities if a.user_id == "u2") == "t25"
    # Users plan in parallel: both start with the first slot of the start date.
    assert result.activities[0].start == result.activities[25].start == at(MON, 9)


def test_owner_modes_follow_the_targets_responsible_users_in_parallel() -> None:
    rows = [
        Target("a", "A", owner_id="u1", second_owner_id="u2"),
        Target("b", "B", owner_id="u2", second_owner_id="u1"),
        Target("c", "C", owner_id="u1", second_owner_id="u1"),
    ]
    people = [user("u1"), user("u2")]
    owner = plan(request(rows, start=MON, users=people, mode="owner", listed=()))
    assert [(a.target_id, a.user_id) for a in owner.activities] == [
        ("a", "u1"),
        ("b", "u2"),
        ("c", "u1"),
    ]
    assert starts(owner.activities)[:2] == ["2027-06-14T09:00:00+02:00"] * 2
    second = plan(request(rows, start=MON, users=people, mode="second_owner", listed=()))
    assert [a.user_id for a in second.activities] == ["u2", "u1", "u1"]
    assert [u.id for u in second.users] == ["u2", "u1"]


def test_missing_owner_names_every_target_unless_a_fallback_is_given() -> None:
    rows = [Target("a", "A", owner_id="u1"), Target("b", "B"), Target("c", "C", owner_id="")]
    req = request(rows, start=MON, mode="owner", listed=())
    err = fails(req)
    assert "'b'" in err.message and "'c'" in err.message
    assert locs(err) == [("targets", 1, "owner_id"), ("targets", 2, "owner_id")]
    fallback = replace(req, assignment=replace(req.assignment, fallback_user="u1"))
    assert [a.user_id for a in plan(fallback).activities] == ["u1"] * 3


def test_unknown_users_are_named() -> None:
    err = fails(request(3, start=MON, listed=["u1", "ghost"]))
    assert locs(err) == [("assignment", "users", 1)] and "ghost" in err.message
    rows = [Target("a", "A", owner_id="nobody")]
    err = fails(request(rows, start=MON, mode="owner", listed=()))
    assert "nobody" in err.message


def test_balanced_finish_gives_a_user_with_a_week_off_fewer() -> None:
    """u2 is off the whole first week. By Fri 11 June u1 alone has 25 slots; on Mon 14 June
    both have 5, so the last 5 are dealt u1, u2, u1, u2, u1: 28 + 2, both last on the 14th."""
    first = date(2027, 6, 7)
    week_off = frozenset(first + timedelta(days=i) for i in range(5))
    people = [user("u1", country=None), user("u2", country=None, days_off=week_off)]
    result = plan(request(30, start=first, users=people, mode="balanced_finish"))
    assert [(u.id, u.count, u.last) for u in result.users] == [
        ("u1", 28, MON),
        ("u2", 2, MON),
    ]
    assert [a.user_id for a in result.activities] == ["u1"] * 28 + ["u2"] * 2
    even = plan(request(30, start=first, users=people))
    assert [u.last for u in even.users] == [first + timedelta(days=2), MON + timedelta(days=2)]


# --- content ---


def contacts() -> tuple[Contact, ...]:
    return (
        Contact("p1", "Ann", "Berg", email="ann@x.dk", phone="11", mobile="22"),
        Contact("p2", "Bo", "Blocked", email="bo@x.dk", block_mass_email=True),
        Contact("p3", "Cy", "Gone", email="cy@x.dk", status="resigned"),
    )


def test_every_text_tag_is_filled_once() -> None:
    subject = (
        "$targetgroup-name$|$user-name$|$user-firstname$|$user-lastname$|$user-email$|"
        "$user-mobile$|$contact-firstname$|$contact-lastname$|$contact-email$|$contact-phone$|"
        "$contact-mobile$|$account-name$|$account-email$|$account-phone$"
    )
    rows = [Target("a", "Mikkeller $user-name$", email="m@k.dk", phone="33", contacts=contacts())]
    u = user("u1", name="Christine Marie Kayser", email="ck@x.dk", mobile="+45 1")
    req = request(rows, start=MON, users=[u], template=Template("meeting", subject, "$5 $x"))
    activity = plan(replace(req, targetgroup_name="Breweries")).activities[0]
    assert activity.subject.split("|") == [
        "Breweries",
        "Christine Marie Kayser",
        "Christine",
        "Marie Kayser",
        "ck@x.dk",
        "+45 1",
        "Ann",
        "Berg",
        "ann@x.dk",
        "11",
        "22",
        "Mikkeller $user-name$",
        "m@k.dk",
        "33",
    ]
    assert activity.description == "$5 $x"


def test_unknown_tag_is_a_plan_error_naming_tag_and_field() -> None:
    template = Template("meeting", "Visit", description="Hello $account-nmae$")
    err = fails(request(1, start=MON, template=template))
    assert locs(err) == [("template", "description")]
    assert "$account-nmae$" in err.message


def test_only_asked_and_allowed_contacts_are_invited() -> None:
    rows = [Target("a", "A", contacts=contacts())]
    invite = Template("meeting", "Visit", invite_contacts=True)
    activity = plan(request(rows, start=MON, template=invite)).activities[0]
    assert [(x.contact_id, x.name, x.email) for x in activity.attendees] == [
        ("p1", "Ann Berg", "ann@x.dk")
    ]
    assert plan(request(rows, start=MON)).activities[0].attendees == ()


def test_shared_grouping_makes_one_activity_for_the_first_assignee() -> None:
    rows = [
        Target("a", "A", contacts=(Contact("p1", "Ann", "Berg"),)),
        Target("b", "B", contacts=(Contact("p2", "Bo", "Dahl"), Contact("p1", "Ann", "Berg"))),
        Target("c", "C"),
    ]
    template = Template("meeting", "Meet $account-name$", grouping="shared", invite_contacts=True)
    result = plan(request(rows, start=MON, users=[user("u1"), user("u2")], template=template))
    assert result.total == 1
    (activity,) = result.activities
    assert (activity.user_id, activity.target_id, activity.target_ids) == (
        "u1",
        "a",
        ("a", "b", "c"),
    )
    assert [x.contact_id for x in activity.attendees] == ["p1", "p2"]
    assert activity.subject == "Meet A"
    assert [(u.id, u.count) for u in result.users] == [("u1", 1)]


def test_task_takes_no_slot_and_is_due_from_today_in_the_assignees_zone() -> None:
    now = datetime(2027, 6, 14, 23, 30, tzinfo=UTC)  # 01:30 on the 15th in Copenhagen
    people = [user("cph"), user("ny", timezone="America/New_York", country="US")]
    template = Template("task", "Call $account-name$", due_days=3, status="unanswered")
    result = plan(request(2, start=MON, now=now, users=people, template=template))
    assert [(a.user_id, a.start, a.end, a.due, a.status) for a in result.activities] == [
        ("cph", None, None, date(2027, 6, 18), "unanswered"),
        ("ny", None, None, date(2027, 6, 17), "unanswered"),
    ]
    no_days = plan(request(1, start=MON, now=now, template=Template("task", "x")))
    assert no_days.activities[0].due == date(2027, 6, 15)


def test_calls_take_slots_and_status_defaults_to_planned() -> None:
    activity = plan(request(1, start=MON, template=Template("call", "Ring"))).activities[0]
    assert (activity.kind, activity.start, activity.status) == ("call", at(MON, 9), "planned")


def test_warnings_for_idle_users_and_long_plans() -> None:
    idle = plan(request(1, start=MON, users=[user("u1"), user("u2")]))
    assert [w.code for w in idle.warnings] == ["window_slack", "user_without_activities"]
    assert "u2" in idle.warnings[1].message
    long = plan(request(700, start=MON))  # 25 a week: 28 weeks
    assert "long_plan" in [w.code for w in long.warnings]


def test_the_same_request_gives_the_same_plan() -> None:
    req = request(60, start=MON, users=[user("u1"), user("u2")], mode="balanced_finish")
    assert plan(req) == plan(req)


# --- refusals ---

WEEKDAYS_9_TO_4 = ((time(9), time(12)), (time(12, 30), time(16)))


@pytest.mark.parametrize(
    ("schedule", "loc"),
    [
        (
            {"week": {"mon": ((time(9), time(12)), (time(13), time(12)))}},
            ("schedule", "week", "mon", 1),
        ),
        (
            {"week": {"tue": ((time(9), time(12)), (time(11), time(14)))}},
            ("schedule", "week", "tue", 1),
        ),
        ({"week": {"mon": ((time(9), time(9, 45)),)}}, ("schedule", "duration")),
        ({"week": {}}, ("schedule", "week")),
        ({"duration": timedelta(0)}, ("schedule", "duration")),
        ({"interval": timedelta(minutes=-5)}, ("schedule", "interval")),
        ({"max_per_day": 0}, ("schedule", "max_per_day")),
        ({"day_starts_at": time(15, 30)}, ("schedule", "day_starts_at")),
    ],
)
def test_bad_schedules_are_refused_with_their_location(
    schedule: dict[str, object], loc: tuple[str | int, ...]
) -> None:
    assert loc in locs(fails(request(1, start=MON, **schedule)))


def test_unknown_time_zone_empty_targets_and_naive_now_are_refused() -> None:
    assert locs(fails(request(1, start=MON, users=[user("u1", timezone="Mars/Olympus")]))) == [
        ("users", "u1", "timezone")
    ]
    assert locs(fails(request([], start=MON))) == [("targets",)]
    everything_excluded = replace(request(2, start=MON), exclude=frozenset({"t0", "t1"}))
    assert "after exclusions" in fails(everything_excluded).message
    assert locs(fails(replace(request(1, start=MON), now=datetime(2027, 6, 1)))) == [("now",)]


def test_a_user_with_every_day_off_for_five_years_is_refused_not_looped() -> None:
    off = frozenset(MON + timedelta(days=i) for i in range(6 * 366))
    err = fails(request(1, start=MON, users=[user("u1", days_off=off)]))
    assert locs(err) == [("users", "u1")]
    err = fails(request(1, start=MON, users=[user("u1", days_off=off)], mode="balanced_finish"))
    assert "free slots" in err.message


def test_schedule_defaults_are_the_seed_week() -> None:
    assert Schedule(MON, HOUR, QUARTER).week["mon"] == WEEKDAYS_9_TO_4
