"""What assignees change in their own calendars: applied to activities, reported to the CRM.

Every provider's incremental sync (Graph delta, Google sync tokens, CalDAV sync-collection)
turns what it saw into :class:`ExternalChange` values; :func:`apply_external_changes` decides
which of them are the user's own edits of *our* events and records them. The assignee's change
wins (XS Office rule): the activity takes their start, end and subject and is marked
``user_edited``, so later batch edits leave it alone unless forced. Nothing is pushed back to
the calendar: it already shows the user's version.

A deleted event cancels its activity: ``status='cancelled'`` and ``user_edited=True``; the
activity itself stays (the CRM owns its records and learns of it through the callback), and
its ledger row becomes ``deleted``, so no later edit recreates the event.

Each applied change writes a ``callback`` operation in the same transaction::

    {"type": "activity.changed", "activity_id", "batch_id",
     "changes": {"start": {"from": "...", "to": "..."}, "end": {...}, "subject": {...}}}
    {"type": "activity.deleted", "activity_id", "batch_id",
     "changes": {"status": {"from": "planned", "to": "cancelled"}}}

Instants in ``changes`` are ISO 8601 in the assignee's zone, like the activity API.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.providers.base import CalendarProvider
from syncsvc.queue.outbox import GONE_STATES, CallbackTask, chunks, enqueue_task
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, ExternalEvent, Operation, User
from syncsvc.store.states import LedgerState, OpKind
from syncsvc.store.types import utcnow

CHANGED = "activity.changed"
DELETED = "activity.deleted"
#: The status a user's deletion of the event gives its activity.
DELETED_STATUS = "cancelled"
#: Ledger states whose event changes are not the user's to report (see apply_external_changes).
IGNORED_STATES = (*GONE_STATES, LedgerState.PENDING_CREATE, LedgerState.PENDING_UPDATE)
#: Days off are read this far ahead of the user's today.
DAYS_OFF_AHEAD_DAYS = 365


@dataclass(frozen=True, slots=True)
class ExternalChange:
    """One event as a provider's incremental sync saw it after a change."""

    provider: str  # "graph" | "google" | "caldav"
    calendar: str  # as in ExternalEvent.calendar (mailbox / calendar id / collection URL)
    event_id: str  # the provider's event id (ExternalEvent.event_id)
    deleted: bool = False
    start: datetime | None = None  # aware
    end: datetime | None = None
    subject: str | None = None
    #: changeKey / etag after the change; equal to the ledger's → our own write, ignored.
    etag: str | None = None


def callback_mailbox(tenant_id: str) -> str:
    """Callbacks are rate-limited and kept fair per tenant's CRM, like a calendar mailbox."""
    return f"crm:{tenant_id}"


def enqueue_callback(
    session: AsyncSession, tenant_id: str, payload: CallbackTask, batch_id: str | None = None
) -> Operation:
    """A signed callback to the tenant's CRM, queued in the caller's transaction."""
    return enqueue_task(
        session, tenant_id, OpKind.CALLBACK, callback_mailbox(tenant_id), payload, batch_id=batch_id
    )


async def apply_external_changes(
    db: Database, changes: Sequence[ExternalChange], *, read_at: datetime | None = None
) -> int:
    """Applies the users' own changes of our events; returns how many activities changed.

    ``read_at`` is when the changes were read: an event whose ledger row was written since
    then is skipped, decided under the row's lock, since the read may predate our newer write.

    Unknown events (the user's own appointments), events we are deleting or deleted, and our
    own writes (same etag as the ledger, or the same start/end/subject as the activity) are
    ignored. So is an event whose own update is still queued or in flight (``pending_update``):
    what is seen may be our write whose etag is not recorded yet, and our write is about to
    replace whatever the calendar shows. The latest change per event counts when one event
    appears more than once.
    """
    latest: dict[tuple[str, str, str], ExternalChange] = {}
    for change in changes:
        latest[(change.provider, change.calendar, change.event_id)] = change
    if not latest:
        return 0
    applied = 0
    async with db.session() as session, session.begin():
        ledgers = await _ledgers(session, list(latest), lock=db.dialect == "postgresql")
        for key, change in latest.items():
            ledger = ledgers.get(key)
            if ledger is None or ledger.state in IGNORED_STATES:
                continue
            if read_at is not None and ledger.updated_at >= read_at:
                continue
            activity = await session.get(Activity, ledger.activity_id)
            if activity is None or activity.deleted:
                continue
            if change.etag is not None and change.etag == ledger.etag:
                continue
            user = await session.get(User, (activity.tenant_id, activity.user_id))
            zone = ZoneInfo(user.timezone if user is not None else "UTC")
            diff = _deleted(activity, ledger) if change.deleted else _edited(activity, change)
            if not diff:
                continue
            if change.etag is not None:
                ledger.etag = change.etag
            activity.user_edited = True
            activity.version += 1
            activity.updated_at = utcnow()
            _callback(session, activity, change.deleted, diff, zone)
            applied += 1
    return applied


