"""The outbox: ledger rows and operations written in the caller's transaction.

Every change to an activity that an external calendar must follow writes here, in the same
session as the change, so the change and its operation commit together or not at all.
An operation means "bring this ledger row to what its activity wants now" (see
``queue/reconcile.py``), so an update for a row whose create is still pending, or a delete for
one whose create is in flight, is harmless: the worker decides on fresh data.

``interactive`` is the lane of a single user's change, ``bulk`` that of batch-wide work; per
mailbox the worker serves the first before the second.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NotRequired, TypedDict, TypeVar, cast, overload

from sqlalchemy import Table, func, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.store.models import Activity, ExternalEvent, Operation, User
from syncsvc.store.states import Lane, LedgerState, OpKind, OpState
from syncsvc.store.types import UTCDateTime, utcnow
from syncsvc.tracing import current_traceparent

T = TypeVar("T")

#: Where each provider keeps the calendar's address in ``User.calendar_config``.
CALENDAR_KEY_BY_PROVIDER = {"graph": "mailbox", "google": "calendar_id", "caldav": "url"}
#: Ledger states that may still hold (or soon hold) an event worth updating.
LIVE_STATES = (LedgerState.PENDING_CREATE, LedgerState.SYNCED, LedgerState.PENDING_UPDATE)
#: Ledger states with nothing left to remove.
GONE_STATES = (LedgerState.DELETED, LedgerState.PENDING_DELETE)
#: Ids per ``IN (...)`` list: well below SQLite's and asyncpg's bound-parameter limits.
IN_CHUNK = 1000
#: Core tables for executemany inserts (the ORM bulk path costs a third more per row).
ACTIVITIES_TABLE = cast(Table, Activity.__table__)
LEDGER_TABLE = cast(Table, ExternalEvent.__table__)
OPERATIONS_TABLE = cast(Table, Operation.__table__)


@dataclass(frozen=True, slots=True)
class Calendar:
    """One external calendar: the unit that rate limits and fairness are kept per."""

    provider: str
    calendar: str

    @property
    def mailbox(self) -> str:
        return f"{self.provider}:{self.calendar}"


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An activity that needs an event created in its user's calendar."""

    activity_id: str
    user_id: str
    batch_id: str | None
    calendar: Calendar


def calendar_of(user: User) -> Calendar | None:
    """The user's calendar, or ``None`` for ``none`` (feed only) and incomplete connections."""
    key = CALENDAR_KEY_BY_PROVIDER.get(user.calendar_provider)
    if key is None:
        return None
    address = user.calendar_config.get(key)
    if not address:
        return None
    return Calendar(user.calendar_provider, str(address))


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    """Slices for ``IN (...)`` lists that stay under the drivers' parameter limits."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SubscriptionTask(TypedDict):
    """A provider's sync, lifecycle step or poll of one ``Subscription`` row."""

    subscription_id: int
    #: Graph and Google: read the whole calendar again, not from the delta/sync token.
    full: NotRequired[bool]
    #: Graph lifecycle: what the notification asked for.
    action: NotRequired[Literal["renew", "recreate"]]


class CallbackTask(TypedDict):
    """A signed callback's body as the CRM receives it (``docs/api-contract.md``)."""

    type: str
    activity_id: NotRequired[str]
    batch_id: NotRequired[str | None]
    changes: NotRequired[dict[str, dict[str, Any]]]
    provider: NotRequired[str]
    user_id: NotRequired[str]
    account: NotRequired[str]
    error: NotRequired[str]


class TenantTask(TypedDict):
    """A tenant-wide check (Graph subscriptions, Google channels): nothing beyond its kind."""


SubscriptionKind = Literal[
    OpKind.GRAPH_SYNC, OpKind.GRAPH_LIFECYCLE, OpKind.GOOGLE_SYNC, OpKind.CALDAV_POLL
]
TenantKind = Literal[OpKind.GRAPH_SUBS, OpKind.GOOGLE_SUBS]


