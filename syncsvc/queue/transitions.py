"""State transitions of claimed operations and their ledger rows, once an outcome is known.

Each function runs in the caller's transaction. Core statements (see ``queue/claims.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Select, and_, bindparam, case, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.queue.outbox import LEDGER_TABLE, OPERATIONS_TABLE, chunks
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, Batch, ExternalEvent
from syncsvc.store.states import DELETION_REQUESTED, LedgerState, OpState
from syncsvc.store.types import in_ids, utcnow

_ops = OPERATIONS_TABLE.c
_ledger = LEDGER_TABLE.c
ERROR_MAX = 2000


@dataclass(frozen=True, slots=True)
class Success:
    """A ledger row's action succeeded: it moves from ``was`` to ``then`` unless someone
    changed it meanwhile; a new event id (a create) is kept either way."""

    op_id: int
    ledger_id: int
    was: str
    then: str
    event_id: str | None = None
    etag: str | None = None


_moved = case((_ledger.state == bindparam("b_was"), bindparam("b_then")), else_=_ledger.state)
_by_id = update(LEDGER_TABLE).where(_ledger.id == bindparam("b_id"))
_WITH_REF = _by_id.values(
    attempts=0,
    last_error=None,
    state=_moved,
    event_id=bindparam("b_event_id"),
    etag=bindparam("b_etag"),
)
_WITHOUT_REF = _by_id.values(attempts=0, last_error=None, state=_moved)


async def succeeded(s: AsyncSession, outcomes: Sequence[Success]) -> None:
    """Records outcomes: one executemany per shape, one update of their operations. A batch
    deleted while its create ran keeps ``pending_delete`` and its own operation, but the
    event id is kept, so that delete knows what to remove."""
    if not outcomes:
        return
    with_ref: list[dict[str, object]] = []
    without_ref: list[dict[str, object]] = []
    for o in outcomes:
        row = {"b_id": o.ledger_id, "b_was": o.was, "b_then": o.then}
        if o.event_id is None:
            without_ref.append(row)
        else:
            with_ref.append({**row, "b_event_id": o.event_id, "b_etag": o.etag})
    if with_ref:
        await s.execute(_WITH_REF, with_ref)
    if without_ref:
        await s.execute(_WITHOUT_REF, without_ref)
    await done(s, [o.op_id for o in outcomes])


_DONE = update(OPERATIONS_TABLE).where(in_ids(_ops.id, name="ids")).values(state=OpState.DONE)


async def done(s: AsyncSession, op_ids: Sequence[int]) -> None:
    await s.execute(_DONE, {"ids": list(op_ids)})


async def requeue(
    s: AsyncSession,
    op_ids: Sequence[int],
    delay_s: float,
    *,
    count_attempt: bool,
    error: str | None = None,
) -> None:
    """Back to pending after ``delay_s``; an attempt is spent only if ``count_attempt``."""
    values: dict[str, object] = {
        "state": OpState.PENDING,
        "not_before": utcnow() + timedelta(seconds=delay_s),
    }
    if error is not None:
        values["last_error"] = error[:ERROR_MAX]
    if count_attempt:
        values["attempts"] = _ops.attempts + 1
    await s.execute(update(OPERATIONS_TABLE).where(in_ids(_ops.id, op_ids)).values(**values))


async def attempts_of(s: AsyncSession, op_id: int) -> int:
    return (await s.scalar(select(_ops.attempts).where(_ops.id == op_id))) or 0


async def give_up(s: AsyncSession, op_id: int, ledger_id: int | None, error: str) -> None:
    """The operation is dead, and its ledger row (if any, and if not already settled) failed."""
    await s.execute(
        update(OPERATIONS_TABLE)
        .where(_ops.id == op_id)
        .values(state=OpState.DEAD, last_error=error[:ERROR_MAX], attempts=_ops.attempts + 1)
    )
    if ledger_id is None:
        return
    await s.execute(
        update(LEDGER_TABLE)
        .where(
            _ledger.id == ledger_id,
            and_(_ledger.state != LedgerState.DELETED, _ledger.state != LedgerState.SYNCED),
        )
        .values(state=LedgerState.FAILED, last_error=error[:ERROR_MAX])
    )


async def retry_dead(db: Database, op_ids: Sequence[int] | None = None) -> int:
    """Operator retry: dead operations (all, or the given ones) go back to pending with fresh
    attempts; their failed ledger rows return to the state they work towards, judged on the
    activity and batch as they are now (a batch deleted since the failure wants a delete)."""
    query = select(_ops.id, _ops.ledger_id).where(_ops.state == OpState.DEAD)
    async with db.session() as s, s.begin():
        queries: list[Select[Any]] = (
            [query]
            if op_ids is None
            else [query.where(_ops.id.in_(chunk)) for chunk in chunks(sorted(set(op_ids)))]
        )
        rows: list[tuple[int, int | None]] = []
        for chunk_query in queries:
            rows.extend((op_id, ledger) for op_id, ledger in await s.execute(chunk_query))
        ledger_ids = sorted({ledger for _, ledger in rows if ledger is not None})
        target: dict[LedgerState, list[int]] = {}
        for chunk in chunks(ledger_ids):
            failed = await s.execute(
                select(ExternalEvent.id, ExternalEvent.event_id, Activity.deleted, Batch.state)
                .join(Activity, Activity.id == ExternalEvent.activity_id)
                .outerjoin(Batch, Batch.id == Activity.batch_id)
                .where(ExternalEvent.id.in_(chunk), ExternalEvent.state == LedgerState.FAILED)
            )
            for ledger_id, event_id, deleted, batch_state in failed:
                if deleted or batch_state in DELETION_REQUESTED:
                    state = LedgerState.PENDING_DELETE
                elif event_id:
                    state = LedgerState.PENDING_UPDATE
                else:
                    state = LedgerState.PENDING_CREATE
                target.setdefault(state, []).append(ledger_id)
        for state, ids in target.items():
            for chunk in chunks(ids):
                await s.execute(
                    update(LEDGER_TABLE)
                    .where(_ledger.id.in_(chunk), _ledger.state == LedgerState.FAILED)
                    .values(state=state, attempts=0)
                )
        now = utcnow()
        for chunk in chunks([op_id for op_id, _ in rows]):
            await s.execute(
                update(OPERATIONS_TABLE)
                .where(_ops.id.in_(chunk), _ops.state == OpState.DEAD)
                .values(state=OpState.PENDING, attempts=0, not_before=now)
            )
        return len(rows)
