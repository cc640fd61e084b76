"""Retention: the workers prune history older than its configured age, so tables stay flat.

What goes, and what always stays:

- **Operations** that are ``done`` (not ``pending``/``running``, nor ``dead``: operators retry
  those from the dashboard).
- **Sync cycles**, by their start.
- **Idempotency records** past ``ANSWER_TTL``, when their key may be used afresh anyway.
- **Schedule runs** that are finished (``ok`` or ``failed``), by their end.
- **Deleted activities**: first their ledger rows that are ``deleted`` (the event is gone
  from the calendar) and that no operation still names, then the activity once it has no
  ledger row left. A deleted activity whose delete failed keeps its ``failed`` row, and so
  stays itself, until the delete succeeds.

Every statement removes at most ``batch_rows`` rows in its own short transaction, and every
delete repeats its conditions, so a row that changed since it was read stays and several
workers pruning at once only do harmless duplicate work (on PostgreSQL an advisory lock lets
one of them prune at a time). Nothing needs an index beyond those the queue already has:
operations and activities are walked by primary key, the others through their time index or
the small state prefix of one. A database outage ends the pass with its error, which the
worker's ``supervised`` loop waits out; the next pass starts over where rows are left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, delete, exists, func, select, text

from syncsvc.config import Settings
from syncsvc.service.feeds import DELETED_KEPT_DAYS
from syncsvc.service.idempotency import ANSWER_TTL
from syncsvc.service.schedules import RunState
from syncsvc.store.db import Database
from syncsvc.store.models import (
    Activity,
    ExternalEvent,
    IdempotencyKey,
    Operation,
    ScheduleRun,
    SyncCycle,
)
from syncsvc.store.states import LedgerState, OpState
from syncsvc.store.types import utcnow

log = logging.getLogger("syncsvc.retention")

#: Rows one statement removes at most: each short enough never to hold a table for long.
BATCH_ROWS = 1_000
#: Between two statements that removed rows: other writers get SQLite's write lock.
BATCH_PAUSE_S = 0.05
#: Between passes, each drawn from half to all of it so that workers started together spread.
PASS_INTERVAL_S = 600.0
#: A deleted activity stays while the iCal feed may still show it as cancelled: the feed
#: keeps it for ``DELETED_KEPT_DAYS`` whole days after the day it was deleted.
DELETED_ACTIVITY_MIN_AGE = timedelta(days=DELETED_KEPT_DAYS + 1)
#: PostgreSQL advisory lock key held by the one process pruning: ``syncret!`` as an int64.
RETENTION_LOCK_KEY = int.from_bytes(b"syncret!", "big")
#: ``ScheduleRun.state`` values that are final.
FINISHED_RUNS = (RunState.OK.value, RunState.FAILED.value)


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How old history gets before it goes; ``None`` keeps it for ever."""

    done_operations: timedelta | None = timedelta(days=7)
    cycles: timedelta | None = timedelta(days=7)
    idempotency: timedelta | None = ANSWER_TTL
    schedule_runs: timedelta | None = timedelta(days=30)
    deleted_activities: timedelta | None = DELETED_ACTIVITY_MIN_AGE

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        """Whole days from ``SYNCSVC_RETAIN_*_DAYS`` (0: for ever); deleted activities never
        before the feed is done with them."""

        def days(number: int) -> timedelta | None:
            return timedelta(days=number) if number > 0 else None

        activities = days(settings.retain_deleted_activities_days)
        return cls(
            done_operations=days(settings.retain_done_operations_days),
            cycles=days(settings.retain_cycles_days),
            schedule_runs=days(settings.retain_schedule_runs_days),
            deleted_activities=(
                None if activities is None else max(activities, DELETED_ACTIVITY_MIN_AGE)
            ),
        )


