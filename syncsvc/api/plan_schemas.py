"""Request and response models of plans, batches and activities: the contract in pydantic.

The models are also the OpenAPI schema, so field names, required fields and defaults follow
``api-contract.md`` exactly.

Unknown fields: models that are *instructions* (the plan body, template, schedule, week,
assignment and every PATCH/POST body) forbid them, because a typo there (``max_per_dya``,
``wendesday``) would otherwise be silently ignored and plan something other than what the CRM
meant; the 422 names the stray field. Models that are the CRM's *records* (targets, contacts)
ignore them, because CRMs send whole rows with columns we do not use, and a missing optional
column only empties a text tag.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from syncsvc.config import Settings
from syncsvc.errors import ErrorDetail, ValidationError
from syncsvc.planner.model import (
    AssignmentMode,
    Grouping,
    Kind,
    Weekday,
)
from syncsvc.service.plans import PlanSpec, parse_hhmm, parse_span, spec_from_json

#: Longest meeting or gap the API accepts; anything longer is a typo, not a plan.
MAX_SPAN_MINUTES = 24 * 60
#: Google's limit for a reminder (four weeks), the strictest of the providers.
MAX_REMINDER_MINUTES = 40_320
MAX_TEXT_CHARS = 10_000
MAX_NAME_CHARS = 500

Status = Literal["planned", "completed", "cancelled", "unanswered"]
Priority = Literal["low", "normal", "high"]

HHMM_PATTERN = r"^([01]\d|2[0-3]):[0-5]\d$"
DURATION_PATTERN = r"^\d{1,2}:[0-5]\d$"

#: A wall-clock time of day, ``"HH:MM"`` (00:00–23:59).
HHMM = Annotated[str, StringConstraints(pattern=HHMM_PATTERN)]
#: A span of time, ``"HH:MM"`` (hours may exceed 23 only up to the 24-hour limit).
Span = Annotated[str, StringConstraints(pattern=DURATION_PATTERN)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
Name = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=200)]
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def single_line(value: str) -> str:
    """Addresses end up in iCalendar properties and HTTP headers, where a CR or LF would
    start a line of its own."""
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (CR, LF, tab, …)")
    return value


#: Times outside these years are refused: nobody books a call in 9999, and converting such a
#: time into another zone (or adding a duration) leaves what ``datetime`` can hold.
EARLIEST_YEAR, LATEST_YEAR = 1900, 2199


def _plausible(value: datetime) -> datetime:
    if not EARLIEST_YEAR <= value.year <= LATEST_YEAR:  # its own year: converting may overflow
        raise ValueError(f"must be between the years {EARLIEST_YEAR} and {LATEST_YEAR}")
    return value


#: A time with an offset, in a plausible year.
Instant = Annotated[AwareDatetime, AfterValidator(_plausible)]

#: An e-mail address (or empty): one line, no control characters.
Email = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS), AfterValidator(single_line)]


def _ordered_window(window: tuple[str, str]) -> tuple[str, str]:
    if not parse_hhmm(window[0]) < parse_hhmm(window[1]):
        raise ValueError(f"window ends ({window[1]}) at or before it starts ({window[0]})")
    return window


def _span_within_a_day(value: str) -> str:
    if parse_span(value) > timedelta(minutes=MAX_SPAN_MINUTES):
        raise ValueError("must be at most 24:00")
    return value


def _positive_span(value: str) -> str:
    if parse_span(value) <= timedelta(0):
        raise ValueError("must be longer than 00:00")
    return value


#: ``["09:00", "12:00"]``: a working window, start before end.
WindowIn = Annotated[tuple[HHMM, HHMM], AfterValidator(_ordered_window)]
DurationIn = Annotated[Span, AfterValidator(_span_within_a_day), AfterValidator(_positive_span)]
IntervalIn = Annotated[Span, AfterValidator(_span_within_a_day)]

_INSTRUCTION = ConfigDict(extra="forbid")
_RECORD = ConfigDict(extra="ignore")


class ContactIn(BaseModel):
    model_config = _RECORD

    id: Id
    first_name: Name = ""
    last_name: Name = ""
    email: Email = ""
    phone: Name = ""
    mobile: Name = ""
    block_mass_email: bool = False
    status: Name = "active"


class TargetIn(BaseModel):
    model_config = _RECORD

    id: Id
    name: Name
    email: Email = ""
    phone: Name = ""
    postcode: Name = ""
    owner_id: str | None = None
    second_owner_id: str | None = None
    organisation_id: str | None = None
    contacts: list[ContactIn] = []


class TemplateIn(BaseModel):
    model_config = _INSTRUCTION

    kind: Kind
    subject: Text
    description: Text = ""
    location: Text = ""
    status: Status = "planned"
    priority: Priority = "normal"
    reminder_minutes: Annotated[int, Field(ge=0, le=MAX_REMINDER_MINUTES)] | None = None
    invite_contacts: bool = False
    grouping: Grouping = "per_target"
    due_days: Annotated[int, Field(ge=0, le=3650)] | None = None
    fields: dict[str, Text] = {}


class WeekIn(BaseModel):
    """The standard week; a weekday left out has no windows. Unknown keys are 422."""

    model_config = _INSTRUCTION

    mon: list[WindowIn] = []
    tue: list[WindowIn] = []
    wed: list[WindowIn] = []
    thu: list[WindowIn] = []
    fri: list[WindowIn] = []
    sat: list[WindowIn] = []
    sun: list[WindowIn] = []


class ScheduleIn(BaseModel):
    model_config = _INSTRUCTION

    start_date: date
    week: WeekIn | None = Field(default=None, description="Left out: the default standard week.")
    duration: DurationIn
    interval: IntervalIn = "00:00"
    max_per_day: Annotated[int, Field(ge=1)] | None = None
    day_starts_at: HHMM | None = None
    skip_public_holidays: bool = True
    skip_days_off: bool = True
    avoid_busy: bool = False


class AssignmentIn(BaseModel):
    model_config = _INSTRUCTION

    mode: AssignmentMode
    users: list[Id] = []
    fallback_user: Id | None = None

    @model_validator(mode="after")
    def _users_for_users_modes(self) -> AssignmentIn:
        if self.mode in ("users", "balanced_finish") and not self.users:
            raise ValueError(f"mode {self.mode!r} needs at least one user in assignment.users")
        return self


class PlanDefinition(BaseModel):
    """A plan without its targets: what a schedule saves, fetching the targets at each run."""

    model_config = _INSTRUCTION

    targetgroup_name: Name = ""
    exclude: list[str] = []
    one_per_organisation: bool = False
    template: TemplateIn
    schedule: ScheduleIn
    assignment: AssignmentIn


class PlanBody(PlanDefinition):
    """``POST /v1/plans`` and ``POST /v1/batches``: what to plan, for whom, when."""

    targets: list[TargetIn]

    def to_spec(self) -> PlanSpec:
        return spec_from_json(self.model_dump(mode="json"))


def check_sizes(body: PlanBody, settings: Settings) -> None:
    """The configured list limits (``SYNCSVC_MAX_*``): one tenant's huge plan must not take
    the service's CPU and memory from the others. A 422 names each limit exceeded."""
    details = []
    for loc, count, limit, name in (
        (("body", "targets"), len(body.targets), settings.max_targets, "MAX_TARGETS"),
        (("body", "exclude"), len(body.exclude), settings.max_exclude, "MAX_EXCLUDE"),
        (
            ("body", "assignment", "users"),
            len(body.assignment.users),
            settings.max_plan_users,
            "MAX_PLAN_USERS",
        ),
    ):
        if count > limit:
            details.append(ErrorDetail(loc, f"{count} given; at most {limit} (SYNCSVC_{name})"))
    for index, target in enumerate(body.targets):
        if len(target.contacts) > settings.max_contacts:
            details.append(
                ErrorDetail(
                    ("body", "targets", index, "contacts"),
                    f"{len(target.contacts)} given; at most {settings.max_contacts} "
                    "(SYNCSVC_MAX_CONTACTS)",
                )
            )
            break
    if details:
        raise ValidationError("the plan is larger than this service takes", details)