@overload
def enqueue_task(
    session: AsyncSession,
    tenant_id: str,
    kind: Literal[OpKind.CALLBACK],
    mailbox: str,
    payload: CallbackTask,
    *,
    batch_id: str | None = None,
) -> Operation: ...
@overload
def enqueue_task(
    session: AsyncSession,
    tenant_id: str,
    kind: SubscriptionKind,
    mailbox: str,
    payload: SubscriptionTask,
    *,
    batch_id: None = None,
) -> Operation: ...
@overload
def enqueue_task(
    session: AsyncSession,
    tenant_id: str,
    kind: TenantKind,
    mailbox: str,
    payload: TenantTask,
    *,
    batch_id: None = None,
) -> Operation: ...
def enqueue_task(
    session: AsyncSession,
    tenant_id: str,
    kind: OpKind,
    mailbox: str,
    payload: CallbackTask | SubscriptionTask | TenantTask,
    *,
    batch_id: str | None = None,
) -> Operation:
    """Adds one task (work on no ledger row: a sync, a poll, a callback, a check) to the
    session, in the interactive lane, due now, carrying the running trace's ``traceparent``.
    The typed payload is what the kind's handler in ``syncsvc/runtime.py`` reads."""
    traced = {"traceparent": tp} if (tp := current_traceparent()) else {}
    now = utcnow()
    op = Operation(
        tenant_id=tenant_id,
        kind=kind,
        ledger_id=None,
        batch_id=batch_id,
        mailbox=mailbox,
        lane=Lane.INTERACTIVE,
        state=OpState.PENDING,
        attempts=0,
        not_before=now,
        payload={**payload, **traced},
        created_at=now,
        updated_at=now,
    )
    session.add(op)
    return op


async def add_events(
    session: AsyncSession, tenant_id: str, events: Sequence[NewEvent], lane: Lane
) -> int:
    """Ledger rows in ``pending_create`` and one ``create`` operation each, in bulk."""
    if not events:
        return 0
    now = utcnow()
    ledger_rows = [
        {
            "tenant_id": tenant_id,
            "activity_id": e.activity_id,
            "batch_id": e.batch_id,
            "user_id": e.user_id,
            "provider": e.calendar.provider,
            "calendar": e.calendar.calendar,
            "state": LedgerState.PENDING_CREATE,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
        }
        for e in events
    ]
    # Plain executemany plus one read-back: RETURNING per row is several times slower here.
    # In chunks: SQLAlchemy prepares each executemany on the event loop.
    for chunk in chunks(ledger_rows):
        await session.execute(insert(LEDGER_TABLE), chunk)
    ids = await _ledger_ids(session, tenant_id, events)
    await _insert_operations(
        session,
        tenant_id,
        OpKind.CREATE,
        [
            (ids[(e.activity_id, e.calendar)], e.batch_id, e.calendar.mailbox, e.activity_id)
            for e in events
        ],
        lane,
        now,
    )
    return len(events)


async def _ledger_ids(
    session: AsyncSession, tenant_id: str, events: Sequence[NewEvent]
) -> dict[tuple[str, Calendar], int]:
    """The ids just given to the events' ledger rows, by (activity, calendar): read by batch
    when they share one (one query for any size), else by activity id."""
    columns = (
        ExternalEvent.id,
        ExternalEvent.activity_id,
        ExternalEvent.provider,
        ExternalEvent.calendar,
    )
    base = select(*columns).where(ExternalEvent.tenant_id == tenant_id)
    batch_ids = {e.batch_id for e in events}
    queries = []
    if len(batch_ids) == 1 and None not in batch_ids:
        queries.append(base.where(ExternalEvent.batch_id == events[0].batch_id))
    else:
        queries.extend(
            base.where(ExternalEvent.activity_id.in_(chunk))
            for chunk in chunks(sorted({e.activity_id for e in events}))
        )
    ids: dict[tuple[str, Calendar], int] = {}
    for query in queries:
        # Streamed in slices: 100,000 rows turned into tuples at once would hold the loop.
        result = await session.stream(query)
        async for rows in result.partitions(IN_CHUNK):
            for ledger_id, activity_id, provider, calendar in rows:
                ids[(activity_id, Calendar(provider, calendar))] = ledger_id
    return ids