async def run_retention(
    db: Database,
    policy: RetentionPolicy,
    stop: asyncio.Event,
    *,
    interval_s: float = PASS_INTERVAL_S,
    batch_rows: int = BATCH_ROWS,
) -> None:
    """Prunes every ``interval_s`` (jittered) until ``stop``; run it under ``supervised``,
    which rides out an outage and restarts it."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s * random.uniform(0.5, 1.0))
        if stop.is_set():
            return
        await prune(db, policy, utcnow(), batch_rows=batch_rows, stop=stop)


async def prune(
    db: Database,
    policy: RetentionPolicy,
    now: datetime,
    *,
    batch_rows: int = BATCH_ROWS,
    pause_s: float = BATCH_PAUSE_S,
    stop: asyncio.Event | None = None,
) -> dict[str, int]:
    """One pass over every table: rows removed by table (nothing when another process holds
    the pass on PostgreSQL)."""
    pruner = _Pruner(db, batch_rows, pause_s, stop or asyncio.Event())
    removed: dict[str, int] = {}
    async with _only_pruner(db) as mine:
        if not mine:
            return removed
        steps: list[tuple[str, timedelta | None, Callable[[datetime], Awaitable[int]]]] = [
            ("operations", policy.done_operations, pruner.done_operations),
            ("sync_cycles", policy.cycles, pruner.cycles),
            ("idempotency_keys", policy.idempotency, pruner.idempotency_keys),
            ("schedule_runs", policy.schedule_runs, pruner.schedule_runs),
            ("activities", policy.deleted_activities, pruner.deleted_activities),
        ]
        for table, age, step in steps:
            if age is None or pruner.stop.is_set():
                continue
            started = time.monotonic()
            count = await step(now - age)
            if count:
                removed[table] = count
                log.info(
                    "event=retention.pruned table=%s rows=%d ms=%.0f",
                    table,
                    count,
                    (time.monotonic() - started) * 1000,
                )
        for table, count in pruner.extra.items():
            removed[table] = count
            log.info("event=retention.pruned table=%s rows=%d", table, count)
    return removed


@contextlib.asynccontextmanager
async def _only_pruner(db: Database) -> AsyncIterator[bool]:
    """On PostgreSQL, whether this process won the pass (a session advisory lock, released
    with its connection should the process or the connection die); elsewhere always."""
    if db.dialect != "postgresql":
        yield True
        return
    async with db.engine.connect() as conn:
        key = {"key": RETENTION_LOCK_KEY}
        mine = bool(await conn.scalar(text("SELECT pg_try_advisory_lock(:key)"), key))
        await conn.commit()  # the lock outlives the transaction; no snapshot is held meanwhile
        try:
            yield mine
        finally:
            if mine:
                try:
                    await conn.execute(text("SELECT pg_advisory_unlock(:key)"), key)
                    await conn.commit()
                except BaseException:
                    # Never hand a connection that may still hold the lock back to the pool.
                    await conn.invalidate()
                    raise


class _Pruner:
    def __init__(self, db: Database, batch_rows: int, pause_s: float, stop: asyncio.Event) -> None:
        self.db = db
        self.batch_rows = batch_rows
        self.pause_s = pause_s
        self.stop = stop
        #: Counts of tables pruned along with another (the ledger with activities).
        self.extra: dict[str, int] = {}

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), self.pause_s)

    async def _read(self, query: Any) -> list[Any]:
        async with self.db.session() as s:
            return list((await s.execute(query)).all())

    async def _delete(self, *statements: Any) -> int:
        """Runs the statements in one short transaction; the rows they removed."""
        async with self.db.session() as s, s.begin():
            return sum([await _execute(s, statement) for statement in statements])

    async def _until_done(
        self, pick: Any, remove: Callable[[list[Any]], Any], key: Callable[[Any], Any]
    ) -> int:
        """Reads up to ``batch_rows`` matching keys, deletes them (conditions repeated), and
        again until a read comes back short; for queries whose every match is deletable."""
        total = 0
        while not self.stop.is_set():
            rows = await self._read(pick.limit(self.batch_rows))
            if rows:
                removal = remove([key(row) for row in rows])
                total += await self._delete(*(removal if isinstance(removal, list) else [removal]))
            if len(rows) < self.batch_rows:
                return total
            await self._pause()
        return total

    async def _newest_id(self, column: Any) -> int | None:
        """The highest id: never pruned, because SQLite gives the next row max(id) + 1 and a
        reused id would name two operations (callbacks carry ``op_<id>`` to the CRM)."""
        rows = await self._read(select(func.max(column)))
        return None if rows[0][0] is None else int(rows[0][0])

    async def done_operations(self, cutoff: datetime) -> int:
        """Walks the primary key, ``batch_rows`` ids at a time, up to the first operation
        created at the cutoff: one that finished before the cutoff was created before it, and
        ids grow with creation."""
        ceiling = await self._first_id_created_at(cutoff)
        if ceiling is None:
            return 0
        total, after = 0, 0
        while not self.stop.is_set():
            upto = await self._slice_end(Operation.id, after, Operation.id < ceiling)
            removed = await self._delete(
                delete(Operation).where(
                    Operation.id > after,
                    Operation.id <= (ceiling - 1 if upto is None else upto),
                    _unindexed(Operation.state) == OpState.DONE,
                    Operation.updated_at < cutoff,
                )
            )
            total += removed
            if upto is None:
                break
            after = upto
            await (self._pause() if removed else asyncio.sleep(0))
        return total

    async def _slice_end(self, key: Any, after: Any, *bounds: ColumnElement[bool]) -> Any:
        """The ``batch_rows``-th key after ``after`` (from the start when None), or None when
        fewer are left: one slice of the primary key, read from its index alone."""
        query = select(key).where(*bounds).order_by(key)
        if after is not None:
            query = query.where(key > after)
        rows = await self._read(query.offset(self.batch_rows - 1).limit(1))
        return rows[0][0] if rows else None

    async def _first_id_created_at(self, cutoff: datetime) -> int | None:
        """The lowest id of an operation created at or after ``cutoff`` (the newest id when
        every one is older), by bisection over the primary key: a few dozen index lookups
        instead of a scan. Ids only roughly follow ``created_at`` across processes; a row on
        the wrong side of the bound is only pruned a pass later."""
        async with self.db.session() as s:
            # Apart: SQLite finds min() or max() in the index, but not both in one query.
            low = await s.scalar(select(func.min(Operation.id)))
            high = await s.scalar(select(func.max(Operation.id)))
            if low is None or high is None:
                return None

            async def created_from(op_id: int) -> datetime:
                stamp = await s.scalar(
                    select(Operation.created_at)
                    .where(Operation.id >= op_id)
                    .order_by(Operation.id)
                    .limit(1)
                )
                return cutoff if stamp is None else stamp  # none left: nothing older

            if await created_from(low) >= cutoff:
                return None
            # created_from(low) < cutoff; high is the answer or the newest id.
            while low + 1 < high:
                middle = (low + high) // 2
                if await created_from(middle) < cutoff:
                    low = middle
                else:
                    high = middle
            return int(high)

    async def cycles(self, cutoff: datetime) -> int:
        newest = await self._newest_id(SyncCycle.id)
        if newest is None:
            return 0
        old = (SyncCycle.started_at < cutoff, SyncCycle.id < newest)
        return await self._until_done(
            select(SyncCycle.id).where(*old).order_by(SyncCycle.started_at),
            lambda ids: delete(SyncCycle).where(SyncCycle.id.in_(ids), *old),
            lambda row: row[0],
        )

    async def idempotency_keys(self, cutoff: datetime) -> int:
        """By ``created_at``, checked again at the delete: a key reused since it was read
        carries a new stamp and stays. One statement per tenant, each by primary key (a list
        of (tenant, key) pairs would make SQLite scan the table)."""
        old = IdempotencyKey.created_at < cutoff

        def remove(pairs: list[tuple[str, str]]) -> list[Any]:
            by_tenant: dict[str, list[str]] = {}
            for tenant_id, key in pairs:
                by_tenant.setdefault(tenant_id, []).append(key)
            return [
                delete(IdempotencyKey).where(
                    IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key.in_(keys), old
                )
                for tenant_id, keys in by_tenant.items()
            ]

        return await self._until_done(
            select(IdempotencyKey.tenant_id, IdempotencyKey.key).where(old),
            remove,
            lambda row: (row[0], row[1]),
        )

    async def schedule_runs(self, cutoff: datetime) -> int:
        old: tuple[ColumnElement[bool], ...] = (
            ScheduleRun.state.in_(FINISHED_RUNS),
            ScheduleRun.finished_at < cutoff,
        )
        return await self._until_done(
            select(ScheduleRun.id).where(*old),
            lambda ids: delete(ScheduleRun).where(ScheduleRun.id.in_(ids), *old),
            lambda row: row[0],
        )

    async def deleted_activities(self, cutoff: datetime) -> int:
        """Walks the activities by primary key, ``batch_rows`` at a time: in each slice the
        ledger rows that may go, then the activities left without any, in one transaction."""
        newest_ledger = await self._newest_id(ExternalEvent.id)
        activities = ledger = 0
        after: str | None = None
        while not self.stop.is_set():
            upto: str | None = await self._slice_end(Activity.id, after)
            in_slice: list[ColumnElement[bool]] = []
            if after is not None:
                in_slice.append(Activity.id > after)
            if upto is not None:
                in_slice.append(Activity.id <= upto)
            old_deleted = (*in_slice, Activity.deleted.is_(True), Activity.updated_at < cutoff)
            removed = 0
            # A read first: a slice with nothing to prune costs no write transaction.
            if await self._read(select(Activity.id).where(*old_deleted).limit(1)):
                async with self.db.session() as s, s.begin():
                    if newest_ledger is not None:
                        ledger += await _execute(
                            s,
                            delete(ExternalEvent).where(
                                ExternalEvent.activity_id.in_(
                                    select(Activity.id).where(*old_deleted)
                                ),
                                ExternalEvent.state == LedgerState.DELETED,
                                ExternalEvent.updated_at < cutoff,
                                ExternalEvent.id < newest_ledger,
                                ~exists().where(Operation.ledger_id == ExternalEvent.id),
                            ),
                        )
                    removed = await _execute(
                        s,
                        delete(Activity).where(
                            *old_deleted,
                            ~exists().where(ExternalEvent.activity_id == Activity.id),
                        ),
                    )
                activities += removed
            if upto is None:
                break
            after = upto
            if removed:
                await self._pause()
            else:
                await asyncio.sleep(0)
        if ledger:
            self.extra["external_events"] = ledger
        return activities


async def _execute(session: Any, statement: Any) -> int:
    """Runs a bulk delete; the rows it removed."""
    result = await session.execute(statement.execution_options(synchronize_session=False))
    return int(cast(CursorResult[Any], result).rowcount or 0)


def _unindexed(column: Any) -> Any:
    """``column || ''``: the same value, but no index on it is usable, so the database walks
    the primary-key slice the statement names instead of an index of the whole table (SQLite,
    without statistics, would rather take ``ix_operations_due`` on ``state`` alone and sort)."""
    return column.concat("")
