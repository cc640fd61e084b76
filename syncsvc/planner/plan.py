"""The planner's entry points: ``plan`` (a whole batch) and ``next_free_slot`` (a follow-up).

Both are pure: the request carries ``now``, the users' days off and busy times; nothing here
reads a clock, a file or the network. Bad input of any kind ends in a ``PlanError``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from datetime import date, datetime, timedelta

from syncsvc.errors import ErrorDetail
from syncsvc.planner import assign, preview
from syncsvc.planner.calendar import (
    Slot,
    UserCalendar,
    check_country,
    free_days,
    resolve_zone,
    take_slots,
    user_calendar,
)
from syncsvc.planner.errors import PlanError
from syncsvc.planner.model import (
    Attendee,
    Plan,
    PlannedActivity,
    PlanRequest,
    PlanUser,
    PlanWarning,
    Schedule,
    Target,
)
from syncsvc.planner.tags import Text, fixed_values, parse
from syncsvc.planner.week import (
    Week,
    WeekSlots,
    build_week,
    check_week,
    seconds_of,
    whole_seconds,
)

KINDS = ("meeting", "call", "task")
SLOT_KINDS = frozenset({"meeting", "call"})
STATUSES = frozenset({"planned", "completed", "cancelled", "unanswered"})
GROUPINGS = ("per_target", "shared")
MODES = ("owner", "second_owner", "users", "balanced_finish")
#: Dates outside these years are refused: they are typos, and keep date arithmetic in range.
MIN_YEAR = 1900
MAX_YEAR = 9000
#: Contacts with this status are never invited.
RESIGNED = "resigned"


def plan(request: PlanRequest) -> Plan:
    """Plan every target of the request; raise ``PlanError`` for anything that cannot be planned."""
    _check_request(request)
    schedule, template = request.schedule, request.template
    windows, week_details = check_week(schedule.week)
    if week_details:
        raise PlanError.collected(week_details)
    week = _week(schedule, windows) if template.kind in SLOT_KINDS else None
    subject = parse(template.subject, ("template", "subject"))
    description = parse(template.description, ("template", "description"))
    targets = select_targets(request)
    shared = template.grouping == "shared"
    units: list[tuple[Target, ...]] = [tuple(targets)] if shared else [(t,) for t in targets]

    mode = request.assignment.mode
    if mode in ("owner", "second_owner"):
        owners = assign.by_owner(targets, request.assignment, request.users)
        unit_users = owners[:1] if shared else owners
        order = list(dict.fromkeys(unit_users))
    else:
        assign.check_listed(request.assignment, request.users)
        order = list(request.assignment.users[:1] if shared else request.assignment.users)
        unit_users = []

    slots_by_user: dict[str, list[Slot]] = {}
    if week is None:
        if not unit_users:
            unit_users = _blocks(order, assign.even_blocks(len(units), len(order)))
    else:
        calendars = {uid: _calendar(request, uid) for uid in order}
        if unit_users:
            needed = Counter(unit_users)
            slots_by_user = {
                uid: _slots_for(request, week, calendars[uid], uid, needed[uid]) for uid in order
            }
        elif mode == "users":
            sizes = assign.even_blocks(len(units), len(order))
            unit_users = _blocks(order, sizes)
            slots_by_user = {
                uid: _slots_for(request, week, calendars[uid], uid, size)
                for uid, size in zip(order, sizes, strict=True)
            }
        else:
            streams = [_days(request, week, calendars[uid]) for uid in order]
            taken = assign.balanced_blocks(len(units), streams)
            slots_by_user = dict(zip(order, taken, strict=True))
            unit_users = _blocks(order, [len(t) for t in taken])

    activities = _activities(request, units, unit_users, slots_by_user, subject, description)
    table, weekly = preview.standard_week(week, windows, schedule.max_per_day)
    summary = preview.summaries(order, request.users, activities)
    warnings = []
    if week is not None:
        warnings += preview.slack_warnings(
            week,
            whole_seconds(schedule.duration),
            whole_seconds(schedule.interval),
            schedule.max_per_day,
        )
    warnings += _past_start_warning(request)
    warnings += preview.empty_user_warnings(summary, mode)
    if week is not None:
        warnings += preview.long_plan_warning(schedule.start_date, summary, weekly)
    warnings += _uninvited_warning(request, targets)
    return Plan(
        total=len(activities),
        start_date=schedule.start_date,
        standard_week=table,
        standard_week_max=weekly,
        users=summary,
        activities=tuple(activities),
        warnings=tuple(warnings),
    )


def next_free_slot(
    schedule: Schedule,
    user: PlanUser,
    after: datetime,
    taken: Sequence[tuple[datetime, datetime]] = (),
    *,
    closing_days: frozenset[date] = frozenset(),
) -> Slot:
    """The user's first free slot starting at or after ``after`` (for a follow-up call).

    Slots overlapping ``taken`` (the user's planned activities) are not free, and those
    activities count against ``max_per_day`` on their local day. Holidays, days off and (with
    ``avoid_busy``) busy times are skipped exactly as ``plan`` skips them.
    """
    details = _check_schedule(schedule)
    if after.tzinfo is None or after.utcoffset() is None:
        details.append(ErrorDetail(("after",), "must be an aware datetime"))
    for index, (start, end) in enumerate(taken):
        if start.tzinfo is None or end.tzinfo is None:
            details.append(ErrorDetail(("taken", index), "must be aware datetimes"))
    windows, week_details = check_week(schedule.week)
    details += week_details
    if details:
        raise PlanError.collected(details)
    week = _week(schedule, windows)
    cal = user_calendar(
        user,
        skip_public_holidays=schedule.skip_public_holidays,
        skip_days_off=schedule.skip_days_off,
        avoid_busy=schedule.avoid_busy,
        closing_days=closing_days,
        extra_busy=taken,
    )
    if schedule.skip_public_holidays:
        check_country(user, schedule.start_date.year)
    load = Counter(start.astimezone(cal.zone).date() for start, _ in taken)
    days = free_days(
        week,
        cal,
        first_day=schedule.start_date,
        now=after,
        max_per_day=schedule.max_per_day,
        day_load=load,
    )
    for _, slots in days:
        return slots[0]
    raise PlanError.at(("users", user.id), f"user {user.id!r} has no free slot within 5 years")


def select_targets(request: PlanRequest) -> list[Target]:
    """Exclusions first, then (when asked) the first occurrence per organisation, order kept."""
    targets = [t for t in request.targets if t.id not in request.exclude]
    if request.one_per_organisation:
        seen: set[str] = set()
        kept: list[Target] = []
        for target in targets:
            key = target.organisation_id or target.id
            if key not in seen:
                seen.add(key)
                kept.append(target)
        targets = kept
    if not targets:
        reason = "after exclusions" if request.targets else "in the request"
        raise PlanError.at(("targets",), f"no targets left {reason}")
    return targets


def _check_request(request: PlanRequest) -> None:
    details = _check_schedule(request.schedule, slots=request.template.kind in SLOT_KINDS)
    now = request.now
    if now.tzinfo is None or now.utcoffset() is None:
        details.append(ErrorDetail(("now",), "must be an aware datetime"))
    elif not MIN_YEAR <= now.year <= MAX_YEAR:
        details.append(ErrorDetail(("now",), f"year must be {MIN_YEAR}..{MAX_YEAR}"))
    template = request.template
    if template.kind not in KINDS:
        details.append(ErrorDetail(("template", "kind"), f"must be one of {', '.join(KINDS)}"))
    if template.grouping not in GROUPINGS:
        details.append(ErrorDetail(("template", "grouping"), "must be per_target or shared"))
    if template.status not in STATUSES:
        details.append(
            ErrorDetail(("template", "status"), f"must be one of {', '.join(sorted(STATUSES))}")
        )
    if template.due_days is not None and not 0 <= template.due_days <= 366 * 100:
        details.append(ErrorDetail(("template", "due_days"), "must be 0..36600 days"))
    if template.reminder_minutes is not None and template.reminder_minutes < 0:
        details.append(ErrorDetail(("template", "reminder_minutes"), "must not be negative"))
    if request.assignment.mode not in MODES:
        details.append(ErrorDetail(("assignment", "mode"), f"must be one of {', '.join(MODES)}"))
    if details:
        raise PlanError.collected(details)


def _check_schedule(schedule: Schedule, *, slots: bool = True) -> list[ErrorDetail]:
    """Field checks; a task takes no slot, so its duration is not checked."""
    details: list[ErrorDetail] = []
    if not MIN_YEAR <= schedule.start_date.year <= MAX_YEAR:
        details.append(
            ErrorDetail(("schedule", "start_date"), f"year must be {MIN_YEAR}..{MAX_YEAR}")
        )
    if slots:
        details += _check_slot_fields(schedule)
    if schedule.day_starts_at is not None and schedule.day_starts_at.tzinfo is not None:
        details.append(
            ErrorDetail(("schedule", "day_starts_at"), "is local wall-clock, without zone")
        )
    return details


def _check_slot_fields(schedule: Schedule) -> list[ErrorDetail]:
    """Duration, interval and daily cap matter only to kinds that take a slot."""
    details: list[ErrorDetail] = []
    if schedule.duration <= timedelta(0):
        details.append(ErrorDetail(("schedule", "duration"), "must be longer than zero"))
    elif schedule.duration >= timedelta(days=1):
        details.append(ErrorDetail(("schedule", "duration"), "must be shorter than a day"))
    if schedule.interval < timedelta(0):
        details.append(ErrorDetail(("schedule", "interval"), "must not be negative"))
    elif schedule.interval >= timedelta(days=1):
        details.append(ErrorDetail(("schedule", "interval"), "must be shorter than a day"))
    if schedule.max_per_day is not None and schedule.max_per_day < 1:
        details.append(ErrorDetail(("schedule", "max_per_day"), "must be at least 1"))
    return details


def _week(schedule: Schedule, windows: Week) -> WeekSlots:
    """The packed standard week, or a PlanError when not a single meeting fits anywhere."""
    duration_s = whole_seconds(schedule.duration)
    week = build_week(windows, duration_s, whole_seconds(schedule.interval), schedule.day_starts_at)
    if any(week.days):
        return week
    lengths = [seconds_of(end) - seconds_of(start) for day in windows for start, end in day]
    if not lengths:
        raise PlanError.at(("schedule", "week"), "the standard week has no working windows")
    if max(lengths) < duration_s:
        raise PlanError.at(
            ("schedule", "duration"),
            f"a meeting of {schedule.duration} is longer than every window of the week",
        )
    raise PlanError.at(
        ("schedule", "day_starts_at"),
        f"no window has room for a meeting after {schedule.day_starts_at}",
    )


def _calendar(request: PlanRequest, user_id: str) -> UserCalendar:
    schedule = request.schedule
    user = request.users[user_id]
    if schedule.skip_public_holidays:
        check_country(user, schedule.start_date.year)
    return user_calendar(
        user,
        skip_public_holidays=schedule.skip_public_holidays,
        skip_days_off=schedule.skip_days_off,
        avoid_busy=schedule.avoid_busy,
        closing_days=request.closing_days,
    )


def _days(
    request: PlanRequest, week: WeekSlots, cal: UserCalendar
) -> Iterator[tuple[date, list[Slot]]]:
    return free_days(
        week,
        cal,
        first_day=request.schedule.start_date,
        now=request.now,
        max_per_day=request.schedule.max_per_day,
    )


def _slots_for(
    request: PlanRequest, week: WeekSlots, cal: UserCalendar, user_id: str, count: int
) -> list[Slot]:
    slots = take_slots(_days(request, week, cal), count)
    if len(slots) < count:
        raise PlanError.at(
            ("users", user_id),
            f"user {user_id!r} has free slots for only {len(slots)} of {count} activities: "
            "no free day for 5 years after that",
        )
    return slots


def _blocks(order: Sequence[str], sizes: Sequence[int]) -> list[str]:
    """Contiguous blocks: the first ``sizes[0]`` units to the first user, and so on."""
    out: list[str] = []
    for user_id, size in zip(order, sizes, strict=True):
        out.extend([user_id] * size)
    return out


def invitable(targets: Sequence[Target]) -> tuple[Attendee, ...]:
    """Attendees from the targets' contacts, once each, never a blocked or resigned one."""
    seen: set[str] = set()
    out: list[Attendee] = []
    for target in targets:
        for contact in target.contacts:
            if contact.block_mass_email or contact.status == RESIGNED or contact.id in seen:
                continue
            seen.add(contact.id)
            name = f"{contact.first_name} {contact.last_name}".strip()
            out.append(Attendee(contact.id, name, contact.email))
    return tuple(out)


def _activities(
    request: PlanRequest,
    units: Sequence[tuple[Target, ...]],
    unit_users: Sequence[str],
    slots_by_user: Mapping[str, list[Slot]],
    subject: Text,
    description: Text,
) -> list[PlannedActivity]:
    """One activity per unit, in input order, each user's slots consumed in that order.

    With ``grouping: shared`` there is one unit: a single activity for the first assignee,
    its attendees the contacts of every target, its text tags filled from the first target.
    """
    template = request.template
    invite = template.invite_contacts
    fixed: dict[str, dict[str, str]] = {}
    due: dict[str, date] = {}
    used: Counter[str] = Counter()
    out: list[PlannedActivity] = []
    for unit, user_id in zip(units, unit_users, strict=True):
        values = fixed.get(user_id)
        if values is None:
            values = fixed[user_id] = fixed_values(request.targetgroup_name, request.users[user_id])
        first = unit[0]
        start: datetime | None = None
        end: datetime | None = None
        due_date: date | None = None
        if template.kind in SLOT_KINDS:
            start, end = slots_by_user[user_id][used[user_id]]
            used[user_id] += 1
        else:
            due_date = due.get(user_id)
            if due_date is None:
                due_date = due[user_id] = _due(request, user_id)
        out.append(
            PlannedActivity(
                target_id=first.id,
                user_id=user_id,
                kind=template.kind,
                start=start,
                end=end,
                due=due_date,
                subject=subject.render(values, first),
                description=description.render(values, first),
                location=template.location,
                attendees=invitable(unit) if invite else (),
                target_ids=tuple(t.id for t in unit),
                status=template.status,
            )
        )
    return out


def _due(request: PlanRequest, user_id: str) -> date:
    """A task is due ``due_days`` after today in the assignee's zone."""
    zone = resolve_zone(request.users[user_id].timezone, ("users", user_id, "timezone"))
    today = request.now.astimezone(zone).date()
    try:
        return today + timedelta(days=request.template.due_days or 0)
    except OverflowError as exc:
        raise PlanError.at(("template", "due_days"), "due date is past the calendar") from exc


def _past_start_warning(request: PlanRequest) -> list[PlanWarning]:
    start = request.schedule.start_date
    if start >= request.now.date():
        return []
    return [
        PlanWarning(
            "start_in_past",
            f"The start date {start.isoformat()} is in the past; planning begins now "
            f"({request.now.isoformat(timespec='minutes')}).",
            "Choose today or a later start date to plan from another day.",
        )
    ]


def _uninvited_warning(request: PlanRequest, targets: Sequence[Target]) -> list[PlanWarning]:
    if not request.template.invite_contacts:
        return []
    skipped = {
        c.id for t in targets for c in t.contacts if c.block_mass_email or c.status == RESIGNED
    }
    if not skipped:
        return []
    return [
        PlanWarning(
            "contacts_not_invited",
            f"{len(skipped)} contact(s) are not invited: they block mass e-mail or resigned.",
            "Invite them one by one if they should come.",
        )
    ]
