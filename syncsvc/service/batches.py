"""Batches: commit a plan, read its progress, edit its template, delete it.

Every write adds the batch's rows and their outbox operations to the caller's transaction
(``async with session.begin()``), so they commit together or not at all, before the answer;
only the external calendars follow later. A batch's ``state`` is derived from its ledger
rows when read, so it can never disagree with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Row, and_, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.errors import Conflict, ErrorDetail, NotFound, ValidationError
from syncsvc.planner.model import PlanUser, Target, UserSummary
from syncsvc.planner.tags import fixed_values, parse
from syncsvc.queue.outbox import (
    ACTIVITIES_TABLE,
    LEDGER_TABLE,
    Calendar,
    add_batch_creates,
    calendar_of,
    request_deletes,
    request_updates,
)
from syncsvc.service import idempotency
from syncsvc.service.plans import (
    CalendarBusy,
    PlanContext,
    PlanSpec,
    prepare,
    target_from_json,
    target_json,
)
from syncsvc.store.bulk import ROWS_PER_WRITE, Values, bulk_cache, insert_rows
from syncsvc.store.db import Database, describe
from syncsvc.store.models import Activity, Batch, ExternalEvent
from syncsvc.store.states import DELETION_REQUESTED, BatchState, Lane, LedgerState
from syncsvc.store.types import JsonText, dumps_fast, utcnow

log = logging.getLogger("syncsvc.batches")


#: Keys of ``Batch.request`` beside the plan: the key a failed commit forgets, and its error.
IDEMPOTENCY_KEY = "idempotency_key"
COMMIT_ERROR = "commit_error"
INTERRUPTED = "commit interrupted: the process writing it stopped; retry with the same key"
#: Activities written so far by the deferred commits this process runs, by batch id.
_PROGRESS: dict[str, int] = {}
#: Template fields a committed batch can change (the rest would re-plan it).
PATCHABLE_FIELDS = (
    "subject",
    "description",
    "location",
    "status",
    "priority",
    "reminder_minutes",
    "fields",
)
LIST_LIMIT_MAX = 500
#: The Core table, for one executemany of a whole batch's activities.


@dataclass(frozen=True, slots=True)
class SyncCounts:
    pending: int = 0
    synced: int = 0
    failed: int = 0
    deleting: int = 0
    deleted: int = 0


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a ``committing`` batch's write has come, in activities."""

    done: int
    total: int


@dataclass(frozen=True, slots=True)
class BatchView:
    id: str
    state: str
    total: int
    created_at: datetime
    created_by: str
    targetgroup_name: str
    sync: SyncCounts
    progress: Progress | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class BatchCreated:
    id: str
    created_by: str
    state: str
    total: int
    users: tuple[UserSummary, ...]
    progress: Progress | None = None


@dataclass(frozen=True, slots=True)
class BatchPatched:
    batch: BatchView
    updated: int
    skipped_user_edited: int


def created_by_of(batch_id: str) -> str:
    """The seed's "Created by" value: what every activity and external event is stamped with."""
    return f"syncsvc:batch:{batch_id}"


def counts_from(by_state: Mapping[str, int]) -> SyncCounts:
    """Ledger states folded into the contract's five counters."""
    return SyncCounts(
        pending=by_state.get(LedgerState.PENDING_CREATE, 0)
        + by_state.get(LedgerState.PENDING_UPDATE, 0),
        synced=by_state.get(LedgerState.SYNCED, 0),
        failed=by_state.get(LedgerState.FAILED, 0),
        deleting=by_state.get(LedgerState.PENDING_DELETE, 0),
        deleted=by_state.get(LedgerState.DELETED, 0),
    )


