"""Activities: read one, a batch's or a filtered list, change or delete one or many, plan a
follow-up call, close one with a follow-up, read a follow-up chain.

The seed's assignee rule: an activity its assignee changed in their own calendar
(``user_edited``) is theirs; a change or delete by the CRM is then a 409 naming it, unless
``force`` (which hands the activity back to the CRM: ``user_edited`` is cleared).

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

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.errors import Conflict, ErrorDetail, NotFound, ValidationError
from syncsvc.planner import next_free_slot
from syncsvc.planner.model import Schedule
from syncsvc.queue.outbox import (
    NewEvent,
    add_events,
    calendar_of,
    chunks,
    request_deletes,
    request_updates,
)
from syncsvc.service.activity_filters import ActivityFilter, conditions
from syncsvc.service.plans import closing_days, plan_user, schedule_from_json
from syncsvc.store.models import Activity, Batch, ExternalEvent, User
from syncsvc.store.states import DELETION_REQUESTED, Lane
from syncsvc.store.types import utcnow

STATUSES = ("planned", "completed", "cancelled", "unanswered")
#: Up to this many activities changed at once still count as one user's action.
INTERACTIVE_MAX_ACTIVITIES = 20
#: A follow-up of an activity without a length (a task) lasts this long.
DEFAULT_FOLLOW_UP = timedelta(minutes=15)
#: Rows read per query when exporting a whole batch.
EXPORT_CHUNK_ROWS = 1000
#: Fields an activity PATCH may set; ``None`` clears only ``reminder_minutes``.
PATCHABLE = (
    "status",
    "start",
    "end",
    "subject",
    "description",
    "reminder_minutes",
    "direction",
    "phone",
)
NULLABLE = frozenset({"reminder_minutes", "direction"})
#: Follow-up links followed at most this deep either way (a chain is a handful of calls).
HISTORY_MAX_DEPTH = 1000


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
    direction: str | None = None
    phone: str = ""
    created_at: datetime | None = None
    #: Every target of the activity (several for a ``shared`` one), ``target_id`` first.
    target_ids: tuple[str, ...] = ()

    @property
    def sort_key(self) -> tuple[int, str, str]:
        """The list's order: timed activities by start, then tasks by due date, then anything
        with neither; ``id`` breaks ties. Carried in the cursor as ``[0, start, id]``,
        ``[1, due, id]`` or ``[2, "", id]``."""
        if self.start is not None:
            return (0, self.start.isoformat(), self.id)
        if self.due is not None:
            return (1, self.due.isoformat(), self.id)
        return (2, "", self.id)


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


#: What a view reads of an activity; ``_page`` selects only these.
_VIEW_COLUMNS = (
    Activity.id,
    Activity.batch_id,
    Activity.seq,
    Activity.target_id,
    Activity.user_id,
    Activity.kind,
    Activity.start,
    Activity.end,
    Activity.due,
    Activity.subject,
    Activity.description,
    Activity.location,
    Activity.status,
    Activity.priority,
    Activity.reminder_minutes,
    Activity.follow_up_of,
    Activity.version,
    Activity.user_edited,
    Activity.direction,
    Activity.phone,
    Activity.created_at,
    Activity.target_ids,
)


def _view(activity: Any, timezone: str, external: External | None) -> ActivityView:
    """From an ``Activity`` or a row of ``_VIEW_COLUMNS`` (the same attribute names)."""
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
        direction=activity.direction,
        phone=activity.phone,
        created_at=activity.created_at,
        target_ids=tuple(activity.target_ids or (activity.target_id,)),
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
    return select(Activity, User.timezone).join(User, _assignee())


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
    session: AsyncSession,
    tenant_id: str,
    activity_id: str,
    changes: Mapping[str, Any],
    *,
    force: bool = False,
) -> ActivityView:
    """Change one activity; its external event follows through an interactive operation.

    Only ``start`` moves ``end`` along (the length is kept); ``end`` must stay after ``start``.
    An activity its assignee edited is a 409 unless ``force``.
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
    if values.get("direction") is not None and activity.kind != "call":
        raise ValidationError(
            "only a call has a direction", [ErrorDetail(("direction",), "only calls have one")]
        )
    if not values:
        return await get(session, tenant_id, activity_id)
    _check_assignee([(activity.id, activity.user_edited)], force, ("id",))
    for name, value in values.items():
        setattr(activity, name, value)
    if force:
        activity.user_edited = False
    activity.version += 1
    activity.updated_at = utcnow()
    await session.flush()
    await request_updates(session, tenant_id, [activity.id], Lane.INTERACTIVE)
    return _view(activity, timezone, (await _externals(session, [activity.id])).get(activity.id))