async def request_updates(
    session: AsyncSession,
    tenant_id: str,
    activity_ids: Collection[str] | None,
    lane: Lane,
    *,
    batch_id: str | None = None,
) -> int:
    """Synced rows become ``pending_update``; every live row gets an ``update`` operation.

    ``activity_ids=None`` with a ``batch_id`` means every row of the batch; with both, the
    rows are read by batch (one query, any size) and filtered here.
    """
    rows = await _ledger_rows(
        session, tenant_id, activity_ids, batch_id, (*LIVE_STATES, LedgerState.FAILED)
    )
    if not rows:
        return 0
    now = utcnow()
    synced = [r.id for r in rows if r.state == LedgerState.SYNCED]
    for chunk in chunks(synced):
        await session.execute(
            update(ExternalEvent)
            .where(ExternalEvent.id.in_(chunk), ExternalEvent.state == LedgerState.SYNCED)
            .values(state=LedgerState.PENDING_UPDATE, updated_at=now)
        )
    await _revive([r for r in rows if r.state == LedgerState.FAILED], session, now)
    await _insert_operations(
        session,
        tenant_id,
        OpKind.UPDATE,
        [(r.id, r.batch_id, Calendar(r.provider, r.calendar).mailbox, r.activity_id) for r in rows],
        lane,
        now,
    )
    return len(rows)


async def request_deletes(
    session: AsyncSession,
    tenant_id: str,
    activity_ids: Collection[str] | None,
    lane: Lane,
    *,
    batch_id: str | None = None,
) -> int:
    """Every row not yet removed becomes ``pending_delete`` with a ``delete`` operation.

    A row still in ``pending_create`` without an event id gets one too: its create may be in
    flight, and the worker removes whatever the create left behind.
    """
    rows = await _ledger_rows(session, tenant_id, activity_ids, batch_id, None)
    rows = [r for r in rows if r.state not in GONE_STATES]
    if not rows:
        return 0
    now = utcnow()
    for chunk in chunks([r.id for r in rows]):
        await session.execute(
            update(ExternalEvent)
            .where(ExternalEvent.id.in_(chunk))
            .values(state=LedgerState.PENDING_DELETE, updated_at=now)
        )
    await _supersede_dead(session, [r.id for r in rows if r.state == LedgerState.FAILED], now)
    await _insert_operations(
        session,
        tenant_id,
        OpKind.DELETE,
        [(r.id, r.batch_id, Calendar(r.provider, r.calendar).mailbox, r.activity_id) for r in rows],
        lane,
        now,
    )
    return len(rows)


async def _revive(rows: Sequence[_LedgerRow], session: AsyncSession, now: datetime) -> None:
    """A row whose work died (``failed``) takes the change in hand with a fresh attempt
    budget, instead of swallowing it and every later one until an operator retries: back to
    ``pending_update`` (``pending_create`` if its event was never made)."""
    for state, with_event in (
        (LedgerState.PENDING_UPDATE, True),
        (LedgerState.PENDING_CREATE, False),
    ):
        ids = [r.id for r in rows if (r.event_id is not None) == with_event]
        for chunk in chunks(ids):
            await session.execute(
                update(ExternalEvent)
                .where(ExternalEvent.id.in_(chunk), ExternalEvent.state == LedgerState.FAILED)
                .values(state=state, attempts=0, updated_at=now)
            )
    await _supersede_dead(session, [r.id for r in rows], now)


async def _supersede_dead(session: AsyncSession, ledger_ids: Sequence[int], now: datetime) -> None:
    """The dead operations of rows that a new operation now acts on: that one does their
    work on fresh data, so they are no longer failures to retry."""
    for chunk in chunks(ledger_ids):
        await session.execute(
            update(Operation)
            .where(Operation.ledger_id.in_(chunk), Operation.state == OpState.DEAD)
            .values(state=OpState.DONE, last_error="superseded by a later change", updated_at=now)
        )


