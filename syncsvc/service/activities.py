"""Activities: read one or a batch's list, change one or many, plan a follow-up call.

A change by the CRM is one user's action, so its operation goes to the ``interactive`` lane
and is never queued behind a bulk batch. Times are stored in UTC and shown in the assignee's
zone. Writes join the caller's transaction, like every service function.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.errors import Conflict, ErrorDetail, NotFound, ValidationError
from syncsvc.planner import next_free_slot
from syncsvc.planner.model import Schedule
from syncsvc.queue.outbox import (
    Lane,
    NewEvent,
    add_events,
    calendar_of,
    chunks,
    request_updates,
)
from syncsvc.service.batches import DELETION_REQUESTED
from syncsvc.service.plans import closing_days, plan_user, schedule_from_json
from syncsvc.store.models import Activity, Batch, ExternalEvent, User
from syncsvc.store.types import utcnow

STATUSES = ("planned", "completed", "cancelled", "unanswered")
#: Up to this many activities changed at once still count as one user's action.
INTERACTIVE_MAX_ACTIVITIES = 20
#: A follow-up of an activity without a length (a task) lasts this long.
DEFAULT_FOLLOW_UP = timedelta(minutes=15)
#: Rows read per query when exporting a whole batch.
EXPORT_CHUNK_ROWS = 1000
#: Fields an activity PATCH may set; ``None`` clears only ``reminder_minutes``.
PATCHABLE = ("status", "start", "end", "subject", "description", "reminder_minutes")
NULLABLE = frozenset({"reminder_minutes"})


@dataclass(frozen=True, slots=True)
class External:
    provider: str
    event_id: str | None
    state: str


@dataclass(frozen=True, slots=True)
class ActivityView:
    id: str
    batch_id: str | None
    seq: int
    target_id: str
    user_id: str
    kind: str
    #: Aware, in the assignee's zone.
    start: datetime | None
    end: datetime | None
    due: date | None
    subject: str
    description: str
    location: str
    status: str
    priority: str
    reminder_minutes: int | None
    follow_up_of: str | None
    version: int
    user_edited: bool
    external: External | None


@dataclass(frozen=True, slots=True)
class FollowUp:
    """A follow-up call: at ``start``, else in the next free slot after the followed one."""

    start: datetime | None = None
    duration: timedelta | None = None
    subject: str | None = None
    description: str | None = None
    reminder_minutes: int | None = None


def _local(value: datetime | None, zone: ZoneInfo) -> datetime | None:
    return None if value is None else value.astimezone(zone)


def _view(activity: Activity, timezone: str, external: External | None) -> ActivityView:
    zone = ZoneInfo(timezone or "UTC")
    return ActivityView(
        id=activity.id,
        batch_id=activity.batch_id,
        seq=activity.seq,
        target_id=activity.target_id,
        user_id=activity.user_id,
        kind=activity.kind,
        start=_local(activity.start, zone),
        end=_local(activity.end, zone),
        due=activity.due,
        subject=activity.subject,
        description=activity.description,
        location=activity.location,
        status=activity.status,
        priority=activity.priority,
        reminder_minutes=activity.reminder_minutes,
        follow_up_of=activity.follow_up_of,
        version=activity.version,
        user_edited=activity.user_edited,
        external=external,
    )


async def _externals(session: AsyncSession, activity_ids: Sequence[str]) -> dict[str, External]:
    """The ledger row of each activity (an activity lives in at most one user calendar)."""
    out: dict[str, External] = {}
    for chunk in chunks(activity_ids):
        rows = await session.execute(
            select(
                ExternalEvent.activity_id,
                ExternalEvent.provider,
                ExternalEvent.event_id,
                ExternalEvent.state,
            )
            .where(ExternalEvent.activity_id.in_(chunk))
            .order_by(ExternalEvent.id)
        )
        for activity_id, provider, event_id, state in rows:
            out.setdefault(activity_id, External(provider, event_id, state))
    return out


def _with_zone() -> Any:
    return select(Activity, User.timezone).join(
        User, (User.tenant_id == Activity.tenant_id) & (User.id == Activity.user_id)
    )


async def _load(session: AsyncSession, tenant_id: str, activity_id: str) -> tuple[Activity, str]:
    """A live activity of this tenant with its assignee's zone; anything else is a 404."""
    row = (
        await session.execute(
            _with_zone().where(
                Activity.tenant_id == tenant_id,
                Activity.id == activity_id,
                Activity.deleted.is_(False),
            )
        )
    ).first()
    if row is None:
        raise NotFound(
            f"activity {activity_id!r} not found", [ErrorDetail(("id",), "no such activity")]
        )
    return row[0], row[1]


async def get(session: AsyncSession, tenant_id: str, activity_id: str) -> ActivityView:
    activity, timezone = await _load(session, tenant_id, activity_id)
    return _view(activity, timezone, (await _externals(session, [activity.id])).get(activity.id))


