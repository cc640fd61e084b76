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
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from syncsvc.config import Settings
from syncsvc.errors import ErrorDetail, ValidationError
from syncsvc.planner.model import (
    AssignmentMode,
    Contact,
    Grouping,
    Kind,
    Target,
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
        """Planner values straight from the models (dumping 100,000 targets to JSON and reading
        that back took over a second); the body without its targets, which a batch stores
        from the planner's (``target_json``), off the answer's path."""
        targets = tuple(
            Target(
                id=t.id,
                name=t.name,
                email=t.email,
                phone=t.phone,
                postcode=t.postcode,
                owner_id=t.owner_id,
                second_owner_id=t.second_owner_id,
                organisation_id=t.organisation_id,
                contacts=tuple(
                    Contact(
                        id=c.id,
                        first_name=c.first_name,
                        last_name=c.last_name,
                        email=c.email,
                        phone=c.phone,
                        mobile=c.mobile,
                        block_mass_email=c.block_mass_email,
                        status=c.status,
                    )
                    for c in t.contacts
                ),
            )
            for t in self.targets
        )
        return spec_from_json(self.model_dump(mode="json", exclude={"targets"}), targets)


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


class ProgressOut(BaseModel):
    """Activities written so far of a ``committing`` batch."""

    done: int
    total: int


class BatchCreatedOut(BaseModel):
    id: str
    created_by: str
    state: str
    total: int
    users: list[UserSummaryOut]
    #: Only on a 202 (``committing``); poll ``GET /v1/batches/{id}``.
    progress: ProgressOut | None = None


class SyncCountsOut(BaseModel):
    pending: int
    synced: int
    failed: int
    deleting: int
    deleted: int


class BatchOut(BaseModel):
    id: str
    state: Literal["committing", "syncing", "synced", "failed", "deleting", "deleted"]
    total: int
    created_at: str
    created_by: str
    targetgroup_name: str
    sync: SyncCountsOut
    #: While ``committing``: how many of ``total`` activities are written.
    progress: ProgressOut | None = None
    #: Why the commit failed (``state`` ``failed``, no activities); retry with the same key.
    error: str | None = None


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
    direction: str | None = Field(description="A call's `outgoing` | `incoming`; else null.")
    phone: str = Field(description="A call's phone number of the other party.")


class ActivityListOut(BaseModel):
    items: list[ActivityOut]
    next_cursor: str | None


Direction = Literal["outgoing", "incoming"]
FollowUps = Literal["has", "is", "none"]
ExternalState = Literal[
    "pending_create", "synced", "pending_update", "pending_delete", "deleted", "failed", "none"
]
Phone = Annotated[str, StringConstraints(max_length=64), AfterValidator(single_line)]
#: Values one list filter may have at most (``status=planned&status=unanswered``).
MAX_FILTER_VALUES = 100
MAX_QUERY_CHARS = 200


def _one_of(values: tuple[str, ...], what: str) -> BeforeValidator:
    """Several values, repeated or comma-separated (``status=planned,unanswered``); an unknown
    one is refused by name, so a typo is never an empty list."""

    def check(raw: Any) -> Any:
        items = raw if isinstance(raw, list) else [raw]
        if not all(isinstance(item, str) for item in items):
            return raw  # the type check that follows names it
        split = [part.strip() for item in items for part in item.split(",") if part.strip()]
        unknown = [part for part in split if part not in values]
        if unknown:
            raise ValueError(
                f"unknown {what} {', '.join(repr(u) for u in unknown)} (one of {', '.join(values)})"
            )
        return split

    return BeforeValidator(check)


def _single(values: tuple[str, ...], what: str) -> BeforeValidator:
    def check(raw: Any) -> Any:
        if isinstance(raw, str) and raw not in values:
            raise ValueError(f"unknown {what} {raw!r} (one of {', '.join(values)})")
        return raw

    return BeforeValidator(check)


_Many = Field(max_length=MAX_FILTER_VALUES)
KindValues = Annotated[list[Kind], _one_of(get_args(Kind), "kind"), _Many]
StatusValues = Annotated[list[Status], _one_of(get_args(Status), "status"), _Many]
ExternalStateValues = Annotated[
    list[ExternalState], _one_of(get_args(ExternalState), "external_state"), _Many
]
DirectionValues = Annotated[list[Direction], _one_of(get_args(Direction), "direction"), _Many]


class ActivityFilterFields(BaseModel):
    """Which activities: the list's query, a bulk delete's or bulk edit's body. Every field
    narrows; several values of one field are alternatives."""

    user_id: Annotated[list[Id], Field(max_length=MAX_FILTER_VALUES)] = Field(
        default_factory=list, description="The assignees (repeat for several)."
    )
    batch_id: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    kind: KindValues = Field(default_factory=list)
    status: StatusValues = Field(
        default_factory=list, description="Several allowed: repeated or comma-separated."
    )
    from_: date | None = Field(
        default=None,
        alias="from",
        description="First day (inclusive) in the assignee's zone: a start, or a task's due.",
    )
    to: date | None = Field(default=None, description="Last day (inclusive), as `from`.")
    created_by: Name | None = Field(default=None, description="The batch's `created_by`.")
    follow_ups: Annotated[FollowUps, _single(get_args(FollowUps), "follow_ups")] | None = Field(
        default=None,
        description="`has`: has follow-ups; `is`: is a follow-up; `none`: neither.",
    )
    q: Annotated[str, StringConstraints(max_length=MAX_QUERY_CHARS)] | None = Field(
        default=None, description="Text in the subject, description or phone (any case)."
    )
    external_state: ExternalStateValues = Field(
        default_factory=list, description="The ledger state; `none`: no external event."
    )
    direction: DirectionValues = Field(default_factory=list)

    @model_validator(mode="after")
    def _ordered_days(self) -> ActivityFilterFields:
        if self.from_ is not None and self.to is not None and self.to < self.from_:
            raise ValueError(f"to ({self.to}) is before from ({self.from_})")
        return self

    def filter_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ActivityFilterFields.model_fields}

    @property
    def filtered(self) -> bool:
        return any(
            getattr(self, name) not in (None, [], "") for name in ActivityFilterFields.model_fields
        )


