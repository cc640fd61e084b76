"""The planner's plain-data input and output.

Everything here is a frozen value: the service builds a ``PlanRequest`` from the HTTP body and
the stored users, calls ``syncsvc.planner.plan(request)``, and serialises the ``Plan``. The
planner never sees a database, a network or a clock: ``now`` is part of the request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Literal

Kind = Literal["meeting", "call", "task"]
Grouping = Literal["per_target", "shared"]
AssignmentMode = Literal["owner", "second_owner", "users", "balanced_finish"]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

#: A working window in local wall-clock time, ``start < end``.
Window = tuple[time, time]

DEFAULT_WEEK: Mapping[Weekday, tuple[Window, ...]] = {
    **{
        d: ((time(9, 0), time(12, 0)), (time(12, 30), time(16, 0)))
        for d in ("mon", "tue", "wed", "thu", "fri")
    },
    "sat": (),
    "sun": (),
}


@dataclass(frozen=True, slots=True)
class Contact:
    id: str
    first_name: str = ""
    last_name: str = ""
    email: str = ""
    phone: str = ""
    mobile: str = ""
    block_mass_email: bool = False
    status: str = "active"


@dataclass(frozen=True, slots=True)
class Target:
    """One row of the CRM's segmented, ordered list (an organisation, person or lead)."""

    id: str
    name: str
    email: str = ""
    phone: str = ""
    postcode: str = ""
    owner_id: str | None = None
    second_owner_id: str | None = None
    organisation_id: str | None = None
    contacts: tuple[Contact, ...] = ()


@dataclass(frozen=True, slots=True)
class Template:
    kind: Kind
    subject: str
    description: str = ""
    location: str = ""
    status: str = "planned"
    priority: str = "normal"
    reminder_minutes: int | None = None
    invite_contacts: bool = False
    grouping: Grouping = "per_target"
    due_days: int | None = None
    fields: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Schedule:
    start_date: date
    duration: timedelta
    interval: timedelta = timedelta(0)
    week: Mapping[Weekday, tuple[Window, ...]] = field(default_factory=lambda: dict(DEFAULT_WEEK))
    max_per_day: int | None = None
    day_starts_at: time | None = None
    skip_public_holidays: bool = True
    skip_days_off: bool = True
    avoid_busy: bool = False


@dataclass(frozen=True, slots=True)
class Assignment:
    mode: AssignmentMode
    users: tuple[str, ...] = ()
    fallback_user: str | None = None


@dataclass(frozen=True, slots=True)
class PlanUser:
    """A user as the planner needs them: identity for text tags, zone, days not to plan."""

    id: str
    name: str = ""
    email: str = ""
    mobile: str = ""
    timezone: str = "UTC"
    country: str | None = None
    subdivision: str | None = None
    #: Personal days off (from the CRM and from the user's calendar), local dates.
    days_off: frozenset[date] = frozenset()
    #: Busy intervals (aware datetimes) from the user's calendar, used when ``avoid_busy``.
    busy: tuple[tuple[datetime, datetime], ...] = ()


@dataclass(frozen=True, slots=True)
class PlanRequest:
    targets: tuple[Target, ...]
    template: Template
    schedule: Schedule
    assignment: Assignment
    #: Every user the request may refer to, by id (owners, second owners, listed users).
    users: Mapping[str, PlanUser]
    #: The instant planning happens at (aware). Nothing is planned before it.
    now: datetime
    targetgroup_name: str = ""
    exclude: frozenset[str] = frozenset()
    one_per_organisation: bool = False
    #: The tenant's own closing days, skipped like public holidays.
    closing_days: frozenset[date] = frozenset()


@dataclass(frozen=True, slots=True)
class Attendee:
    contact_id: str
    name: str
    email: str


@dataclass(frozen=True, slots=True)
class PlannedActivity:
    #: The target this activity is for; for ``grouping: shared`` the first target.
    target_id: str
    user_id: str
    kind: Kind
    #: Aware datetimes in the assignee's zone; ``None`` for tasks.
    start: datetime | None
    end: datetime | None
    #: A task's due date (assignee's local date); ``None`` for meetings and calls.
    due: date | None
    subject: str
    description: str
    location: str
    attendees: tuple[Attendee, ...] = ()
    #: Every target the activity covers (one, or all of them for ``grouping: shared``).
    target_ids: tuple[str, ...] = ()
    #: The template's status (planned, completed, cancelled, unanswered).
    status: str = "planned"


@dataclass(frozen=True, slots=True)
class WindowCapacity:
    start: time
    end: time
    count: int


@dataclass(frozen=True, slots=True)
class UserSummary:
    id: str
    name: str
    count: int
    first: date | None
    last: date | None


@dataclass(frozen=True, slots=True)
class PlanWarning:
    code: str
    message: str
    suggestion: str = ""


@dataclass(frozen=True, slots=True)
class Plan:
    total: int
    start_date: date
    #: Meetings that fit each window of the standard week, per weekday (all seven present).
    standard_week: Mapping[Weekday, tuple[WindowCapacity, ...]]
    standard_week_max: int
    users: tuple[UserSummary, ...]
    #: In input target order (after exclusions), whatever the assignment.
    activities: tuple[PlannedActivity, ...]
    warnings: tuple[PlanWarning, ...] = ()