async def list_for_batch(
    session: AsyncSession,
    tenant_id: str,
    batch_id: str,
    limit: int,
    after: tuple[int, str] | None,
) -> list[ActivityView]:
    """A page in batch order, keyed by (``seq``, ``id``) since two follow-ups added at once may
    share a ``seq``: up to ``limit + 1`` rows, the extra one only says that another page
    exists. An unknown or foreign batch is a 404."""
    await _check_batch(session, tenant_id, batch_id)
    query = _with_zone().where(
        Activity.tenant_id == tenant_id,
        Activity.batch_id == batch_id,
        Activity.deleted.is_(False),
    )
    if after is not None:
        seq, last_id = after
        query = query.where(
            or_(Activity.seq > seq, and_(Activity.seq == seq, Activity.id > last_id))
        )
    rows = list(await session.execute(query.order_by(Activity.seq, Activity.id).limit(limit + 1)))
    externals = await _externals(session, [a.id for a, _ in rows])
    return [_view(a, tz, externals.get(a.id)) for a, tz in rows]


async def export_batch(
    session: AsyncSession, tenant_id: str, batch_id: str
) -> AsyncIterator[ActivityView]:
    """Every activity of a batch in order, read in chunks so a 10,000-row export stays small."""
    await _check_batch(session, tenant_id, batch_id)
    return _export(session, tenant_id, batch_id)


async def _export(
    session: AsyncSession, tenant_id: str, batch_id: str
) -> AsyncIterator[ActivityView]:
    after: tuple[int, str] | None = None
    while True:
        page = await list_for_batch(session, tenant_id, batch_id, EXPORT_CHUNK_ROWS, after)
        for view in page[:EXPORT_CHUNK_ROWS]:
            yield view
        if len(page) <= EXPORT_CHUNK_ROWS:
            return
        last = page[EXPORT_CHUNK_ROWS - 1]
        after = (last.seq, last.id)


async def _check_batch(session: AsyncSession, tenant_id: str, batch_id: str) -> Batch:
    batch = await session.scalar(
        select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id)
    )
    if batch is None:
        raise NotFound(f"batch {batch_id!r} not found", [ErrorDetail(("id",), "no such batch")])
    return batch


async def patch(
    session: AsyncSession, tenant_id: str, activity_id: str, changes: Mapping[str, Any]
) -> ActivityView:
    """Change one activity; its external event follows through an interactive operation.

    Only ``start`` moves ``end`` along (the length is kept); ``end`` must stay after ``start``.
    """
    details = [
        ErrorDetail((name,), "must not be null")
        for name, value in changes.items()
        if value is None and name not in NULLABLE
    ]
    if details:
        raise ValidationError(details[0].msg, details)
    activity, timezone = await _load(session, tenant_id, activity_id)
    values = {k: v for k, v in changes.items() if k in PATCHABLE}
    if "start" in values or "end" in values:
        values.update(_moved(activity, values.get("start"), values.get("end")))
    if not values:
        return await get(session, tenant_id, activity_id)
    for name, value in values.items():
        setattr(activity, name, value)
    activity.version += 1
    activity.updated_at = utcnow()
    await session.flush()
    await request_updates(session, tenant_id, [activity.id], "interactive")
    return _view(activity, timezone, (await _externals(session, [activity.id])).get(activity.id))


def _moved(activity: Activity, start: datetime | None, end: datetime | None) -> dict[str, datetime]:
    if activity.kind == "task":
        field = "start" if start is not None else "end"
        raise ValidationError(
            "a task has no time slot", [ErrorDetail((field,), "a task has no start or end")]
        )
    old_start, old_end = activity.start, activity.end
    if start is None:
        start = old_start
    if end is None and start is not None and old_start is not None and old_end is not None:
        end = start + (old_end - old_start)
    if start is None or end is None or not end > start:
        raise ValidationError(
            "end must be after start", [ErrorDetail(("end",), "must be after start")]
        )
    return {"start": start, "end": end}