# --- Preview -------------------------------------------------------------------------------

_OUT = ConfigDict(serialize_by_alias=True, populate_by_name=True)


class WindowCountOut(BaseModel):
    model_config = _OUT

    from_: str = Field(alias="from", examples=["09:00"])
    to: str = Field(examples=["12:00"])
    count: int


class StandardWeekOut(BaseModel):
    max: int
    days: dict[Weekday, list[WindowCountOut]]


class UserSummaryOut(BaseModel):
    id: str
    name: str
    count: int
    first: date | None
    last: date | None


class AttendeeOut(BaseModel):
    contact_id: str
    name: str
    email: str


class PlannedActivityOut(BaseModel):
    target_id: str
    user_id: str
    kind: Kind
    start: str | None = Field(description="ISO 8601 with the assignee's offset, to the second.")
    end: str | None
    due: date | None
    subject: str
    attendees: list[AttendeeOut]


class WarningOut(BaseModel):
    code: str
    message: str
    suggestion: str


class PreviewOut(BaseModel):
    total: int
    start_date: date
    standard_week: StandardWeekOut
    users: list[UserSummaryOut]
    activities: list[PlannedActivityOut]
    warnings: list[WarningOut]


# --- Batches -------------------------------------------------------------------------------


class BatchCreatedOut(BaseModel):
    id: str
    created_by: str
    state: str
    total: int
    users: list[UserSummaryOut]


