"""CalDAV change detection: each connected CalDAV calendar is polled, since CalDAV has no push.

The flow, per user whose connection is ``caldav``:

1. **Schedule** (:func:`enqueue_polls`, every tick of :func:`run_polls`): every CalDAV calendar
   has one ``Subscription`` row (provider ``caldav``) whose ``sync_token`` holds the provider's
   opaque poll state and whose ``expires_at`` is when its next poll is due. A new calendar's
   first poll falls at a fixed offset inside the interval, derived from its address, and each
   poll moves the due time on by whole intervals: polls keep their phase and do not bunch, even
   after a restart. A due calendar gets one ``caldav_poll`` operation on its own mailbox (so
   the calendar's rate limit covers polls too) unless one is waiting or running, or the last
   one gave up (``dead``) since the user's connection last changed. Rows of users who left
   CalDAV or moved to another collection are dropped.
2. **Poll** (``caldav_poll``, :func:`~syncsvc.changes.source.sync` with
   :meth:`CalDAVSource.read`): ``CalDAVProvider.changes`` from the stored
   state (``sync-collection`` or ``getctag``; one request when nothing changed, and then nothing
   is written). Changed resources whose etag differs from the ledger's are read back
   (``calendar-multiget``); our events become :class:`~syncsvc.changes.apply.ExternalChange`
   values for :func:`~syncsvc.changes.apply.apply_external_changes`, exactly as Graph and
   Google changes do. A removed resource, or one the user set ``CANCELLED``, cancels its
   activity, unless the activity is cancelled already (our own cancellation). When a change
   may touch days off (an all-day or out-of-office event not ours, a removed resource not
   ours, or a full listing) the user's days off are read again. A full listing (the first
   poll, or after the server forgot the token) cancels the activities of our events that the
   ledger had as synced before it began and that it no longer lists. Our own writes are told
   apart by etag, and an event whose ledger row changed while the poll ran is left to the
   next poll (``apply_external_changes(read_at=...)``, decided under the row's lock).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.changes.apply import DELETED_STATUS, ExternalChange
from syncsvc.changes.schedule import repeat
from syncsvc.changes.source import Round, sync
from syncsvc.errors import Permanent
from syncsvc.providers._ical import ParsedEvent
from syncsvc.providers.base import CalendarProvider
from syncsvc.providers.caldav import (
    CalDAVProvider,
    CalendarObject,
    CollectionChanges,
    touches_days_off,
)
from syncsvc.queue.outbox import Calendar, calendar_of, chunks, enqueue_task
from syncsvc.queue.worker import TaskContext
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, ExternalEvent, Operation, Subscription, User
from syncsvc.store.states import OPEN_STATES, LedgerState, OpKind, OpState
from syncsvc.store.types import utcnow

log = logging.getLogger("syncsvc.changes.caldav")

PROVIDER = "caldav"
#: ``Subscription.external_id`` prefix of a poll row (the rest is a hash of its calendar).
POLL_ID_PREFIX = "poll:"
#: The loop looks for due polls this often at most (less for short intervals).
POLL_TICK_MAX_S = 60.0


def poll_offset_s(tenant_id: str, user_id: str, calendar: str, interval_s: float) -> float:
    """Where in each interval this calendar's poll falls: stable, and even across calendars."""
    digest = hashlib.sha256(f"{tenant_id}\0{user_id}\0{calendar}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * interval_s


def _poll_id(tenant_id: str, user_id: str, calendar: str) -> str:
    digest = hashlib.sha256(f"{tenant_id}\0{user_id}\0{calendar}".encode()).hexdigest()
    return POLL_ID_PREFIX + digest[:48]


def next_due(due: datetime, now: datetime, interval_s: float) -> datetime:
    """The first time after ``now`` that is ``due`` plus whole intervals."""
    passed = max(0.0, (now - due).total_seconds())
    return due + timedelta(seconds=interval_s * (math.floor(passed / interval_s) + 1))


async def enqueue_polls(db: Database, interval_s: float, now: datetime | None = None) -> int:
    """Keeps one poll row per CalDAV calendar and queues a ``caldav_poll`` for each one due
    (see the module docstring). Returns how many operations were stored."""
    now = now or utcnow()
    stored = 0
    async with db.session() as s, s.begin():
        users = (
            (await s.execute(select(User).where(User.calendar_provider == PROVIDER)))
            .scalars()
            .all()
        )
        wanted: dict[tuple[str, str], str] = {}
        changed_at: dict[tuple[str, str], datetime] = {}
        for user in users:
            calendar = calendar_of(user)
            if calendar is not None:
                wanted[(user.tenant_id, user.id)] = calendar.calendar
                changed_at[(user.tenant_id, user.id)] = user.updated_at
        subs = (
            (await s.execute(select(Subscription).where(Subscription.provider == PROVIDER)))
            .scalars()
            .all()
        )
        have: set[tuple[str, str]] = set()
        stale: list[int] = []
        due: list[Subscription] = []
        for sub in subs:
            key = (sub.tenant_id, sub.user_id)
            if wanted.get(key) != sub.calendar or key in have:
                stale.append(sub.id)
                continue
            have.add(key)
            if sub.expires_at <= now:
                due.append(sub)
        for chunk in chunks(stale):
            await s.execute(delete(Subscription).where(Subscription.id.in_(chunk)))
        for (tenant_id, user_id), address in wanted.items():
            if (tenant_id, user_id) in have:
                continue
            offset = poll_offset_s(tenant_id, user_id, address, interval_s)
            s.add(
                Subscription(
                    provider=PROVIDER,
                    tenant_id=tenant_id,
                    user_id=user_id,
                    calendar=address,
                    external_id=_poll_id(tenant_id, user_id, address),
                    client_state="",
                    sync_token=None,
                    expires_at=now + timedelta(seconds=offset),
                )
            )
        if not due:
            return 0
        waiting = set(
            (
                await s.execute(
                    select(Operation.tenant_id, Operation.mailbox).where(
                        Operation.kind == OpKind.CALDAV_POLL, Operation.state.in_(OPEN_STATES)
                    )
                )
            ).all()
        )
        dead = await _dead_polls(s)
        for sub in due:
            sub.expires_at = next_due(sub.expires_at, now, interval_s)
            mailbox = Calendar(PROVIDER, sub.calendar).mailbox
            if (sub.tenant_id, mailbox) in waiting:
                continue
            died = dead.get((sub.tenant_id, mailbox))
            if died is not None and changed_at[(sub.tenant_id, sub.user_id)] <= died:
                continue  # gave up (credentials refused, say) and the connection is as it was
            enqueue_task(s, sub.tenant_id, OpKind.CALDAV_POLL, mailbox, {"subscription_id": sub.id})
            stored += 1
    return stored


async def _dead_polls(s: AsyncSession) -> dict[tuple[str, str], datetime]:
    """When each calendar's poll last gave up: it is not queued again, one dead operation per
    interval, until its user's connection is changed (or the operation retried from ops)."""
    rows = await s.execute(
        select(Operation.tenant_id, Operation.mailbox, func.max(Operation.updated_at))
        .where(Operation.kind == OpKind.CALDAV_POLL, Operation.state == OpState.DEAD)
        .group_by(Operation.tenant_id, Operation.mailbox)
    )
    return {(tenant_id, mailbox): at for tenant_id, mailbox, at in rows}


async def run_polls(db: Database, stop: asyncio.Event, interval_s: float) -> None:
    """Queues due polls at once and then every tick until ``stop``."""
    tick_s = min(POLL_TICK_MAX_S, interval_s / 5)
    await repeat(stop, tick_s, "caldav_poll", lambda: enqueue_polls(db, interval_s))


# --- the source ---------------------------------------------------------------------------


class CalDAVSource:
    """CalDAV's change detection: polls (see the module doc); nothing to subscribe to."""

    provider = PROVIDER

    async def read(
        self, ctx: TaskContext, sub: Subscription, calendar: CalendarProvider, token: str | None
    ) -> Round:
        if not isinstance(calendar, CalDAVProvider):
            raise Permanent(f"{sub.calendar} is not a CalDAV calendar")
        read_at = utcnow()
        # Before a full listing: our events synced by then and missing from it were deleted.
        synced = await _synced_names(ctx.db, sub.calendar) if token is None else []
        found = await calendar.changes(token)
        if not found.changed and not found.removed and found.state == token:
            return Round(token=token, full=False)
        removed = [n for n in synced if n not in found.changed] if found.full else found.removed
        ledger = await _ledger(ctx.db, sub.calendar, [*found.changed, *removed])
        # A full listing only matters for our events the user changed; an incremental one also
        # for the user's own events, which may be days off.
        wanted = [
            name
            for name, etag in found.changed.items()
            if (name in ledger and ledger[name][0] != etag)
            or (name not in ledger and not found.full)
        ]
        fetched = await calendar.fetch(wanted) if wanted else []
        changes = [
            *(c for obj in fetched if (c := _change(sub.calendar, obj)) is not None),
            *(
                ExternalChange(PROVIDER, sub.calendar, name, deleted=True)
                for name in removed
                if name in ledger
            ),
        ]
        log.info(
            "event=caldav.poll.read calendar=%s method=%s changed=%d removed=%d",
            sub.calendar,
            found.method,
            len(found.changed),
            len(removed),
        )
        return Round(
            token=found.state,
            full=found.full,
            # A removal of an activity cancelled already is our own cancellation.
            changes=[
                c for c in changes if not (c.deleted and ledger[c.event_id][1] == DELETED_STATUS)
            ],
            days_off=_days_off_may_change(found, removed, fetched, ledger),
            listed=len(found.changed) + len(removed),
            read_at=read_at,
        )


SOURCE = CalDAVSource()


async def caldav_poll(ctx: TaskContext, op: Operation) -> None:
    """Task handler: applies what changed in one CalDAV calendar since the stored state."""
    await sync(ctx, SOURCE, op)


async def _synced_names(db: Database, calendar: str) -> list[str]:
    """Resource names of our events in the calendar that the ledger says exist now."""
    async with db.session() as s:
        rows = await s.execute(
            select(ExternalEvent.event_id).where(
                ExternalEvent.provider == PROVIDER,
                ExternalEvent.calendar == calendar,
                ExternalEvent.state == LedgerState.SYNCED,
                ExternalEvent.event_id.is_not(None),
            )
        )
        return [str(event_id) for (event_id,) in rows]


async def _ledger(
    db: Database, calendar: str, names: Sequence[str]
) -> dict[str, tuple[str | None, str]]:
    """Our events among ``names``: resource name → (ledger etag, activity status)."""
    found: dict[str, tuple[str | None, str]] = {}
    async with db.session() as s:
        for chunk in chunks(sorted(set(names))):
            rows = await s.execute(
                select(ExternalEvent.event_id, ExternalEvent.etag, Activity.status)
                .join(Activity, Activity.id == ExternalEvent.activity_id)
                .where(
                    ExternalEvent.provider == PROVIDER,
                    ExternalEvent.calendar == calendar,
                    ExternalEvent.event_id.in_(chunk),
                )
            )
            for event_id, etag, status in rows:
                found[str(event_id)] = (etag, str(status))
    return found


def _instant(moment: datetime | date | None) -> datetime | None:
    """An aware instant; floating times are read as UTC, all-day dates (tasks) as none."""
    if not isinstance(moment, datetime):
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _ours(events: Iterable[ParsedEvent]) -> ParsedEvent | None:
    """The master VEVENT of one of our resources (ours carry the activity property)."""
    return next((e for e in events if e.activity_id is not None and e.recurrence_id is None), None)


def _change(calendar: str, obj: CalendarObject) -> ExternalChange | None:
    event = _ours(obj.events)
    if event is None:
        return None
    cancelled = event.status == "CANCELLED"
    return ExternalChange(
        provider=PROVIDER,
        calendar=calendar,
        event_id=obj.name,
        deleted=cancelled,
        start=None if cancelled else _instant(event.start),
        end=None if cancelled else _instant(event.end),
        subject=None if cancelled else event.summary,
        etag=obj.etag,
    )


def _days_off_may_change(
    found: CollectionChanges,
    removed: Sequence[str],
    fetched: Sequence[CalendarObject],
    ledger: dict[str, tuple[str | None, str]],
) -> bool:
    if found.full:
        return True
    if any(name not in ledger for name in removed):
        return True
    return any(touches_days_off(event) for obj in fetched for event in obj.events)