def derive_state(requested: str, sync: SyncCounts) -> BatchState:
    """A deleting batch is ``deleted`` once no row is left; otherwise failures win, then
    outstanding work; a batch with no rows (users without a calendar) is ``synced`` at once.
    A batch still committing, or whose commit failed, is that."""
    if requested in (BatchState.COMMITTING, BatchState.FAILED):
        return BatchState(requested)
    if requested in DELETION_REQUESTED:
        left = sync.pending + sync.synced + sync.failed + sync.deleting
        return BatchState.DELETED if left == 0 else BatchState.DELETING
    if sync.failed:
        return BatchState.FAILED
    if sync.pending or sync.deleting:
        return BatchState.SYNCING
    return BatchState.SYNCED


# --- Commit --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    """A planned batch ready to write: its rows are built slice by slice while the previous
    slice is written (``_write``)."""

    id: str
    tenant_id: str
    created_by: str
    users: tuple[UserSummary, ...]
    spec: PlanSpec
    ctx: PlanContext
    values: Values
    calendars: Mapping[str, Calendar | None]
    #: Each call target's phone number, by target id (calls only).
    phones: Mapping[str, str]
    #: Whether any activity goes to a calendar (else there is nothing to sync).
    has_events: bool

    @property
    def size(self) -> int:
        return len(self.ctx.plan.activities)

    @property
    def synced_state(self) -> BatchState:
        return BatchState.SYNCING if self.has_events else BatchState.SYNCED


@dataclass(frozen=True, slots=True)
class DeferredCommit:
    """A ``committing`` batch whose rows ``finish_commit`` builds and writes after the 202."""

    id: str
    tenant_id: str
    spec: PlanSpec
    ctx: PlanContext
    values: Values
    #: The request as stored, written with the rows (serialising 100,000 targets takes a
    #: third of a second, done meanwhile); until then only its key and time.
    stored: Callable[[], JsonText]


async def commit(
    session: AsyncSession,
    tenant_id: str,
    spec: PlanSpec,
    now: datetime,
    busy: CalendarBusy | None = None,
    *,
    defer_over: int | None = None,
    idempotency_key: str | None = None,
) -> tuple[BatchCreated, DeferredCommit | None]:
    """Plan and store a batch: batch, activities, ledger rows and operations in one commit.

    With more than ``defer_over`` activities only the batch is added, ``committing``; the
    caller commits it, answers 202 and hands the returned ``DeferredCommit`` to
    ``finish_commit``, which builds and writes the rows. A plan that fails validation raises
    before anything is added; any later error rolls the caller's transaction back, so an
    error leaves no rows behind.
    """
    ctx = await prepare(session, tenant_id, spec, now, busy)
    values = Values((await session.connection()).dialect.name)
    batch_id = uuid.uuid4().hex
    total = len(ctx.plan.activities)
    planned = None
    if defer_over is not None and total > defer_over:
        state = BatchState.COMMITTING
    else:
        planned = await asyncio.to_thread(_planned, batch_id, tenant_id, spec, ctx, values)
        state = planned.synced_state

    def stored_request() -> JsonText:
        return JsonText(dumps_fast(_stored_request(spec, ctx, now, idempotency_key)))

    if planned is None:  # the key alone until the rows are written (see DeferredCommit)
        stored = JsonText(json.dumps({IDEMPOTENCY_KEY: idempotency_key}))
    else:
        stored = await asyncio.to_thread(stored_request)
    stamp = utcnow()
    session.add(
        Batch(
            id=batch_id,
            tenant_id=tenant_id,
            created_by=created_by_of(batch_id),
            targetgroup_name=spec.targetgroup_name,
            request=cast(dict[str, Any], stored),  # serialised ahead (see JsonText)
            state=state,
            total=total,
            created_at=stamp,
            updated_at=stamp,
        )
    )
    await session.flush()
    created = BatchCreated(batch_id, created_by_of(batch_id), state, total, ctx.plan.users)
    if planned is None:
        _PROGRESS[batch_id] = 0
        deferred = DeferredCommit(batch_id, tenant_id, spec, ctx, values, stored_request)
        return replace(created, progress=Progress(0, total)), deferred
    await _write(session, planned, stamp)
    return created, None


ACTIVITY_COLUMNS = (
    "id", "tenant_id", "batch_id", "seq", "target_id", "target_ids", "user_id", "kind",
    "start", "end", "due", "subject", "description", "location", "status", "priority",
    "reminder_minutes", "attendees", "fields", "phone", "direction", "follow_up_of",
    "user_edited", "version", "deleted", "created_at", "updated_at",
)  # fmt: skip
LEDGER_COLUMNS = (
    "tenant_id", "activity_id", "batch_id", "user_id", "provider", "calendar", "state",
    "attempts", "created_at", "updated_at",
)  # fmt: skip


def _uuid4_hexes(n: int) -> Iterator[str]:
    """``n`` random version-4 UUIDs as ``uuid4().hex`` writes them, from one read of the OS's
    randomness: a quarter of the time of ``n`` calls."""
    block = os.urandom(16 * n).hex()
    for i in range(0, 32 * n, 32):
        h = block[i : i + 32]
        yield f"{h[:12]}4{h[13:16]}{'89ab'[int(h[16], 16) & 3]}{h[17:]}"


def _planned(
    batch_id: str, tenant_id: str, spec: PlanSpec, ctx: PlanContext, values: Values
) -> PlannedBatch:
    """What every slice of rows needs (in a thread: the phone index reads every target)."""
    calendars = {uid: calendar_of(user) for uid, user in ctx.users.items()}
    return PlannedBatch(
        batch_id,
        tenant_id,
        created_by_of(batch_id),
        ctx.plan.users,
        spec,
        ctx,
        values,
        calendars,
        _phones(spec.targets) if spec.template.kind == "call" else {},
        any(calendars[a.user_id] is not None for a in ctx.plan.activities),
    )


def _rows(
    planned: PlannedBatch, start: int, stop: int
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The activity and ledger rows of activities ``start:stop`` of the plan as plain tuples,
    ids chosen here (in a thread: 100,000 rows take half a second of Python)."""
    values = planned.values
    stamp = values.instant(utcnow())
    instant, day, as_json = values.instant, values.day, values.json
    template = planned.spec.template
    tenant_id, batch_id, calendars, phones = (
        planned.tenant_id, planned.id, planned.calendars, planned.phones,
    )  # fmt: skip
    direction = "outgoing" if template.kind == "call" else None
    fields = as_json(dict(template.fields))
    activities: list[tuple[Any, ...]] = []
    ledger: list[tuple[Any, ...]] = []
    part = planned.ctx.plan.activities[start:stop]
    ids = _uuid4_hexes(len(part))
    for seq, a in enumerate(part, start):
        activity_id = next(ids)
        activities.append(
            (
                activity_id, tenant_id, batch_id, seq, a.target_id,
                as_json(list(a.target_ids)), a.user_id, a.kind,
                instant(a.start), instant(a.end), day(a.due),
                a.subject, a.description, a.location, template.status,
                template.priority, template.reminder_minutes,
                as_json(
                    [
                        {"contact_id": p.contact_id, "name": p.name, "email": p.email}
                        for p in a.attendees
                    ]
                ),
                fields, phones.get(a.target_id, ""), direction, None, False, 1, False,
                stamp, stamp,
            )
        )  # fmt: skip
        calendar = calendars[a.user_id]
        if calendar is not None:
            ledger.append(
                (
                    tenant_id, activity_id, batch_id, a.user_id, calendar.provider,
                    calendar.calendar, LedgerState.PENDING_CREATE, 0, stamp, stamp,
                )
            )  # fmt: skip
    return activities, ledger


