"""Claims: short leases on due operations, so that one operation runs in one worker at a time.

A claim is ``state='running'`` with ``not_before`` = the lease's end. The claiming worker
renews it while it holds it; a crashed worker's claims become claimable again when the lease
runs out, and a worker that stops hands back what it holds at once. Every write here is a
compare-and-set on the lease end the worker itself wrote, so it never touches another
worker's claim. On PostgreSQL, claims use ``FOR UPDATE SKIP LOCKED`` and lock the ledger rows
too, so two workers never work on one ledger row at once; on SQLite the compare-and-set alone
decides between two claimers.

Statements are Core (``OPERATIONS_TABLE``), not ORM updates: these run several times per
chunk of every mailbox, and the ORM's bulk-update bookkeeping cost more than the SQL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BindParameter, Select, and_, bindparam, case, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.queue.outbox import ACTIVITIES_TABLE, LEDGER_TABLE, OPERATIONS_TABLE, chunks
from syncsvc.queue.reconcile import ActivityRow, LedgerRow
from syncsvc.store.models import Batch, User
from syncsvc.store.states import DELETION_REQUESTED, OPEN_STATES, Lane, OpState
from syncsvc.store.types import in_ids, utcnow

#: A claim's lease; renewed every ``HEARTBEAT_S`` while held, so it only runs out on a crash.
CLAIM_TTL_S = 30.0
HEARTBEAT_S = 10.0

_ops = OPERATIONS_TABLE.c
_ledger = LEDGER_TABLE.c
_activity = ACTIVITIES_TABLE.c


@dataclass(frozen=True, slots=True)
class Claimed:
    op_id: int
    ledger_id: int | None
    kind: str
    #: The W3C traceparent of the request that queued it (``syncsvc/tracing.py``).
    trace: str | None = None


#: ``state IN ('pending', 'running')`` with constants: the partial indexes' own predicate, and
#: nothing to expand per execution.
OPEN = text("operations.state IN (" + ", ".join(f"'{state}'" for state in OPEN_STATES) + ")")

# Built once: these run several times per chunk, and building a statement cost more than
# running it. ``in_ids`` keeps one statement text for any count of ids.
_now: BindParameter[datetime] = bindparam("now")
_busy_ledgers = select(_ops.ledger_id).where(
    _ops.state == OpState.RUNNING, _ops.not_before > _now, _ops.ledger_id.is_not(None)
)
_DUE = (
    select(_ops.id, _ops.ledger_id, _ops.kind, _ops.payload)
    .where(
        _ops.tenant_id == bindparam("tenant"),
        _ops.mailbox == bindparam("mailbox"),
        OPEN,
        _ops.not_before <= _now,
        or_(_ops.ledger_id.is_(None), _ops.ledger_id.not_in(_busy_ledgers)),
    )
    .order_by(case((_ops.lane == Lane.INTERACTIVE, 0), else_=1), _ops.id)
    .limit(bindparam("n"))
)
_DUE_LOCKED = _DUE.with_for_update(skip_locked=True)
_LEASE = (
    update(OPERATIONS_TABLE)
    .where(in_ids(_ops.id, name="ids"), OPEN, _ops.not_before <= _now)
    .values(state=OpState.RUNNING, not_before=bindparam("lease_end"))
    .returning(_ops.id)
)
_MERGE = (
    update(OPERATIONS_TABLE)
    .where(
        in_ids(_ops.ledger_id, name="ledgers"),
        _ops.state == OpState.PENDING,
        ~in_ids(_ops.id, name="ids"),
    )
    .values(state=OpState.DONE, last_error="merged")
)
_LOCK_LEDGERS = (
    select(_ledger.id).where(in_ids(_ledger.id, name="ids")).with_for_update(skip_locked=True)
)
_RUNNING_ON = select(_ops.ledger_id).where(
    in_ids(_ops.ledger_id, name="ids"), _ops.state == OpState.RUNNING, _ops.not_before > _now
)


async def claim(
    s: AsyncSession, tenant: str, mailbox: str, n: int, *, row_locks: bool
) -> tuple[list[Claimed], datetime]:
    """Up to ``n`` due operations of one mailbox, interactive lane first, at most one per
    ledger row, and the end of their lease. Other waiting operations of the claimed ledger
    rows are merged (done): the claimed ones act on data read after this commit.

    Runs in the caller's transaction, which must commit for the claims to hold."""
    now = utcnow()
    rows: Sequence[Any] = (
        await s.execute(
            _DUE_LOCKED if row_locks else _DUE,
            {"tenant": tenant, "mailbox": mailbox, "now": now, "n": n},
        )
    ).all()
    if row_locks:
        rows = await _free_ledgers_only(s, rows, now)
    seen: set[int] = set()
    claimed: list[Claimed] = []
    for op_id, ledger_id, kind, payload in rows:
        if ledger_id is not None:
            if ledger_id in seen:
                continue
            seen.add(ledger_id)
        trace = payload.get("traceparent") if isinstance(payload, dict) else None
        claimed.append(Claimed(op_id, ledger_id, kind, trace))
    lease_end = now + timedelta(seconds=CLAIM_TTL_S)
    if not claimed:
        return [], lease_end
    # Compare-and-set on what was read: without row locks (SQLite) another worker may have
    # read the same rows; only one of the two updates still matches.
    op_ids = [c.op_id for c in claimed]
    won = set(await s.scalars(_LEASE, {"ids": op_ids, "now": now, "lease_end": lease_end}))
    claimed = [c for c in claimed if c.op_id in won]
    ledgers = [c.ledger_id for c in claimed if c.ledger_id is not None]
    if ledgers:
        await s.execute(_MERGE, {"ledgers": ledgers, "ids": [c.op_id for c in claimed]})
    return claimed, lease_end