class SyncCountsOut(BaseModel):
    pending: int
    synced: int
    failed: int
    deleting: int
    deleted: int


class BatchOut(BaseModel):
    id: str
    state: Literal["syncing", "synced", "failed", "deleting", "deleted"]
    total: int
    created_at: str
    created_by: str
    targetgroup_name: str
    sync: SyncCountsOut


class BatchListOut(BaseModel):
    items: list[BatchOut]
    next_cursor: str | None


class TemplatePatch(BaseModel):
    """The template fields a committed batch may change; ``kind``, ``grouping`` and timing
    would re-plan the batch, which is a new batch (delete and commit again)."""

    model_config = _INSTRUCTION

    subject: Text | None = None
    description: Text | None = None
    location: Text | None = None
    status: Status | None = None
    priority: Priority | None = None
    reminder_minutes: Annotated[int, Field(ge=0, le=MAX_REMINDER_MINUTES)] | None = None
    fields: dict[str, Text] | None = None


class BatchPatch(BaseModel):
    model_config = _INSTRUCTION

    template: TemplatePatch
    force: bool = False


class BatchPatchedOut(BatchOut):
    updated: int = Field(description="Activities changed (their external events follow).")
    skipped_user_edited: int = Field(
        description="Activities left alone because their assignee edited them (no force)."
    )


# --- Activities ----------------------------------------------------------------------------


class ExternalOut(BaseModel):
    provider: str
    event_id: str | None
    state: str


class ActivityOut(BaseModel):
    id: str
    batch_id: str | None
    target_id: str
    user_id: str
    kind: str
    start: str | None = Field(description="ISO 8601 with the assignee's offset, to the second.")
    end: str | None
    due: date | None
    subject: str
    description: str
    status: str
    follow_up_of: str | None
    external: ExternalOut | None
    location: str
    priority: str
    reminder_minutes: int | None
    version: int
    user_edited: bool


class ActivityListOut(BaseModel):
    items: list[ActivityOut]
    next_cursor: str | None


class ActivityPatch(BaseModel):
    model_config = _INSTRUCTION

    status: Status | None = None
    start: Instant | None = None
    end: Instant | None = None
    subject: Text | None = None
    description: Text | None = None
    reminder_minutes: Annotated[int, Field(ge=0, le=MAX_REMINDER_MINUTES)] | None = None


class ActivitiesPatch(BaseModel):
    model_config = _INSTRUCTION

    ids: Annotated[list[Id], Field(min_length=1, max_length=1000)]
    status: Status


class ActivitiesPatchedOut(BaseModel):
    updated: int


class FollowUpBody(BaseModel):
    """A follow-up call: at ``start`` if given, else in the assignee's next free slot."""

    model_config = _INSTRUCTION

    start: Instant | None = None
    duration: DurationIn | None = Field(
        default=None, description="Left out: the length of the activity followed up."
    )
    subject: Text | None = Field(default=None, description="Left out: the followed subject.")
    description: Text | None = None
    reminder_minutes: Annotated[int, Field(ge=0, le=MAX_REMINDER_MINUTES)] | None = None


def instant(value: datetime | None) -> str | None:
    """ISO 8601 to the second with a numeric offset (never ``Z``), as the contract shows."""
    return None if value is None else value.isoformat(timespec="seconds")