async def _write(session: AsyncSession, planned: PlannedBatch, now: datetime) -> None:
    """The batch's rows in the session's transaction, by the drivers' bulk paths: each slice
    is built in a thread while the one before it is written, so the database's work and
    ours overlap (on PostgreSQL the server's share is as large as ours)."""

    def build(start: int) -> asyncio.Future[tuple[list[Any], list[Any]]]:
        return asyncio.ensure_future(
            asyncio.to_thread(_rows, planned, start, start + ROWS_PER_WRITE)
        )

    size = planned.size
    ahead = build(0) if size else None
    try:
        async with bulk_cache(session):
            for start in range(0, size, ROWS_PER_WRITE):
                assert ahead is not None
                activities, ledger = await ahead
                ahead = build(start + ROWS_PER_WRITE) if start + ROWS_PER_WRITE < size else None
                await insert_rows(session, ACTIVITIES_TABLE, ACTIVITY_COLUMNS, activities)
                if ledger:
                    await insert_rows(session, LEDGER_TABLE, LEDGER_COLUMNS, ledger)
                if planned.id in _PROGRESS:
                    _PROGRESS[planned.id] += len(activities)
    finally:
        if ahead is not None:  # a write failed: the slice being built is not wanted
            with contextlib.suppress(Exception):
                await ahead
    if planned.has_events:
        await add_batch_creates(session, planned.tenant_id, planned.id, Lane.BULK, now)