class ActivityPatch(BaseModel):
    model_config = _INSTRUCTION

    status: Status | None = None
    start: Instant | None = None
    end: Instant | None = None
    subject: Text | None = None
    description: Text | None = None
    reminder_minutes: Annotated[int, Field(ge=0, le=MAX_REMINDER_MINUTES)] | None = None
    direction: Direction | None = Field(default=None, description="Calls only.")
    phone: Phone | None = None
    force: bool = Field(
        default=False, description="Change it even if its assignee edited it (clears the mark)."
    )


class ActivityFilterIn(ActivityFilterFields):
    """The list's filters as a body's ``filter`` object (same names, lists as arrays)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False)


class _ByIdsOrFilter(BaseModel):
    model_config = _INSTRUCTION

    ids: Annotated[list[Id], Field(min_length=1, max_length=1000)] | None = Field(
        default=None, description="These activities; or leave out and give `filter`."
    )
    filter: ActivityFilterIn | None = Field(
        default=None, description="Every activity the list would show with these filters."
    )
    force: bool = Field(
        default=False, description="Also those their assignee edited (else a 409 naming them)."
    )

    @model_validator(mode="after")
    def _ids_or_filter(self) -> _ByIdsOrFilter:
        if self.ids is None and (self.filter is None or not self.filter.filtered):
            raise ValueError("give ids, or a filter with at least one field")
        if self.ids is not None and self.filter is not None:
            raise ValueError("give ids or a filter, not both")
        return self


class ActivitiesPatch(_ByIdsOrFilter):
    status: Status


class ActivitiesPatchedOut(BaseModel):
    updated: int


class ActivitiesDelete(_ByIdsOrFilter):
    pass


class ActivitiesDeletedOut(BaseModel):
    deleted: int = Field(description="Activities removed (their external events follow).")
    not_found: list[str] = Field(
        description="Ids refused: unknown, another tenant's, or already deleted; untouched."
    )


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


class CloseBody(BaseModel):
    """The seed's quick close: a status and, optionally, a follow-up call."""

    model_config = _INSTRUCTION

    status: Literal["completed", "unanswered", "cancelled"]
    follow_up: FollowUpBody | None = Field(
        default=None, description="A follow-up call in the assignee's next free slot (or at start)."
    )
    force: bool = False


class ActivityClosedOut(BaseModel):
    activity: ActivityOut
    follow_up: ActivityOut | None


class ActivityHistoryOut(BaseModel):
    items: list[ActivityOut] = Field(description="The whole follow-up chain, oldest first.")


def instant(value: datetime | None) -> str | None:
    """ISO 8601 to the second with a numeric offset (never ``Z``), as the contract shows."""
    return None if value is None else value.isoformat(timespec="seconds")