def _check_assignee(
    found: Sequence[tuple[str, bool]], force: bool, loc: tuple[str | int, ...]
) -> None:
    """The seed's rule: what the assignee changed themselves is theirs, unless forced."""
    if force:
        return
    edited = [aid for aid, user_edited in found if user_edited]
    if edited:
        raise Conflict(
            f"{len(edited)} activit{'y was' if len(edited) == 1 else 'ies were'} changed by "
            "the assignee in their own calendar; send force to override",
            [
                ErrorDetail(loc, f"activity {aid!r} was changed by its assignee (user_edited)")
                for aid in edited
            ],
        )


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
    session: AsyncSession,
    tenant_id: str,
    activity_ids: Sequence[str] | None,
    status: str,
    *,
    wanted: ActivityFilter | None = None,
    force: bool = False,
) -> int:
    """One status for the activities named by ``activity_ids``, or else matched by ``wanted``.

    All or nothing: an unknown or foreign id is a 404 naming it, an activity its assignee
    edited a 409 naming it (unless ``force``); then nothing is written. Answers how many
    activities changed.
    """
    if status not in STATUSES:
        raise ValidationError(
            "unknown status", [ErrorDetail(("status",), f"must be one of {', '.join(STATUSES)}")]
        )
    found = await _select(session, tenant_id, activity_ids, wanted)
    missing = _missing(activity_ids, found)
    if missing:
        raise NotFound(
            f"{len(missing)} unknown activit{'y' if len(missing) == 1 else 'ies'}", missing
        )
    changed = [aid for aid, row in found.items() if row.status != status]
    _check_assignee([(aid, found[aid].user_edited) for aid in changed], force, ("ids",))
    stamp = utcnow()
    values: dict[str, Any] = {
        "status": status,
        "version": Activity.version + 1,
        "updated_at": stamp,
    }
    if force:
        values["user_edited"] = False
    for chunk in chunks(changed):
        await session.execute(
            update(Activity)
            .where(Activity.tenant_id == tenant_id, Activity.id.in_(chunk))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    await request_updates(session, tenant_id, changed, _lane(len(changed)))
    return len(changed)


def _lane(count: int) -> Lane:
    return Lane.INTERACTIVE if count <= INTERACTIVE_MAX_ACTIVITIES else Lane.BULK


@dataclass(frozen=True, slots=True)
class _Selected:
    status: str
    user_edited: bool
    batch_id: str | None


async def _select(
    session: AsyncSession,
    tenant_id: str,
    activity_ids: Sequence[str] | None,
    wanted: ActivityFilter | None,
) -> dict[str, _Selected]:
    """The live activities of the tenant named by ``activity_ids`` (in their order), or else
    matched by ``wanted``: what a bulk change or delete acts on."""
    columns = (Activity.id, Activity.status, Activity.user_edited, Activity.batch_id)
    found: dict[str, _Selected] = {}
    if activity_ids is not None:
        wanted_ids = list(dict.fromkeys(activity_ids))
        for chunk in chunks(wanted_ids):
            rows = await session.execute(
                select(*columns).where(
                    Activity.tenant_id == tenant_id,
                    Activity.id.in_(chunk),
                    Activity.deleted.is_(False),
                )
            )
            found.update({aid: _Selected(st, ed, bid) for aid, st, ed, bid in rows})
        return {aid: found[aid] for aid in wanted_ids if aid in found}
    terms = await conditions(session, tenant_id, wanted or ActivityFilter(), ("filter",))
    rows = await session.execute(select(*columns).join(User, _assignee()).where(*terms))
    return {aid: _Selected(st, ed, bid) for aid, st, ed, bid in rows}


def _missing(activity_ids: Sequence[str] | None, found: Mapping[str, object]) -> list[ErrorDetail]:
    return [
        ErrorDetail(("ids", index), f"no such activity {aid!r}")
        for index, aid in enumerate(activity_ids or ())
        if aid not in found
    ]


def _assignee() -> ColumnElement[bool]:
    return (User.tenant_id == Activity.tenant_id) & (User.id == Activity.user_id)


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
        direction="outgoing",
        phone=original.phone,
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
            Lane.INTERACTIVE,
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


# --- The tenant's list, export, delete, close and history ------------------------------------


#: The list's parts in order (see ``ActivityView.sort_key``): which rows, sorted by what.
_PARTS: tuple[tuple[ColumnElement[bool], Any], ...] = (
    (Activity.start.is_not(None), Activity.start),
    (and_(Activity.start.is_(None), Activity.due.is_not(None)), Activity.due),
    (and_(Activity.start.is_(None), Activity.due.is_(None)), None),
)


def _cursor_value(part: int, at: str) -> datetime | date | None:
    try:
        if part == 0:
            start = datetime.fromisoformat(at)
            if start.tzinfo is not None:
                return start
        elif part == 1:
            return date.fromisoformat(at)
        elif part == 2 and at == "":
            return None
    except ValueError as exc:
        raise _bad_cursor() from exc
    raise _bad_cursor()


def _bad_cursor() -> ValidationError:
    return ValidationError(
        "the cursor is not valid", [ErrorDetail(("query", "cursor"), "not a cursor from this API")]
    )


async def list_activities(
    session: AsyncSession,
    tenant_id: str,
    wanted: ActivityFilter,
    limit: int,
    after: tuple[int, str, str] | None,
    loc: tuple[str | int, ...] = ("query",),
) -> list[ActivityView]:
    """A page of the tenant's activities matching ``wanted``, by start (tasks last, by due
    date): up to ``limit + 1`` rows, the extra one only says that another page exists."""
    terms = await conditions(session, tenant_id, wanted, loc)
    return await _page(session, terms, limit, after)


async def _page(
    session: AsyncSession,
    terms: Sequence[ColumnElement[bool]],
    limit: int,
    after: tuple[int, str, str] | None,
) -> list[ActivityView]:
    """Timed activities by (start, id), then tasks by (due, id), then the rest by id: a
    query per part that walks an index from the cursor on (``col >= v`` is the index bound),
    so every page of a long export costs the same. Plain columns, not ORM objects: a third of
    the cost per row."""
    base = select(*_VIEW_COLUMNS, User.timezone).join(User, _assignee()).where(*terms)
    first, value = 0, None
    if after is not None:
        first, value = after[0], _cursor_value(after[0], after[1])
    rows: list[Any] = []
    for part in range(first, len(_PARTS)):
        which, column = _PARTS[part]
        query = base.where(which)
        if after is not None and part == first:
            last_id = after[2]
            if column is None:
                query = query.where(Activity.id > last_id)
            else:
                query = query.where(column >= value, or_(column > value, Activity.id > last_id))
        order = (Activity.id,) if column is None else (column, Activity.id)
        rows += await session.execute(query.order_by(*order).limit(limit + 1 - len(rows)))
        if len(rows) > limit:
            break
    externals = await _externals(session, [row.id for row in rows])
    return [_view(row, row.timezone, externals.get(row.id)) for row in rows]


async def export_activities(
    session: AsyncSession,
    tenant_id: str,
    wanted: ActivityFilter,
    loc: tuple[str | int, ...] = ("query",),
) -> AsyncIterator[ActivityView]:
    """Every matching activity in list order, read ``EXPORT_CHUNK_ROWS`` at a time, so an
    export of 100,000 rows holds one chunk in memory. The filter is checked here, before the
    first row: a bad one is still a 422, not a broken download."""
    terms = await conditions(session, tenant_id, wanted, loc)
    return _export_pages(session, terms)


async def _export_pages(
    session: AsyncSession, terms: Sequence[ColumnElement[bool]]
) -> AsyncIterator[ActivityView]:
    after: tuple[int, str, str] | None = None
    while True:
        page = await _page(session, terms, EXPORT_CHUNK_ROWS, after)
        for view in page[:EXPORT_CHUNK_ROWS]:
            yield view
        if len(page) <= EXPORT_CHUNK_ROWS:
            return
        after = page[EXPORT_CHUNK_ROWS - 1].sort_key


@dataclass(frozen=True, slots=True)
class Deleted:
    deleted: int
    #: Ids asked for that this tenant has no live activity of (unknown, another tenant's,
    #: already deleted): refused, nothing touched.
    not_found: tuple[str, ...]


async def delete(
    session: AsyncSession,
    tenant_id: str,
    activity_ids: Sequence[str] | None,
    *,
    wanted: ActivityFilter | None = None,
    force: bool = False,
) -> Deleted:
    """Delete the activities named by ``activity_ids``, or else matched by ``wanted``, and
    their external events, durably: each live ledger row turns ``pending_delete`` with a
    ``delete`` operation in this transaction, as a batch delete does.

    An activity its assignee edited is a 409 naming it unless ``force``, and then nothing is
    deleted.
    """
    found = await _select(session, tenant_id, activity_ids, wanted)
    not_found = tuple(aid for aid in dict.fromkeys(activity_ids or ()) if aid not in found)
    _check_assignee([(aid, row.user_edited) for aid, row in found.items()], force, ("ids",))
    ids = list(found)
    stamp = utcnow()
    for chunk in chunks(ids):
        await session.execute(
            update(Activity)
            .where(Activity.tenant_id == tenant_id, Activity.id.in_(chunk))
            .values(deleted=True, version=Activity.version + 1, updated_at=stamp)
            .execution_options(synchronize_session=False)
        )
    per_batch: dict[str, int] = {}
    for row in found.values():
        if row.batch_id is not None:
            per_batch[row.batch_id] = per_batch.get(row.batch_id, 0) + 1
    for batch_id, count in per_batch.items():
        await session.execute(
            update(Batch)
            .where(Batch.tenant_id == tenant_id, Batch.id == batch_id)
            .values(total=Batch.total - count, updated_at=stamp)
        )
    await request_deletes(session, tenant_id, ids, _lane(len(ids)))
    return Deleted(deleted=len(ids), not_found=not_found)


async def close(
    session: AsyncSession,
    tenant_id: str,
    activity_id: str,
    status: str,
    wish: FollowUp | None,
    now: datetime,
    *,
    force: bool = False,
) -> tuple[ActivityView, ActivityView | None]:
    """The seed's quick close: the status and, with ``wish``, a follow-up call in the
    assignee's next free slot (or at its ``start``), both in the caller's transaction."""
    closed = await patch(session, tenant_id, activity_id, {"status": status}, force=force)
    if wish is None:
        return closed, None
    return closed, await follow_up(session, tenant_id, activity_id, wish, now)


async def history(session: AsyncSession, tenant_id: str, activity_id: str) -> list[ActivityView]:
    """The follow-up chain ``activity_id`` belongs to: up to its first call, then every
    follow-up of any call in it, oldest first. Deleted calls are passed through, not shown."""
    first, _ = await _load(session, tenant_id, activity_id)
    for _depth in range(HISTORY_MAX_DEPTH):
        if first.follow_up_of is None:
            break
        parent = await session.scalar(
            select(Activity).where(
                Activity.tenant_id == tenant_id, Activity.id == first.follow_up_of
            )
        )
        if parent is None:
            break
        first = parent
    chain: dict[str, Activity] = {first.id: first}
    level = [first.id]
    for _depth in range(HISTORY_MAX_DEPTH):
        if not level:
            break
        found: list[Activity] = []
        for chunk in chunks(level):
            found += await session.scalars(
                select(Activity).where(
                    Activity.tenant_id == tenant_id, Activity.follow_up_of.in_(chunk)
                )
            )
        level = [a.id for a in found if a.id not in chain]
        chain.update({a.id: a for a in found})
    live = sorted((a for a in chain.values() if not a.deleted), key=lambda a: (a.created_at, a.id))
    rows = await session.execute(
        select(User.id, User.timezone).where(
            User.tenant_id == tenant_id, User.id.in_({a.user_id for a in live})
        )
    )
    zones = {user_id: timezone for user_id, timezone in rows}
    externals = await _externals(session, [a.id for a in live])
    return [_view(a, zones.get(a.user_id, "UTC"), externals.get(a.id)) for a in live]


# --- A batch's report ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One activity of a batch with the targets and contacts it was planned for (Swedish
    seed, steps 5-6: a printable check of the selection, with activity numbers)."""

    activity: ActivityView
    user_name: str
    target_names: tuple[str, ...]
    #: ``First Last <email>`` of each target's contacts.
    contacts: tuple[str, ...]


async def batch_report(
    session: AsyncSession, tenant_id: str, batch_id: str
) -> AsyncIterator[ReportRow]:
    """Every live activity of the batch in order, read in chunks; the targets, contacts and
    user names come from the plan as committed. An unknown or foreign batch is a 404."""
    batch = await _check_batch(session, tenant_id, batch_id)
    stored = batch.request
    body: Mapping[str, Any] = stored.get("body") or {}
    targets: list[Mapping[str, Any]] = list(body.get("targets") or [])
    index: list[int] = list(stored.get("target_index") or [])
    users: Mapping[str, Mapping[str, str]] = stored.get("users") or {}
    first_of: dict[str, Mapping[str, Any]] = {}
    for target in targets:
        first_of.setdefault(str(target.get("id")), target)
    views = await export_batch(session, tenant_id, batch_id)

    async def rows() -> AsyncIterator[ReportRow]:
        async for view in views:
            planned = [first_of.get(t) for t in view.target_ids]
            if (
                view.follow_up_of is None
                and view.seq < len(index)
                and index[view.seq] < len(targets)
                and targets[index[view.seq]].get("id") == view.target_id
            ):
                planned[0] = targets[index[view.seq]]  # a repeated target: its own contacts
            found = [t for t in planned if t is not None]
            yield ReportRow(
                activity=view,
                user_name=str((users.get(view.user_id) or {}).get("name", "")),
                target_names=tuple(str(t.get("name", "")) for t in found),
                contacts=tuple(_contact(c) for t in found for c in t.get("contacts") or []),
            )

    return rows()


def _contact(contact: Mapping[str, Any]) -> str:
    name = f"{contact.get('first_name') or ''} {contact.get('last_name') or ''}".strip()
    email = contact.get("email") or ""
    return f"{name} <{email}>" if email else name