async def set_status(
    session: AsyncSession, tenant_id: str, activity_ids: Sequence[str], status: str
) -> int:
    """One status for many activities; an unknown or foreign id is a 404 naming it, and then
    nothing is written. Answers how many activities changed."""
    if status not in STATUSES:
        raise ValidationError(
            "unknown status", [ErrorDetail(("status",), f"must be one of {', '.join(STATUSES)}")]
        )
    wanted = list(dict.fromkeys(activity_ids))
    current: dict[str, str] = {}
    for chunk in chunks(wanted):
        rows = await session.execute(
            select(Activity.id, Activity.status).where(
                Activity.tenant_id == tenant_id,
                Activity.id.in_(chunk),
                Activity.deleted.is_(False),
            )
        )
        current.update({aid: st for aid, st in rows})
    missing = [
        ErrorDetail(("ids", index), f"no such activity {aid!r}")
        for index, aid in enumerate(activity_ids)
        if aid not in current
    ]
    if missing:
        raise NotFound(
            f"{len(missing)} unknown activit{'y' if len(missing) == 1 else 'ies'}", missing
        )
    changed = [aid for aid in wanted if current[aid] != status]
    stamp = utcnow()
    for chunk in chunks(changed):
        await session.execute(
            update(Activity)
            .where(Activity.tenant_id == tenant_id, Activity.id.in_(chunk))
            .values(status=status, version=Activity.version + 1, updated_at=stamp)
            .execution_options(synchronize_session=False)
        )
    lane: Lane = "interactive" if len(changed) <= INTERACTIVE_MAX_ACTIVITIES else "bulk"
    await request_updates(session, tenant_id, changed, lane)
    return len(changed)


async def follow_up(
    session: AsyncSession, tenant_id: str, activity_id: str, wish: FollowUp, now: datetime
) -> ActivityView:
    """A call that follows ``activity_id`` for the same user and target, in the same batch.

    Without a ``start`` it takes the user's next free slot after both now and the followed
    activity, under the batch's own schedule (week, caps, days skipped), around the user's
    other activities.
    """
    original, timezone = await _load(session, tenant_id, activity_id)
    batch = None
    if original.batch_id is not None:
        batch = await _check_batch(session, tenant_id, original.batch_id)
        if batch.state in DELETION_REQUESTED:
            raise Conflict(
                f"batch {batch.id!r} is being deleted", [ErrorDetail(("id",), batch.state)]
            )
    user = await session.get(User, (tenant_id, original.user_id))
    if user is None:
        raise NotFound(f"user {original.user_id!r} not found")
    length = wish.duration or _length(original) or DEFAULT_FOLLOW_UP
    if wish.start is not None:
        start = wish.start
    else:
        after = max(now, original.end or now)
        schedule = _schedule(batch, length, after.astimezone(ZoneInfo(timezone)).date())
        taken = await _taken(session, tenant_id, user.id, after - timedelta(days=1))
        start, _ = next_free_slot(
            schedule,
            plan_user(user),
            after,
            taken,
            closing_days=await closing_days(session, tenant_id),
        )
    seq = original.seq
    if batch is not None:
        last = await session.scalar(
            select(func.max(Activity.seq)).where(Activity.batch_id == batch.id)
        )
        seq = (last or 0) + 1
        batch.total += 1
        batch.updated_at = utcnow()
    stamp = utcnow()
    activity = Activity(
        id=uuid.uuid4().hex,
        tenant_id=tenant_id,
        batch_id=original.batch_id,
        seq=seq,
        target_id=original.target_id,
        target_ids=list(original.target_ids),
        user_id=original.user_id,
        kind="call",
        start=start,
        end=start + length,
        due=None,
        subject=original.subject if wish.subject is None else wish.subject,
        description=wish.description or "",
        location=original.location,
        status="planned",
        priority=original.priority,
        reminder_minutes=(
            original.reminder_minutes if wish.reminder_minutes is None else wish.reminder_minutes
        ),
        attendees=list(original.attendees),
        fields=dict(original.fields),
        follow_up_of=original.id,
        user_edited=False,
        version=1,
        deleted=False,
        created_at=stamp,
        updated_at=stamp,
    )
    session.add(activity)
    await session.flush()
    calendar = calendar_of(user)
    if calendar is not None:
        await add_events(
            session,
            tenant_id,
            [NewEvent(activity.id, user.id, activity.batch_id, calendar)],
            "interactive",
        )
    return _view(activity, timezone, (await _externals(session, [activity.id])).get(activity.id))


def _length(activity: Activity) -> timedelta | None:
    if activity.start is None or activity.end is None:
        return None
    return activity.end - activity.start


def _schedule(batch: Batch | None, length: timedelta, first_day: date) -> Schedule:
    """The batch's schedule (its week, caps and skipped days) with the follow-up's length;
    an activity outside any batch uses the default week."""
    raw = (batch.request.get("body") or {}).get("schedule") if batch is not None else None
    base = schedule_from_json(raw) if raw else Schedule(start_date=first_day, duration=length)
    return replace(base, start_date=first_day, duration=length)


async def _taken(
    session: AsyncSession, tenant_id: str, user_id: str, after: datetime
) -> list[tuple[datetime, datetime]]:
    """The user's live activities ending after ``after``: a follow-up overlaps none of them,
    and they count against the schedule's ``max_per_day``."""
    rows = await session.execute(
        select(Activity.start, Activity.end).where(
            Activity.tenant_id == tenant_id,
            Activity.user_id == user_id,
            Activity.deleted.is_(False),
            Activity.status != "cancelled",
            Activity.end > after,
        )
    )
    return [(s, e) for s, e in rows if s is not None and e is not None]