async def finish_commit(db: Database, deferred: DeferredCommit) -> None:
    """Writes a ``committing`` batch's rows in one transaction, which also turns the batch
    ``syncing``: until it commits none of them is visible to a reader or a worker. If it
    fails (or the batch was marked failed meanwhile), the batch is ``failed`` with the error
    and its Idempotency-Key forgotten, so the CRM may retry with the same key."""
    try:
        planned = await asyncio.to_thread(
            _planned, deferred.id, deferred.tenant_id, deferred.spec, deferred.ctx, deferred.values
        )
        stored = asyncio.ensure_future(asyncio.to_thread(deferred.stored))
        async with db.session() as session, session.begin():
            # Locks the batch row on PostgreSQL: a recovery waits for this commit to end.
            state = await session.scalar(
                select(Batch.state).where(Batch.id == deferred.id).with_for_update()
            )
            if state != BatchState.COMMITTING:
                raise CommitInterrupted(f"batch {deferred.id} is no longer committing")
            stamp = utcnow()
            await _write(session, planned, stamp)
            done = await session.execute(
                update(Batch)
                .where(Batch.id == deferred.id, Batch.state == BatchState.COMMITTING)
                .values(state=planned.synced_state, request=await stored, updated_at=stamp)
            )
            if cast(CursorResult[Any], done).rowcount != 1:
                raise CommitInterrupted(f"batch {deferred.id} was marked failed meanwhile")
        await refresh_statistics(db, planned.size)
    except BaseException as exc:
        log.warning("event=batch.commit_failed batch=%s error=%s", deferred.id, describe(exc))
        with contextlib.suppress(Exception):
            await _fail(db, deferred.tenant_id, deferred.id, f"commit failed: {describe(exc)}")
        if not isinstance(exc, Exception):
            raise
    finally:
        _PROGRESS.pop(deferred.id, None)


#: A batch of at least this many activities refreshes PostgreSQL's statistics of the bulk
#: tables once committed: until autovacuum's next pass the planner estimates from the tables
#: as they were, and a worker's read of 20 ledger rows walked every new activity (15 ms
#: instead of 0.15 ms; the tables have no foreign keys to estimate joins by).
ANALYZE_AFTER_ACTIVITIES = 5_000


async def refresh_statistics(db: Database, activities: int) -> None:
    """After a commit of ``activities``: ``ANALYZE`` of the bulk tables when that is at least
    ``ANALYZE_AFTER_ACTIVITIES`` (PostgreSQL; a sample, so its cost does not grow with the
    batch). Best effort: autovacuum gets there too."""
    if db.dialect != "postgresql" or activities < ANALYZE_AFTER_ACTIVITIES:
        return
    try:
        async with db.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("ANALYZE activities, external_events, operations"))
    except Exception as exc:  # statistics only: never a reason for the commit to fail
        log.warning("event=batch.analyze_failed error=%s", describe(exc))


class CommitInterrupted(Exception):
    """A deferred commit found its batch no longer ``committing`` (marked failed)."""


