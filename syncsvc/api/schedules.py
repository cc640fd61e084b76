"""``/v1/schedules``: saved plans that commit a batch at every cron occurrence.

At each run the service GETs the schedule's ``targets_url`` for the current targets (see
``syncsvc/scheduler.py`` for the signed request and the answer it expects) and commits the
saved plan with them as a batch.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator

from syncsvc.api._framework import Ctx, Routes
from syncsvc.api.pagination import Page, PageQuery, cursor_key, page
from syncsvc.api.plan_schemas import PlanDefinition, ScheduleIn, instant
from syncsvc.api.plans import body_errors, clock_of
from syncsvc.service import schedules as service
from syncsvc.service.users import check_http_url, check_timezone
from syncsvc.store.models import Schedule, ScheduleRun

routes = Routes(tag="schedules")

NAME_MAX_CHARS = 200
CRON_MAX_CHARS = 200
URL_MAX_CHARS = 2048


class SchedulePath(BaseModel):
    schedule_id: str = Field(min_length=1, max_length=64)


class RecurringScheduleIn(ScheduleIn):
    """The plan's timing; each run starts planning on its own day."""

    # Optional here (a run plans from its own day); required for a one-off plan.
    start_date: date | None = Field(  # type: ignore[assignment]
        default=None,
        description="Left out: each run plans from the day it runs. Given: runs before that "
        "day plan from it instead.",
    )


class SchedulePlanIn(PlanDefinition):
    """The ``POST /v1/plans`` body without ``targets``: they are fetched at every run."""

    schedule: RecurringScheduleIn


class ScheduleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=NAME_MAX_CHARS)
    cron: str = Field(
        max_length=CRON_MAX_CHARS,
        description="Five cron fields (minute hour day-of-month month day-of-week) on the "
        "wall clock of `timezone`, e.g. `0 6 * * mon`; or @daily, @weekly, …; at most once "
        "per the service's minimum interval (15 minutes unless configured otherwise).",
        examples=["0 6 * * mon"],
    )
    timezone: str = Field(max_length=64, description="IANA zone, e.g. Europe/Helsinki.")
    targets_url: str = Field(
        max_length=URL_MAX_CHARS,
        description='GET at each run (signed) for `{"targets": [...]}`, the plan\'s targets.',
    )
    plan: SchedulePlanIn

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        return service.check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return check_timezone(value)

    @field_validator("targets_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return check_http_url(value)


class ScheduleOut(BaseModel):
    id: str
    name: str
    cron: str
    timezone: str
    targets_url: str
    plan: SchedulePlanIn
    next_run_at: str = Field(description="The next occurrence, ISO 8601 in `timezone`.")
    created_at: str


class RunOut(BaseModel):
    id: str
    occurrence: str = Field(description="The cron occurrence this run is for.")
    state: str = Field(
        description="`running`, `ok`, `retrying` (see `next_attempt_at`), or `failed` "
        "(gave up after the last attempt)."
    )
    attempts: int
    started_at: str
    finished_at: str | None
    next_attempt_at: str | None = Field(description="When a retrying run tries again.")
    batch_id: str | None = Field(description="The batch committed; null with no targets.")
    error: str | None = Field(description="Why the last attempt failed.")


def schedule_out(row: Schedule) -> ScheduleOut:
    zone = ZoneInfo(row.timezone)
    return ScheduleOut(
        id=row.id,
        name=row.name,
        cron=row.cron,
        timezone=row.timezone,
        targets_url=row.targets_url,
        plan=SchedulePlanIn.model_validate(row.plan),
        next_run_at=row.next_run_at.astimezone(zone).isoformat(timespec="seconds"),
        created_at=row.created_at.isoformat(timespec="seconds"),
    )


def run_out(row: ScheduleRun, zone_name: str) -> RunOut:
    zone = ZoneInfo(zone_name)
    retrying = row.state in (service.RunState.RETRYING, service.RunState.RUNNING)
    return RunOut(
        id=row.id,
        occurrence=row.occurrence.astimezone(zone).isoformat(timespec="seconds"),
        state=row.state,
        attempts=row.attempts,
        started_at=row.started_at.isoformat(timespec="seconds"),
        finished_at=instant(row.finished_at),
        next_attempt_at=instant(row.next_attempt_at) if retrying else None,
        batch_id=row.batch_id,
        error=row.error,
    )


@routes.endpoint(
    "POST",
    "/v1/schedules",
    body=ScheduleBody,
    response=ScheduleOut,
    status=201,
    summary="Save a plan that commits a batch at every cron occurrence",
)
async def create_schedule(ctx: Ctx, body: ScheduleBody) -> ScheduleOut:
    """The cron must not fire more often than ``SYNCSVC_SCHEDULE_MIN_INTERVAL_MINUTES``, the
    plan's assigned users must exist and its text tags be known now; everything else about the
    targets is checked at each run (a bad answer is a failed, retried run)."""
    spec = service.ScheduleSpec(
        name=body.name,
        cron=body.cron,
        timezone=body.timezone,
        targets_url=body.targets_url,
        plan=body.plan.model_dump(mode="json"),
    )
    with body_errors(ScheduleBody):
        async with ctx.session() as session, session.begin():
            row = await service.create(
                session,
                ctx.tenant_id,
                spec,
                clock_of(ctx)(),
                min_interval=timedelta(minutes=ctx.settings.schedule_min_interval_minutes),
            )
    return schedule_out(row)


@routes.endpoint(
    "GET",
    "/v1/schedules",
    query=PageQuery,
    response=Page[ScheduleOut],
    summary="The tenant's schedules, newest first",
)
async def list_schedules(ctx: Ctx, query: PageQuery) -> Page[ScheduleOut]:
    async with ctx.session() as session:
        rows = await service.list_schedules(
            session, ctx.tenant_id, query.limit, cursor_key(query.cursor, datetime, str)
        )
    return page(
        Page[ScheduleOut],
        rows,
        query.limit,
        schedule_out,
        lambda r: [r.created_at.isoformat(), r.id],
    )


@routes.endpoint(
    "GET",
    "/v1/schedules/{schedule_id}",
    path=SchedulePath,
    response=ScheduleOut,
    summary="A schedule",
)
async def get_schedule(ctx: Ctx, path: SchedulePath) -> ScheduleOut:
    async with ctx.session() as session:
        return schedule_out(await service.get(session, ctx.tenant_id, path.schedule_id))


@routes.endpoint(
    "DELETE",
    "/v1/schedules/{schedule_id}",
    path=SchedulePath,
    status=204,
    summary="Delete a schedule and its run history",
)
async def delete_schedule(ctx: Ctx, path: SchedulePath) -> None:
    """No further runs; the batches it committed stay."""
    async with ctx.session() as session, session.begin():
        await service.delete_schedule(session, ctx.tenant_id, path.schedule_id)


@routes.endpoint(
    "GET",
    "/v1/schedules/{schedule_id}/runs",
    path=SchedulePath,
    query=PageQuery,
    response=Page[RunOut],
    summary="A schedule's runs, latest occurrence first",
)
async def list_schedule_runs(ctx: Ctx, path: SchedulePath, query: PageQuery) -> Page[RunOut]:
    async with ctx.session() as session:
        schedule = await service.get(session, ctx.tenant_id, path.schedule_id)
        rows = await service.list_runs(
            session, schedule, query.limit, cursor_key(query.cursor, datetime, str)
        )
    return page(
        Page[RunOut],
        rows,
        query.limit,
        lambda r: run_out(r, schedule.timezone),
        lambda r: [r.occurrence.isoformat(), r.id],
    )
