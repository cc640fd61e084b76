"""Batches: commit a plan, read its progress, edit its template, delete it.

Every write adds the batch's rows and their outbox operations to the caller's transaction
(``async with session.begin()``), so they commit together or not at all, before the answer;
only the external calendars follow later. A batch's ``state`` is derived from its ledger
rows when read, so it can never disagree with them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.errors import Conflict, ErrorDetail, NotFound, ValidationError
from syncsvc.planner.model import PlanUser, Target, UserSummary
from syncsvc.planner.tags import fixed_values, parse
from syncsvc.queue.outbox import (
    IN_CHUNK,
    NewEvent,
    add_events,
    calendar_of,
    chunks,
    request_deletes,
    request_updates,
)
from syncsvc.service.plans import (
    CalendarBusy,
    PlanContext,
    PlanSpec,
    prepare,
    target_from_json,
)
from syncsvc.store.models import Activity, Batch, ExternalEvent
from syncsvc.store.types import JsonText, utcnow

#: ``Batch.state`` values that mean the CRM asked for the batch to go.
DELETION_REQUESTED = ("deleting", "deleted")
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
ACTIVITIES_TABLE = cast(Table, Activity.__table__)


@dataclass(frozen=True, slots=True)
class SyncCounts:
    pending: int = 0
    synced: int = 0
    failed: int = 0
    deleting: int = 0
    deleted: int = 0


@dataclass(frozen=True, slots=True)
class BatchView:
    id: str
    state: str
    total: int
    created_at: datetime
    created_by: str
    targetgroup_name: str
    sync: SyncCounts


@dataclass(frozen=True, slots=True)
class BatchCreated:
    id: str
    created_by: str
    state: str
    total: int
    users: tuple[UserSummary, ...]


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
        pending=by_state.get("pending_create", 0) + by_state.get("pending_update", 0),
        synced=by_state.get("synced", 0),
        failed=by_state.get("failed", 0),
        deleting=by_state.get("pending_delete", 0),
        deleted=by_state.get("deleted", 0),
    )


def derive_state(requested: str, sync: SyncCounts) -> str:
    """A deleting batch is ``deleted`` once no row is left; otherwise failures win, then
    outstanding work; a batch with no rows (users without a calendar) is ``synced`` at once."""
    if requested in DELETION_REQUESTED:
        left = sync.pending + sync.synced + sync.failed + sync.deleting
        return "deleted" if left == 0 else "deleting"
    if sync.failed:
        return "failed"
    if sync.pending or sync.deleting:
        return "syncing"
    return "synced"


# --- Commit --------------------------------------------------------------------------------


async def commit(
    session: AsyncSession,
    tenant_id: str,
    spec: PlanSpec,
    now: datetime,
    busy: CalendarBusy | None = None,
) -> BatchCreated:
    """Plan and store a batch: batch, activities, ledger rows and operations in one commit.

    A plan that fails validation raises before anything is added; any later error rolls the
    caller's transaction back, so an error leaves no rows behind.
    """
    ctx = await prepare(session, tenant_id, spec, now, busy)
    batch_id = uuid.uuid4().hex
    created_by = created_by_of(batch_id)
    stamp = utcnow()
    activity_rows: list[dict[str, Any]] = []
    events: list[NewEvent] = []
    template = spec.template
    calendars = {uid: calendar_of(user) for uid, user in ctx.users.items()}
    phones = _phones(spec.targets) if template.kind == "call" else {}
    for seq, planned in enumerate(ctx.plan.activities):
        if seq and seq % IN_CHUNK == 0:
            await asyncio.sleep(0)  # a 100,000-target batch: let other requests in meanwhile
        activity_id = uuid.uuid4().hex
        activity_rows.append(
            {
                "id": activity_id,
                "tenant_id": tenant_id,
                "batch_id": batch_id,
                "seq": seq,
                "target_id": planned.target_id,
                "target_ids": list(planned.target_ids),
                "user_id": planned.user_id,
                "kind": planned.kind,
                "start": planned.start,
                "end": planned.end,
                "due": planned.due,
                "subject": planned.subject,
                "description": planned.description,
                "location": planned.location,
                "status": template.status,
                "priority": template.priority,
                "reminder_minutes": template.reminder_minutes,
                "attendees": [
                    {"contact_id": a.contact_id, "name": a.name, "email": a.email}
                    for a in planned.attendees
                ],
                "fields": dict(template.fields),
                "phone": phones.get(planned.target_id, ""),
                "follow_up_of": None,
                "user_edited": False,
                "version": 1,
                "deleted": False,
                "created_at": stamp,
                "updated_at": stamp,
            }
        )
        calendar = calendars[planned.user_id]
        if calendar is not None:
            events.append(NewEvent(activity_id, planned.user_id, batch_id, calendar))
    stored = await asyncio.to_thread(lambda: JsonText(json.dumps(_stored_request(spec, ctx, now))))
    session.add(
        Batch(
            id=batch_id,
            tenant_id=tenant_id,
            created_by=created_by,
            targetgroup_name=spec.targetgroup_name,
            request=cast(dict[str, Any], stored),  # serialised ahead (see JsonText)
            state="syncing" if events else "synced",
            total=len(activity_rows),
            created_at=stamp,
            updated_at=stamp,
        )
    )
    await session.flush()
    for chunk in chunks(activity_rows):  # one transaction, but the loop is free between chunks
        await session.execute(insert(ACTIVITIES_TABLE), chunk)
    await add_events(session, tenant_id, events, "bulk")
    return BatchCreated(
        id=batch_id,
        created_by=created_by,
        state="syncing" if events else "synced",
        total=len(activity_rows),
        users=ctx.plan.users,
    )


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


def _stored_request(spec: PlanSpec, ctx: PlanContext, now: datetime) -> dict[str, Any]:
    """What a later template edit needs to re-render every activity's text tags alike:
    the body (targets included), the users as they were, and which target each activity
    (by ``seq``) took its tags from."""
    return {
        "body": dict(spec.body),
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
        raise NotFound(f"batch {batch_id!r} not found", [ErrorDetail(("id",), "no such batch")])
    return batch


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


def _view(batch: Batch, sync: SyncCounts) -> BatchView:
    return BatchView(
        id=batch.id,
        state=derive_state(batch.state, sync),
        total=batch.total,
        created_at=batch.created_at,
        created_by=batch.created_by,
        targetgroup_name=batch.targetgroup_name,
        sync=sync,
    )


async def get(session: AsyncSession, tenant_id: str, batch_id: str) -> BatchView:
    batch = await _get_batch(session, tenant_id, batch_id)
    return _view(batch, (await _counts(session, [batch.id]))[batch.id])


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
    query = select(Batch).where(Batch.tenant_id == tenant_id)
    if after is not None:
        created_at, last_id = after
        query = query.where(
            or_(
                Batch.created_at < created_at,
                and_(Batch.created_at == created_at, Batch.id < last_id),
            )
        )
    rows = list(
        await session.scalars(
            query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)
        )
    )
    counts = await _counts(session, [b.id for b in rows])
    return [_view(b, counts[b.id]) for b in rows]


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
    await request_updates(session, tenant_id, [u["id"] for u in updates], "bulk", batch_id=batch_id)
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

    Asking twice changes nothing new; with no ledger rows the batch is ``deleted`` at once.
    """
    batch = await _get_batch(session, tenant_id, batch_id)
    if batch.state not in DELETION_REQUESTED:
        stamp = utcnow()
        await session.execute(
            update(Activity)
            .where(Activity.tenant_id == tenant_id, Activity.batch_id == batch_id)
            .values(deleted=True, updated_at=stamp)
            .execution_options(synchronize_session=False)
        )
        await request_deletes(session, tenant_id, None, "bulk", batch_id=batch_id)
        batch.state = "deleting"
        batch.updated_at = stamp
        await session.flush()
    return await get(session, tenant_id, batch_id)