async def _fail(db: Database, tenant_id: str, batch_id: str, error: str) -> None:
    """A ``committing`` batch turns ``failed`` with ``error`` (kept beside its stored request),
    and its Idempotency-Key is forgotten so that a retry commits it afresh."""
    committing = (Batch.id == batch_id, Batch.state == BatchState.COMMITTING)
    async with db.session() as session, session.begin():
        # FOR UPDATE waits for a commit still running on PostgreSQL; on SQLite the UPDATE
        # below waits for its write lock, and its condition then finds the batch committed.
        request = await session.scalar(select(Batch.request).where(*committing).with_for_update())
        if request is None:
            return
        stored = await asyncio.to_thread(
            lambda: JsonText(json.dumps({**request, COMMIT_ERROR: error[:2000]}))
        )
        failed = await session.execute(
            update(Batch)
            .where(*committing)
            .values(state=BatchState.FAILED, request=stored, updated_at=utcnow())
        )
        key = request.get(IDEMPOTENCY_KEY)
        if cast(CursorResult[Any], failed).rowcount == 1 and isinstance(key, str):
            await idempotency.forget_within(session, tenant_id, key)


async def recover_interrupted(db: Database) -> int:
    """At start-up: a batch left ``committing`` by a process that stopped has no rows (its
    transaction never committed); it turns ``failed`` and its key is forgotten."""
    async with db.session() as session:
        stuck = list(
            await session.execute(
                select(Batch.id, Batch.tenant_id).where(Batch.state == BatchState.COMMITTING)
            )
        )
    mine = [(b, t) for b, t in stuck if b not in _PROGRESS]
    for batch_id, tenant_id in mine:
        await _fail(db, tenant_id, batch_id, INTERRUPTED)
    return len(mine)


def _phones(targets: Sequence[Target]) -> dict[str, str]:
    """The number a planned call dials, by target: the target's own, else its first contact's
    phone or mobile (the first occurrence of a repeated target wins)."""
    out: dict[str, str] = {}
    for target in targets:
        if target.id not in out:
            contact = next(
                (c.phone or c.mobile for c in target.contacts if c.phone or c.mobile), ""
            )
            out[target.id] = target.phone or contact
    return out


def _stored_request(
    spec: PlanSpec, ctx: PlanContext, now: datetime, idempotency_key: str | None
) -> dict[str, Any]:
    """What a later template edit needs to re-render every activity's text tags alike:
    the body (targets included), the users as they were, and which target each activity
    (by ``seq``) took its tags from; and the Idempotency-Key a failed commit releases."""
    return {
        IDEMPOTENCY_KEY: idempotency_key,
        "body": {**spec.body, "targets": [target_json(t) for t in spec.targets]},
        "planned_at": now.isoformat(),
        "users": {
            uid: {"name": u.name, "email": u.email, "mobile": u.mobile}
            for uid, u in ctx.users.items()
        },
        "target_index": _target_index(spec.targets, [a.target_id for a in ctx.plan.activities]),
    }


def _target_index(targets: Sequence[Target], planned_ids: Sequence[str]) -> list[int]:
    """The input index of each activity's (first) target.

    Activities come in input order, so each one's target is the next occurrence of its id;
    this tells apart repeated targets whose contacts differ.
    """
    out: list[int] = []
    cursor = 0
    for target_id in planned_ids:
        while cursor < len(targets) and targets[cursor].id != target_id:
            cursor += 1
        out.append(cursor)
        cursor += 1
    return out


# --- Read ----------------------------------------------------------------------------------


async def _get_batch(session: AsyncSession, tenant_id: str, batch_id: str) -> Batch:
    batch = await session.scalar(
        select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id)
    )
    if batch is None:
        raise _no_batch(batch_id)
    return batch


def _no_batch(batch_id: str) -> NotFound:
    return NotFound(f"batch {batch_id!r} not found", [ErrorDetail(("id",), "no such batch")])