@dataclass(frozen=True, slots=True)
class _LedgerRow:
    id: int
    activity_id: str
    batch_id: str | None
    provider: str
    calendar: str
    state: str
    event_id: str | None


async def _ledger_rows(
    session: AsyncSession,
    tenant_id: str,
    activity_ids: Collection[str] | None,
    batch_id: str | None,
    states: Sequence[str] | None,
) -> list[_LedgerRow]:
    columns = (
        ExternalEvent.id,
        ExternalEvent.activity_id,
        ExternalEvent.batch_id,
        ExternalEvent.provider,
        ExternalEvent.calendar,
        ExternalEvent.state,
        ExternalEvent.event_id,
    )
    base = select(*columns).where(ExternalEvent.tenant_id == tenant_id)
    if states is not None:
        base = base.where(ExternalEvent.state.in_(states))
    found: list[_LedgerRow] = []
    if batch_id is not None:
        wanted = None if activity_ids is None else set(activity_ids)
        result = await session.execute(
            base.where(ExternalEvent.batch_id == batch_id).order_by(ExternalEvent.id)
        )
        found = [_LedgerRow(*row) for row in result if wanted is None or row.activity_id in wanted]
    elif activity_ids is not None:
        for chunk in chunks(sorted(activity_ids)):
            result = await session.execute(
                base.where(ExternalEvent.activity_id.in_(chunk)).order_by(ExternalEvent.id)
            )
            found.extend(_LedgerRow(*row) for row in result)
    return found


async def _insert_operations(
    session: AsyncSession,
    tenant_id: str,
    kind: OpKind,
    targets: Iterable[tuple[int, str | None, str, str]],
    lane: Lane,
    now: datetime,
) -> None:
    """One operation per (ledger id, batch id, mailbox, activity id), in one executemany;
    each carries the running trace's ``traceparent`` (see ``syncsvc/tracing.py``)."""
    traced = {"traceparent": tp} if (tp := current_traceparent()) else {}
    rows: list[dict[str, Any]] = [
        {
            "tenant_id": tenant_id,
            "kind": kind,
            "ledger_id": ledger_id,
            "batch_id": batch_id,
            "mailbox": mailbox,
            "lane": lane,
            "state": OpState.PENDING,
            "attempts": 0,
            "not_before": now,
            "payload": {"activity_id": activity_id, **traced},
            "created_at": now,
            "updated_at": now,
        }
        for ledger_id, batch_id, mailbox, activity_id in targets
    ]
    for chunk in chunks(rows):
        await session.execute(insert(OPERATIONS_TABLE), chunk)


async def add_batch_creates(
    session: AsyncSession, tenant_id: str, batch_id: str, lane: Lane, now: datetime
) -> None:
    """A ``create`` operation for each ledger row of the batch, in one ``INSERT … SELECT``: the
    database pairs each row's id with its operation, so no id is read back."""
    ledger = LEDGER_TABLE.c
    dialect = (await session.connection()).dialect.name
    build = func.json_object if dialect == "sqlite" else func.json_build_object
    tp = current_traceparent()
    traced: tuple[Any, ...] = ("traceparent", literal(tp)) if tp else ()
    stamp = literal(now, UTCDateTime())
    source = (
        select(
            ledger.tenant_id,
            literal(OpKind.CREATE.value),
            ledger.id,
            ledger.batch_id,
            ledger.provider.concat(":").concat(ledger.calendar),
            literal(str(lane)),
            literal(OpState.PENDING.value),
            literal(0),
            stamp,
            build("activity_id", ledger.activity_id, *traced),
            stamp,
            stamp,
        )
        .where(ledger.tenant_id == tenant_id, ledger.batch_id == batch_id)
        .order_by(ledger.id)
    )
    columns = (
        "tenant_id",
        "kind",
        "ledger_id",
        "batch_id",
        "mailbox",
        "lane",
        "state",
        "attempts",
        "not_before",
        "payload",
        "created_at",
        "updated_at",
    )
    await session.execute(insert(OPERATIONS_TABLE).from_select(columns, source))