async def _ledgers(
    session: AsyncSession, keys: Sequence[tuple[str, str, str]], *, lock: bool
) -> dict[tuple[str, str, str], ExternalEvent]:
    """Ledger rows by (provider, calendar, event id), locked on PostgreSQL so a concurrent
    sync of the same calendar waits instead of double-reporting."""
    found: dict[tuple[str, str, str], ExternalEvent] = {}
    wanted = set(keys)
    for provider in sorted({k[0] for k in keys}):
        event_ids = sorted({k[2] for k in keys if k[0] == provider})
        for chunk in chunks(event_ids):
            query = select(ExternalEvent).where(
                ExternalEvent.provider == provider, ExternalEvent.event_id.in_(chunk)
            )
            if lock:
                query = query.with_for_update()
            for row in (await session.execute(query)).scalars():
                key = (row.provider, row.calendar, row.event_id or "")
                if key in wanted:
                    found[key] = row
    return found


def _edited(activity: Activity, change: ExternalChange) -> dict[str, tuple[Any, Any]]:
    """The fields the user changed, applied to the activity; empty for our own write."""
    diff: dict[str, tuple[Any, Any]] = {}
    # A task has no times: its event is an all-day item on the due date, not a move.
    timed = activity.start is not None
    if timed and change.start is not None and change.start != activity.start:
        diff["start"] = (activity.start, change.start)
        activity.start = change.start
    if timed and change.end is not None and change.end != activity.end:
        diff["end"] = (activity.end, change.end)
        activity.end = change.end
    if change.subject is not None and change.subject != activity.subject:
        diff["subject"] = (activity.subject, change.subject)
        activity.subject = change.subject
    return diff


def _deleted(activity: Activity, ledger: ExternalEvent) -> dict[str, tuple[Any, Any]]:
    """The event is gone for good: the ledger says so, and the activity is cancelled."""
    ledger.state = LedgerState.DELETED
    ledger.updated_at = utcnow()
    previous = activity.status
    activity.status = DELETED_STATUS
    return {"status": (previous, DELETED_STATUS)}


def _json(value: Any, zone: ZoneInfo) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(zone).isoformat(timespec="seconds")
    return value


def _callback(
    session: AsyncSession,
    activity: Activity,
    deleted: bool,
    diff: dict[str, tuple[Any, Any]],
    zone: ZoneInfo,
) -> None:
    payload: CallbackTask = {
        "type": DELETED if deleted else CHANGED,
        "activity_id": activity.id,
        "batch_id": activity.batch_id,
        "changes": {
            name: {"from": _json(old, zone), "to": _json(new, zone)}
            for name, (old, new) in diff.items()
        },
    }
    enqueue_callback(session, activity.tenant_id, payload, activity.batch_id)


async def refresh_days_off(db: Database, user: User, provider: CalendarProvider) -> None:
    """Reads the user's out-of-office days (today in their zone, a year ahead) into
    ``User.provider_days_off``, after a sync saw their out-of-office events change."""
    today = datetime.now(ZoneInfo(user.timezone)).date()
    found = await provider.time_off(today, today + timedelta(days=DAYS_OFF_AHEAD_DAYS))
    days = sorted(d.isoformat() for d in found.days)
    async with db.session() as s, s.begin():
        await s.execute(
            update(User)
            .where(User.tenant_id == user.tenant_id, User.id == user.id)
            .values(provider_days_off=days)
        )