async def _counts(session: AsyncSession, batch_ids: Sequence[str]) -> dict[str, SyncCounts]:
    if not batch_ids:
        return {}
    rows = await session.execute(
        select(ExternalEvent.batch_id, ExternalEvent.state, func.count())
        .where(ExternalEvent.batch_id.in_(batch_ids))
        .group_by(ExternalEvent.batch_id, ExternalEvent.state)
    )
    by_batch: dict[str, dict[str, int]] = {}
    for batch_id, state, count in rows:
        by_batch.setdefault(str(batch_id), {})[state] = count
    return {bid: counts_from(by_batch.get(bid, {})) for bid in batch_ids}


#: What a view shows, without the stored request (20 MB for 100,000 targets, and progress is
#: polled): only a failed commit's error is read out of it.
_VIEW_COLUMNS = (
    Batch.id,
    Batch.state,
    Batch.total,
    Batch.created_at,
    Batch.created_by,
    Batch.targetgroup_name,
    Batch.request[COMMIT_ERROR].as_string().label("error"),
)


def _view(row: Row[Any], sync: SyncCounts) -> BatchView:
    committing = row.state == BatchState.COMMITTING
    return BatchView(
        id=row.id,
        state=derive_state(row.state, sync),
        total=row.total,
        created_at=row.created_at,
        created_by=row.created_by,
        targetgroup_name=row.targetgroup_name,
        sync=sync,
        progress=Progress(_PROGRESS.get(row.id, 0), row.total) if committing else None,
        error=row.error if row.state == BatchState.FAILED else None,
    )


async def get(session: AsyncSession, tenant_id: str, batch_id: str) -> BatchView:
    row = (
        await session.execute(
            select(*_VIEW_COLUMNS).where(Batch.id == batch_id, Batch.tenant_id == tenant_id)
        )
    ).first()
    if row is None:
        raise _no_batch(batch_id)
    return _view(row, (await _counts(session, [row.id]))[row.id])


async def list_batches(
    session: AsyncSession,
    tenant_id: str,
    limit: int,
    after: tuple[datetime, str] | None = None,
) -> list[BatchView]:
    """Newest first, by (created_at, id) so that a page boundary never skips or repeats.

    Answers up to ``limit + 1`` batches: the extra one only tells that another page exists.
    """
    limit = max(1, min(limit, LIST_LIMIT_MAX))
    query = select(*_VIEW_COLUMNS).where(Batch.tenant_id == tenant_id)
    if after is not None:
        created_at, last_id = after
        query = query.where(
            or_(
                Batch.created_at < created_at,
                and_(Batch.created_at == created_at, Batch.id < last_id),
            )
        )
    rows = list(
        await session.execute(
            query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)
        )
    )
    counts = await _counts(session, [b.id for b in rows])
    return [_view(b, counts[b.id]) for b in rows]


def _refuse_committing(batch: Batch) -> None:
    if batch.state == BatchState.COMMITTING:
        raise Conflict(
            f"batch {batch.id!r} is still being committed; retry once it is not",
            [ErrorDetail(("id",), BatchState.COMMITTING)],
        )


# --- Edit ----------------------------------------------------------------------------------