async def _free_ledgers_only(s: AsyncSession, rows: Sequence[Any], now: datetime) -> list[Any]:
    """Keeps the claimed rows whose ledger row no other worker is working on.

    ``SKIP LOCKED`` keeps two workers from claiming one *operation*, not two operations of one
    ledger row (a create and the delete that followed it). Locking the ledger rows, then
    looking again for running operations (a new statement sees every claim committed by then),
    closes that gap: a concurrent claimer either holds the row (we skip it) or has committed.
    """
    ledger_ids = sorted({r[1] for r in rows if r[1] is not None})
    if not ledger_ids:
        return list(rows)
    locked = set(await s.scalars(_LOCK_LEDGERS, {"ids": ledger_ids}))
    busy = set(await s.scalars(_RUNNING_ON, {"ids": sorted(locked), "now": now}))
    return [r for r in rows if r[1] is None or (r[1] in locked and r[1] not in busy)]


#: Claimed ledger rows by id: the row, its activity, its user, whether its batch is going.
Loaded = dict[int, tuple[LedgerRow, ActivityRow, User, bool]]


def _load_statement() -> Select[Any]:
    picked = (
        select(*(_ledger[name] for name in (*LedgerRow._fields, "activity_id")))
        .where(in_ids(_ledger.id, name="ids"))
        .cte("picked")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    return (
        select(
            *(picked.c[name] for name in LedgerRow._fields),
            *(_activity[name] for name in ActivityRow._fields),
            User,
            Batch.state,
        )
        .join(ACTIVITIES_TABLE, _activity.id == picked.c.activity_id)
        .join(User, and_(User.tenant_id == _activity.tenant_id, User.id == _activity.user_id))
        .outerjoin(Batch, Batch.id == _activity.batch_id)
    )


#: Built once, as the statements above: it runs for every chunk.
_LOAD = _load_statement()
_LEDGER_END = len(LedgerRow._fields)
_ACTIVITY_END = _LEDGER_END + len(ActivityRow._fields)


async def load(s: AsyncSession, ledger_ids: Sequence[int]) -> Loaded:
    """Ledger rows with their activity, user and whether their batch is being deleted.

    The ledger rows are read first, by id, whatever the planner estimates: right after a
    large batch is committed the tables' statistics are stale, and (with no foreign keys to
    go by) a plan starting from the users walked every activity of every user."""
    found: Loaded = {}
    for row in await s.execute(_LOAD, {"ids": sorted(set(ledger_ids))}):
        ledger = LedgerRow._make(row[:_LEDGER_END])
        activity = ActivityRow._make(row[_LEDGER_END:_ACTIVITY_END])
        user, batch_state = row[_ACTIVITY_END:]
        found[ledger.id] = (ledger, activity, user, batch_state in DELETION_REQUESTED)
    return found


async def renew(s: AsyncSession, by_lease: Mapping[datetime, Sequence[int]]) -> datetime:
    """Moves the lease end of claims still held (by their old end) on; returns the new end."""
    new_end = utcnow() + timedelta(seconds=CLAIM_TTL_S)
    await _move_leases(s, by_lease, {"not_before": new_end})
    return new_end


async def hand_back(s: AsyncSession, by_lease: Mapping[datetime, Sequence[int]]) -> None:
    """Claims still running go back to pending at once, no attempt spent."""
    await _move_leases(s, by_lease, {"state": OpState.PENDING, "not_before": utcnow()})


async def _move_leases(
    s: AsyncSession, by_lease: Mapping[datetime, Sequence[int]], values: Mapping[str, Any]
) -> None:
    for lease_end, op_ids in by_lease.items():
        for part in chunks(op_ids, 500):
            await s.execute(
                update(OPERATIONS_TABLE)
                .where(
                    in_ids(_ops.id, part),
                    _ops.state == OpState.RUNNING,
                    _ops.not_before == lease_end,
                )
                .values(**values)
            )


async def free_all(s: AsyncSession) -> None:
    """Every claim back to pending: the embedded worker is the only one, so at its start no
    claim can still be held."""
    await s.execute(
        update(OPERATIONS_TABLE)
        .where(_ops.state == OpState.RUNNING)
        .values(state=OpState.PENDING, not_before=utcnow())
    )
