"""Schedules: saved plans that run on a cron schedule (the Finnish seed's "ajastus").

At each occurrence the scheduler (``syncsvc/scheduler.py``) fetches the current targets from
the CRM and commits a batch. This module holds the rules it relies on:

- **When.** A cron expression is read in the schedule's IANA zone on wall-clock time
  (:class:`Cron`), so ``0 6 * * mon`` is 06:00 local in winter and in summer.
- **Exactly once.** An occurrence is claimed by inserting its ``ScheduleRun`` row (unique on
  schedule and occurrence) in the same transaction that moves ``next_run_at`` on from the value
  the claimer saw; whoever comes second gets a unique violation or no row and skips.
- **Not too often.** A cron that fires more often than the service's minimum interval
  (:func:`shortest_gap`, on the wall clock) is refused when the schedule is saved.
- **Once after downtime.** A claim takes the latest occurrence that is due and moves
  ``next_run_at`` past now, so occurrences missed while nothing ran collapse into one run;
  so do those of a schedule that waited behind its tenant's share of the scheduler for longer
  than its cron's period.
- **A share per tenant.** Due work is read at most ``per_tenant`` rows per tenant, so one
  tenant's many due schedules never hide another tenant's.
- **One batch per run.** A run's result (its batch, or ``ok`` with no targets) is written in
  the same transaction as the batch, guarded by the attempt number the runner holds; a runner
  whose lease ran out and was taken over writes nothing.
- **Retries.** A failed attempt is ``retrying`` with ``next_attempt_at`` after a doubling
  backoff, ``failed`` after ``RUN_MAX_ATTEMPTS``; an attempt whose runner died (``running``
  past its lease) is tried again the same way; one whose scheduler stopped is handed back,
  due at once and unspent.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from itertools import pairwise
from typing import Any, cast
from zoneinfo import ZoneInfo

from croniter import CroniterBadCronError, CroniterBadDateError, croniter
from sqlalchemy import CursorResult, and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.errors import ErrorDetail, NotFound, ValidationError
from syncsvc.planner.tags import parse
from syncsvc.service import batches, signing
from syncsvc.service.plans import PlanSpec, load_users, referenced_users, spec_from_json
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import Batch, Schedule, ScheduleRun

log = logging.getLogger("syncsvc.scheduler")

#: ``@daily`` and friends, which croniter reads as the five-field expressions they stand for.
CRON_ALIASES = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)
CRON_FIELDS = 5
#: How many cron candidates to step over while a DST change maps several onto one instant.
CRON_SEARCH_STEPS = 16

MINUTES_PER_DAY = 24 * 60


class RunState(StrEnum):
    """``ScheduleRun.state``."""

    #: An attempt holds it until ``next_attempt_at`` (its lease).
    RUNNING = "running"
    #: Due again at ``next_attempt_at``.
    RETRYING = "retrying"
    #: Done: its batch committed, or no targets.
    OK = "ok"
    #: Gave up after ``RUN_MAX_ATTEMPTS``.
    FAILED = "failed"


#: Attempts per occurrence before its run is ``failed`` (1 try + 5 retries, ~31 min apart).
RUN_MAX_ATTEMPTS = 6
RETRY_BASE_S = 60.0
RETRY_MAX_S = 3600.0
#: How long an attempt belongs to its runner; after that a crashed runner's attempt is retried.
RUN_LEASE_S = 300.0
ERROR_MAX_CHARS = 4000
LIST_LIMIT_MAX = 500


# --- When: cron in a time zone -------------------------------------------------------------


def check_cron(expr: str) -> str:
    """A five-field cron expression (or an ``@daily``-style alias) that ever occurs."""
    fields = expr.split()
    if not (len(fields) == 1 and fields[0] in CRON_ALIASES) and len(fields) != CRON_FIELDS:
        raise ValueError(
            "must be five fields (minute hour day-of-month month day-of-week), e.g. 0 6 * * mon"
        )
    if not croniter.is_valid(expr):
        raise ValueError(f"not a valid cron expression: {expr!r}")
    try:
        croniter(expr, datetime(2000, 1, 1)).get_next(datetime)
    except (CroniterBadCronError, CroniterBadDateError) as exc:
        raise ValueError(f"the cron expression {expr!r} never occurs") from exc
    return " ".join(fields)


def shortest_gap(expr: str) -> timedelta:
    """How close together a checked cron expression fires on the wall clock, at most a day.

    Every day it fires, it fires at the same hours and minutes, so one day's times and the step
    from the last to the next day's first hold the shortest gap, whatever the day fields and
    the date (sampling a few days would miss ``0,1 6 1 * *``). The step past midnight counts
    even when the next day does not fire: this errs towards refusing.
    """
    minutes, hours = croniter(expr).expanded[:2]
    times = sorted(
        {
            hour * 60 + minute
            for hour in (range(24) if hours == ["*"] else hours)
            for minute in (range(60) if minutes == ["*"] else minutes)
        }
    )
    gaps = [later - earlier for earlier, later in pairwise(times)]
    return timedelta(minutes=min([*gaps, times[0] + MINUTES_PER_DAY - times[-1]]))


def check_interval(expr: str, minimum: timedelta) -> None:
    """Refuses a cron that fires more often than ``minimum``: each run fetches a tenant URL and
    plans a batch, so a schedule every minute is load on the service, not a use of it."""
    gap = shortest_gap(expr)
    if gap < minimum:
        raise ValidationError(
            "the schedule runs too often",
            [
                ErrorDetail(
                    ("cron",),
                    f"fires {gap // timedelta(minutes=1)} minutes apart; schedules may fire "
                    f"at most every {minimum // timedelta(minutes=1)} minutes",
                )
            ],
        )


@dataclass(frozen=True, slots=True)
class Cron:
    """A cron expression on the wall clock of an IANA zone.

    Candidates are local times, placed in the zone as cron does: a local time skipped by
    spring-forward (03:30 in a 03:00→04:00 gap) runs at the moment of the change, and one that
    happens twice at fall-back runs once, the first time. Placing is monotonic (a later local
    time is never an earlier instant), so walking candidates walks instants. Instants are UTC.
    """

    expr: str
    zone: ZoneInfo

    @classmethod
    def of(cls, expr: str, timezone: str) -> Cron:
        return cls(expr, ZoneInfo(timezone))

    def _instant(self, local: datetime) -> datetime:
        first = local.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        if first.astimezone(self.zone).replace(tzinfo=None) == local:
            return first
        # In a gap: the change happens between the two readings of ``local``.
        before = local.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        lo, hi = min(before, first), max(before, first)
        while hi - lo > timedelta(seconds=1):
            mid = lo + (hi - lo) / 2
            if mid.astimezone(self.zone).utcoffset() == hi.astimezone(self.zone).utcoffset():
                hi = mid
            else:
                lo = mid
        return hi.replace(microsecond=0)

    def _local(self, instant: datetime) -> datetime:
        return instant.astimezone(self.zone).replace(tzinfo=None)

    def next_after(self, instant: datetime) -> datetime:
        """The first occurrence strictly after ``instant``."""
        candidates = croniter(self.expr, self._local(instant))
        for _ in range(CRON_SEARCH_STEPS):
            found = self._instant(candidates.get_next(datetime))
            if found > instant:
                return found
        raise ValueError(f"no occurrence of {self.expr!r} after {instant.isoformat()}")

    def latest_at_or_before(self, instant: datetime) -> datetime:
        """The last occurrence at or before ``instant``."""
        candidates = croniter(self.expr, self._local(instant) + timedelta(seconds=1))
        for _ in range(CRON_SEARCH_STEPS):
            found = self._instant(candidates.get_prev(datetime))
            if found <= instant:
                break
        else:
            raise ValueError(f"no occurrence of {self.expr!r} before {instant.isoformat()}")
        # In the second pass of a fall-back hour the wall clock reads earlier than it did:
        # occurrences of the first pass lie ahead of ``found`` on the wall clock.
        while (later := self.next_after(found)) <= instant:
            found = later
        return found


# --- The saved plan ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """A validated ``POST /v1/schedules`` body; ``plan`` is the plan body without targets."""

    name: str
    cron: str
    timezone: str
    targets_url: str
    plan: Mapping[str, Any]


def run_body(plan: Mapping[str, Any], targets: Sequence[Any], day: date) -> dict[str, Any]:
    """The plan body of one run: the saved plan with the fetched targets, starting on the
    run's own day (the seed: a scheduled creation always starts from the current day), or on
    the saved ``schedule.start_date`` while that is still ahead."""
    schedule = dict(plan["schedule"])
    saved = schedule.get("start_date")
    start = max(day, date.fromisoformat(saved)) if saved else day
    schedule["start_date"] = start.isoformat()
    return {**plan, "schedule": schedule, "targets": list(targets)}


async def _check_plan(session: AsyncSession, tenant_id: str, plan: Mapping[str, Any]) -> None:
    """What can be checked before any targets exist: the assigned users are the tenant's and
    the text tags are known. Details name the field under ``plan``."""
    try:
        spec = spec_from_json(run_body(plan, [], date.min))
        parse(spec.template.subject, ("template", "subject"))
        parse(spec.template.description, ("template", "description"))
        await load_users(session, tenant_id, referenced_users(spec))
    except ValidationError as exc:
        exc.details = tuple(ErrorDetail(("plan", *d.loc), d.msg) for d in exc.details)
        raise


async def create(
    session: AsyncSession,
    tenant_id: str,
    spec: ScheduleSpec,
    now: datetime,
    *,
    min_interval: timedelta,
) -> Schedule:
    check_interval(spec.cron, min_interval)
    await _check_plan(session, tenant_id, spec.plan)
    row = Schedule(
        id=uuid.uuid4().hex,
        tenant_id=tenant_id,
        name=spec.name,
        cron=spec.cron,
        timezone=spec.timezone,
        targets_url=spec.targets_url,
        plan=dict(spec.plan),
        next_run_at=Cron.of(spec.cron, spec.timezone).next_after(now),
    )
    session.add(row)
    await session.flush()
    return row


async def get(session: AsyncSession, tenant_id: str, schedule_id: str) -> Schedule:
    row = await session.scalar(
        select(Schedule).where(Schedule.id == schedule_id, Schedule.tenant_id == tenant_id)
    )
    if row is None:
        raise NotFound(
            f"schedule {schedule_id!r} not found", [ErrorDetail(("id",), "no such schedule")]
        )
    return row


async def list_schedules(
    session: AsyncSession, tenant_id: str, limit: int, after: tuple[datetime, str] | None
) -> list[Schedule]:
    """Newest first by (created_at, id); up to ``limit + 1`` rows (the extra one says more)."""
    query = select(Schedule).where(Schedule.tenant_id == tenant_id)
    if after is not None:
        created_at, last_id = after
        query = query.where(
            or_(
                Schedule.created_at < created_at,
                and_(Schedule.created_at == created_at, Schedule.id < last_id),
            )
        )
    limit = max(1, min(limit, LIST_LIMIT_MAX))
    ordered = query.order_by(Schedule.created_at.desc(), Schedule.id.desc()).limit(limit + 1)
    return list(await session.scalars(ordered))


async def delete_schedule(session: AsyncSession, tenant_id: str, schedule_id: str) -> None:
    """Removes the schedule and its runs; batches it made stay (they are the CRM's now).
    A run in progress finds its row gone and commits nothing."""
    row = await get(session, tenant_id, schedule_id)
    await session.execute(delete(ScheduleRun).where(ScheduleRun.schedule_id == row.id))
    await session.delete(row)
    await session.flush()


async def list_runs(
    session: AsyncSession,
    schedule: Schedule,
    limit: int,
    after: tuple[datetime, str] | None,
) -> list[ScheduleRun]:
    """The runs of a schedule (from :func:`get`, which checked the tenant), latest occurrence
    first; up to ``limit + 1`` rows."""
    query = select(ScheduleRun).where(
        ScheduleRun.tenant_id == schedule.tenant_id, ScheduleRun.schedule_id == schedule.id
    )
    if after is not None:
        occurrence, last_id = after
        query = query.where(
            or_(
                ScheduleRun.occurrence < occurrence,
                and_(ScheduleRun.occurrence == occurrence, ScheduleRun.id < last_id),
            )
        )
    limit = max(1, min(limit, LIST_LIMIT_MAX))
    ordered = query.order_by(ScheduleRun.occurrence.desc(), ScheduleRun.id.desc())
    return list(await session.scalars(ordered.limit(limit + 1)))


# --- Running: claims, results, retries -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class DueSchedule:
    id: str
    tenant_id: str
    cron: str
    timezone: str
    next_run_at: datetime


@dataclass(frozen=True, slots=True)
class ClaimedRun:
    """One attempt of one occurrence, held by this runner while ``attempt`` is current."""

    run_id: str
    attempt: int
    schedule_id: str
    tenant_id: str
    occurrence: datetime
    timezone: str
    targets_url: str
    plan: Mapping[str, Any]

    @property
    def day(self) -> date:
        """The occurrence's date in the schedule's zone: the day its batch starts planning."""
        return self.occurrence.astimezone(ZoneInfo(self.timezone)).date()


@dataclass(frozen=True, slots=True)
class DueRetry:
    run_id: str
    tenant_id: str
    attempts: int


@dataclass(frozen=True, slots=True)
class RunResult:
    state: RunState
    batch_id: str | None = None
    next_attempt_at: datetime | None = None


class _ClaimLost(Exception):
    """Someone else holds the run now: roll back and leave it to them."""


def retry_delay_s(attempt: int) -> float:
    """Wait after the ``attempt``-th failure: 60 s, doubling, at most an hour."""
    return float(min(RETRY_BASE_S * 2 ** (attempt - 1), RETRY_MAX_S))


def _changed(result: object) -> int:
    return cast(CursorResult[Any], result).rowcount


async def due_schedules(
    session: AsyncSession, now: datetime, limit: int, per_tenant: int
) -> list[DueSchedule]:
    """The longest-due schedules, at most ``per_tenant`` of each tenant."""
    order = (Schedule.next_run_at, Schedule.id)
    ranked = (
        select(
            Schedule.id,
            Schedule.tenant_id,
            Schedule.cron,
            Schedule.timezone,
            Schedule.next_run_at,
            func.row_number().over(partition_by=Schedule.tenant_id, order_by=order).label("rank"),
        )
        .where(Schedule.next_run_at <= now)
        .subquery()
    )
    rows = await session.execute(
        select(
            ranked.c.id, ranked.c.tenant_id, ranked.c.cron, ranked.c.timezone, ranked.c.next_run_at
        )
        .where(ranked.c.rank <= per_tenant)
        .order_by(ranked.c.next_run_at, ranked.c.id)
        .limit(limit)
    )
    return [DueSchedule(*row) for row in rows]


async def claim_occurrence(db: Database, due: DueSchedule, now: datetime) -> ClaimedRun | None:
    """Claims the latest due occurrence and moves ``next_run_at`` past ``now``; None when
    another scheduler claimed it (or moved the schedule on, or deleted it) first."""
    cron = Cron.of(due.cron, due.timezone)
    occurrence = max(cron.latest_at_or_before(now), due.next_run_at)
    run_id = uuid.uuid4().hex
    try:
        async with db.session() as session, session.begin():
            session.add(
                ScheduleRun(
                    id=run_id,
                    tenant_id=due.tenant_id,
                    schedule_id=due.id,
                    occurrence=occurrence,
                    state=RunState.RUNNING,
                    attempts=1,
                    next_attempt_at=now + timedelta(seconds=RUN_LEASE_S),
                    started_at=now,
                )
            )
            await session.flush()
            moved = await session.execute(
                update(Schedule)
                .where(Schedule.id == due.id, Schedule.next_run_at == due.next_run_at)
                .values(next_run_at=cron.next_after(now), updated_at=now)
            )
            if _changed(moved) != 1:
                raise _ClaimLost
            return await _claimed(session, run_id, 1)
    except (IntegrityError, _ClaimLost) as exc:
        # The run row exists (unique violation) or the schedule is gone (foreign key) or
        # moved on: another scheduler has it.
        log.debug(
            "event=schedule.claim.lost schedule=%s occurrence=%s why=%s",
            due.id,
            occurrence.isoformat(),
            type(exc).__name__,
        )
        return None


async def _claimed(session: AsyncSession, run_id: str, attempt: int) -> ClaimedRun:
    row = (
        await session.execute(
            select(ScheduleRun, Schedule)
            .join(Schedule, Schedule.id == ScheduleRun.schedule_id)
            .where(ScheduleRun.id == run_id)
        )
    ).one()
    run, schedule = row
    return ClaimedRun(
        run_id=run.id,
        attempt=attempt,
        schedule_id=schedule.id,
        tenant_id=schedule.tenant_id,
        occurrence=run.occurrence,
        timezone=schedule.timezone,
        targets_url=schedule.targets_url,
        plan=dict(schedule.plan),
    )


async def due_retries(
    session: AsyncSession, now: datetime, limit: int, per_tenant: int
) -> list[DueRetry]:
    """Runs whose next try is due, or whose runner's lease ran out, longest-due first, at most
    ``per_tenant`` of each tenant."""
    order = (ScheduleRun.next_attempt_at, ScheduleRun.id)
    ranked = (
        select(
            ScheduleRun.id,
            ScheduleRun.tenant_id,
            ScheduleRun.attempts,
            ScheduleRun.next_attempt_at,
            func.row_number()
            .over(partition_by=ScheduleRun.tenant_id, order_by=order)
            .label("rank"),
        )
        .where(
            ScheduleRun.state.in_((RunState.RETRYING, RunState.RUNNING)),
            ScheduleRun.next_attempt_at <= now,
        )
        .subquery()
    )
    rows = await session.execute(
        select(ranked.c.id, ranked.c.tenant_id, ranked.c.attempts)
        .where(ranked.c.rank <= per_tenant)
        .order_by(ranked.c.next_attempt_at, ranked.c.id)
        .limit(limit)
    )
    return [DueRetry(str(run_id), str(tenant), int(n)) for run_id, tenant, n in rows]


async def claim_retry(db: Database, run_id: str, seen: int, now: datetime) -> ClaimedRun | None:
    """The next attempt of a run, if its attempt count is still the one seen."""
    async with db.session() as session, session.begin():
        taken = await session.execute(
            update(ScheduleRun)
            .where(
                ScheduleRun.id == run_id,
                ScheduleRun.attempts == seen,
                ScheduleRun.state.in_((RunState.RETRYING, RunState.RUNNING)),
                ScheduleRun.next_attempt_at <= now,
            )
            .values(
                state=RunState.RUNNING,
                attempts=seen + 1,
                next_attempt_at=now + timedelta(seconds=RUN_LEASE_S),
            )
        )
        if _changed(taken) != 1:
            return None
        return await _claimed(session, run_id, seen + 1)


def _held(run: ClaimedRun) -> Any:
    return and_(
        ScheduleRun.id == run.run_id,
        ScheduleRun.attempts == run.attempt,
        ScheduleRun.state == RunState.RUNNING,
    )


async def finish(
    db: Database, run: ClaimedRun, spec: PlanSpec | None, now: datetime
) -> RunResult | None:
    """Commits the run's batch (none for an empty target list) and marks the run ``ok``, in
    one transaction. None if the run is no longer ours (nothing is written then). A plan
    that cannot be planned raises its ``ValidationError`` and writes nothing either."""
    try:
        async with db.session() as session, session.begin():
            marked = await session.execute(
                update(ScheduleRun)
                .where(_held(run))
                .values(state=RunState.OK, finished_at=now, next_attempt_at=None, error=None)
            )
            if _changed(marked) != 1:
                raise _ClaimLost
            if spec is None:
                return RunResult(RunState.OK)
            created, _ = await batches.commit(session, run.tenant_id, spec, now)
            await session.execute(
                update(Batch).where(Batch.id == created.id).values(schedule_id=run.schedule_id)
            )
            await session.execute(
                update(ScheduleRun).where(ScheduleRun.id == run.run_id).values(batch_id=created.id)
            )
            return RunResult(RunState.OK, batch_id=created.id)
    except _ClaimLost:
        return None


async def record_failure(
    db: Database, run: ClaimedRun, error: str, now: datetime
) -> RunResult | None:
    """``retrying`` after a backoff, or ``failed`` after the last attempt; None if the run is
    no longer ours."""
    if run.attempt >= RUN_MAX_ATTEMPTS:
        result = RunResult(RunState.FAILED)
        values: dict[str, Any] = {
            "state": RunState.FAILED,
            "finished_at": now,
            "next_attempt_at": None,
        }
    else:
        retry_at = now + timedelta(seconds=retry_delay_s(run.attempt))
        result = RunResult(RunState.RETRYING, next_attempt_at=retry_at)
        values = {"state": RunState.RETRYING, "next_attempt_at": retry_at}
    async with db.session() as session, session.begin():
        marked = await session.execute(
            update(ScheduleRun).where(_held(run)).values(error=error[:ERROR_MAX_CHARS], **values)
        )
        return result if _changed(marked) == 1 else None


async def hand_back(db: Database, run: ClaimedRun, now: datetime) -> bool:
    """A stopping scheduler's attempt is due again at once, unspent, for whichever scheduler
    runs next (not after its lease); False if the run was no longer ours."""
    async with db.session() as session, session.begin():
        marked = await session.execute(
            update(ScheduleRun)
            .where(_held(run))
            .values(state=RunState.RETRYING, attempts=run.attempt - 1, next_attempt_at=now)
        )
        return _changed(marked) == 1


async def targets_headers(db: Database, box: SecretBox, run: ClaimedRun) -> dict[str, str]:
    """The tenant's Standard Webhooks headers for one attempt's ``GET targets_url``: the
    signed "body" is the URL as stored (a GET has none), the id names the run and attempt.
    Real time, not the scheduler's clock: the CRM checks the timestamp against its own."""
    now = datetime.now(UTC)
    async with db.session() as session:
        secrets = await signing.signing_secrets(session, box, run.tenant_id, now)
    message_id = f"run_{run.run_id}_{run.attempt}"
    return signing.signed_headers(secrets, message_id, run.targets_url, now)