async def patch(
    session: AsyncSession,
    tenant_id: str,
    batch_id: str,
    changes: Mapping[str, Any],
    *,
    force: bool = False,
) -> BatchPatched:
    """Apply a partial template to every planned activity, re-rendering its text tags.

    An activity its assignee edited in their own calendar keeps their change unless ``force``.
    Follow-ups added later are left alone: their text was never the template's.
    """
    unknown = [k for k in changes if k not in PATCHABLE_FIELDS]
    if unknown:
        raise ValidationError(
            f"template.{unknown[0]} cannot change after commit",
            [ErrorDetail(("template", k), "cannot change after commit") for k in unknown],
        )
    nulls = [k for k, v in changes.items() if v is None and k != "reminder_minutes"]
    if nulls:
        raise ValidationError(
            f"template.{nulls[0]} must not be null",
            [ErrorDetail(("template", k), "must not be null") for k in nulls],
        )
    batch = await _get_batch(session, tenant_id, batch_id)
    _refuse_committing(batch)
    if batch.state in DELETION_REQUESTED:
        raise Conflict(f"batch {batch_id!r} is being deleted", [ErrorDetail(("id",), batch.state)])
    stored = batch.request
    body: dict[str, Any] = dict(stored.get("body", {}))
    template: dict[str, Any] = {**body.get("template", {}), **changes}
    subject = parse(str(template.get("subject", "")), ("template", "subject"))
    description = parse(str(template.get("description", "")), ("template", "description"))
    targets: list[dict[str, Any]] = list(body.get("targets", []))
    index: list[int] = list(stored.get("target_index", []))
    users: dict[str, dict[str, str]] = dict(stored.get("users", {}))
    group = str(body.get("targetgroup_name", ""))
    fixed_by_user = {
        uid: fixed_values(
            group, PlanUser(id=uid, name=u["name"], email=u["email"], mobile=u["mobile"])
        )
        for uid, u in users.items()
    }
    rerender = "subject" in changes or "description" in changes

    activities = list(
        await session.execute(
            select(
                Activity.id, Activity.seq, Activity.user_id, Activity.user_edited, Activity.version
            )
            .where(
                Activity.tenant_id == tenant_id,
                Activity.batch_id == batch_id,
                Activity.deleted.is_(False),
                Activity.follow_up_of.is_(None),
            )
            .order_by(Activity.seq)
        )
    )
    stamp = utcnow()
    plain = {
        k: changes[k]
        for k in ("location", "status", "priority", "reminder_minutes", "fields")
        if k in changes
    }
    updates: list[dict[str, Any]] = []
    skipped = 0
    for activity_id, seq, user_id, user_edited, version in activities:
        if user_edited and not force:
            skipped += 1
            continue
        row: dict[str, Any] = {
            "id": activity_id,
            "version": version + 1,
            "updated_at": stamp,
            **plain,
        }
        if force:
            row["user_edited"] = False
        if rerender:
            target = _target(targets, index, seq)
            fixed = fixed_by_user.get(user_id, {})
            row["subject"] = subject.render(fixed, target)
            row["description"] = description.render(fixed, target)
        updates.append(row)
    for chunk in _same_keys(updates):
        await session.execute(update(Activity), chunk)
    await request_updates(
        session, tenant_id, [u["id"] for u in updates], Lane.BULK, batch_id=batch_id
    )
    body["template"] = template
    batch.request = {**stored, "body": body}
    batch.updated_at = stamp
    await session.flush()
    view = await get(session, tenant_id, batch_id)
    return BatchPatched(view, updated=len(updates), skipped_user_edited=skipped)


def _same_keys(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Bulk UPDATE by primary key needs the same columns in every row of one executemany."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(row)), []).append(row)
    return list(groups.values())


def _target(targets: Sequence[Mapping[str, Any]], index: Sequence[int], seq: int) -> Target | None:
    if seq >= len(index) or index[seq] >= len(targets):
        return None
    return target_from_json(targets[index[seq]])


# --- Delete --------------------------------------------------------------------------------


async def delete(session: AsyncSession, tenant_id: str, batch_id: str) -> BatchView:
    """Mark the batch and its activities deleted and every live ledger row ``pending_delete``.

    Asking twice changes nothing new; with no ledger rows (a failed commit's batch too) the
    batch is ``deleted`` at once; a batch still committing is a 409.
    """
    batch = await _get_batch(session, tenant_id, batch_id)
    _refuse_committing(batch)
    if batch.state not in DELETION_REQUESTED:
        stamp = utcnow()
        await session.execute(
            update(Activity)
            .where(Activity.tenant_id == tenant_id, Activity.batch_id == batch_id)
            .values(deleted=True, updated_at=stamp)
            .execution_options(synchronize_session=False)
        )
        await request_deletes(session, tenant_id, None, Lane.BULK, batch_id=batch_id)
        batch.state = BatchState.DELETING
        batch.updated_at = stamp
        await session.flush()
    return await get(session, tenant_id, batch_id)
