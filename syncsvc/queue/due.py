"""Which mailboxes have due work, without grouping the whole outbox (PostgreSQL).

Grouping a million pending operations by mailbox takes seconds, and every worker asked five
times a second (``bench/queue_scale.py``). On PostgreSQL the dispatcher reads
``queue_mailboxes`` instead, one row per mailbox with open work. That table is a lower bound:

* a statement trigger on ``operations`` (migration 0007) *lowers* a mailbox's ``due_at`` and
  raises its ``version`` whenever an operation becomes open or due earlier;
* after a cycle, :func:`settle` *raises* ``due_at`` to the mailbox's earliest open operation,
  with compare-and-set on ``version``. Work stored meanwhile has either bumped the version
  (the settle then changes nothing) or runs its trigger after the settle (and lowers it again).

So ``due_at`` is never later than the earliest open operation: at worst a mailbox looks due
when it is not, a cycle claims nothing and settles it. :func:`sweep` repeats the grouping now
and then (lowering only, one worker of the cluster at a time) as a safety net, should anything
write operations past the trigger. SQLite has no statement triggers; its dispatcher groups the
outbox, which is small there.

The dispatcher wants a few hundred mailboxes, fairly shared between tenants, out of tens of
thousands: :func:`by_table` reads a couple per tenant and goes deeper only when that was not
enough, rather than ranking every due mailbox with a window function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, case, delete, func, select, true, union_all, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import Subquery

from syncsvc.store.models import Operation, QueueMailbox, Tenant
from syncsvc.store.states import OPEN_STATES, Lane

#: How often each worker repeats the full grouping (seconds).
SWEEP_S = 60.0
#: PostgreSQL advisory lock held (for its transaction) by the one worker sweeping: ``qsweep!!``.
SWEEP_LOCK_KEY = int.from_bytes(b"qsweep!!", "big")
#: Mailboxes per tenant :func:`by_table` asks for first: at 100 tenants and the dispatcher's
#: 128 rows, one query.
FIRST_DEPTH = 2


@dataclass(frozen=True, slots=True)
class Due:
    tenant: str
    mailbox: str
    #: Whether interactive work is due (its cycle takes connections from the urgent pool).
    interactive: bool


async def _fairest(s: AsyncSession, ranked: Subquery, per_tenant: int, limit: int) -> list[Due]:
    """Every tenant's first mailbox, then every tenant's second, ...: ``limit`` rows at most
    (the dispatcher starts fewer cycles than that), at most ``per_tenant`` of one tenant."""
    rows = await s.execute(
        select(ranked.c.tenant_id, ranked.c.mailbox, ranked.c.lane_rank)
        .where(ranked.c.rank <= per_tenant)
        .order_by(ranked.c.rank, ranked.c.lane_rank, ranked.c.first_due)
        .limit(limit)
    )
    return [Due(tenant, mailbox, lane == 0) for tenant, mailbox, lane in rows]


async def by_grouping(s: AsyncSession, now: datetime, per_tenant: int, limit: int) -> list[Due]:
    """Per tenant, mailboxes with interactive work first, then the longest waiting, at most
    ``per_tenant`` each, by grouping the open operations (SQLite)."""
    lane = func.min(case((Operation.lane == Lane.INTERACTIVE, 0), else_=1))
    rank = (
        func.row_number()
        .over(partition_by=Operation.tenant_id, order_by=(lane, func.min(Operation.not_before)))
        .label("rank")
    )
    ranked = (
        select(
            Operation.tenant_id,
            Operation.mailbox,
            lane.label("lane_rank"),
            func.min(Operation.not_before).label("first_due"),
            rank,
        )
        .where(Operation.state.in_(OPEN_STATES), Operation.not_before <= now)
        .group_by(Operation.tenant_id, Operation.mailbox)
        .subquery()
    )
    return await _fairest(s, ranked, per_tenant, limit)


async def by_table(s: AsyncSession, now: datetime, per_tenant: int, limit: int) -> list[Due]:
    """The same answer from ``queue_mailboxes`` (PostgreSQL), without ranking every due
    mailbox: each tenant's first ``depth`` mailboxes (one probe per tenant), deeper only while
    fewer than ``limit`` came back and some tenant may hold more. Every row of rank ``depth``
    or less is then known, so the first ``limit`` by rank are the window's own."""
    depth = FIRST_DEPTH
    while True:
        firsts = await _firsts(s, now, depth)
        found = sum(len(rows) for rows in firsts.values())
        deeper = [t for t, rows in firsts.items() if len(rows) == depth]
        if found >= limit or not deeper or depth >= per_tenant:
            return _deal(firsts, per_tenant, limit)
        depth = min(per_tenant, depth + -(-(limit - found) // len(deeper)))


@dataclass(frozen=True, slots=True)
class _First:
    mailbox: str
    #: 0 when interactive work is due.
    lane: int
    due_at: datetime


async def _firsts(s: AsyncSession, now: datetime, depth: int) -> dict[str, list[_First]]:
    """Per tenant, its ``depth`` due mailboxes with interactive work first, then the longest
    waiting: two LATERAL picks per tenant, each an index range read in ``due_at`` order that
    stops after ``depth`` rows (its interactive ones, and any), merged here."""
    q = QueueMailbox

    def pick(*where: ColumnElement[bool]) -> Any:
        return (
            select(q.mailbox, q.interactive_at, q.due_at)
            .where(q.tenant_id == Tenant.id, q.due_at <= now, *where)
            .order_by(q.due_at)
            .limit(depth)
            .lateral()
        )

    interactive = pick(q.interactive_at.is_not(None), q.interactive_at <= now)
    anything = pick()
    rows = await s.execute(
        union_all(
            *(
                select(Tenant.id, p.c.mailbox, p.c.interactive_at, p.c.due_at).join(p, true())
                for p in (interactive, anything)
            )
        )
    )
    firsts: dict[str, list[_First]] = {}
    for tenant, mailbox, interactive_at, due_at in rows:
        lane = 0 if interactive_at is not None and interactive_at <= now else 1
        firsts.setdefault(tenant, []).append(_First(mailbox, lane, due_at))
    for tenant, picked in firsts.items():
        # The interactive pick holds every interactive one unless it is full: either way,
        # the first ``depth`` of the two without repeats (a row both picked is the same
        # value twice) are the tenant's first ``depth``.
        picked.sort(key=lambda f: (f.lane, f.due_at))
        firsts[tenant] = list(dict.fromkeys(picked))[:depth]
    return firsts


def _deal(firsts: Mapping[str, Sequence[_First]], per_tenant: int, limit: int) -> list[Due]:
    """Every tenant's first mailbox, then every tenant's second, ... (as :func:`_fairest`), from
    each tenant's mailboxes in their order."""
    ranked = [
        (rank, f.lane, f.due_at, tenant, f.mailbox)
        for tenant, picked in firsts.items()
        for rank, f in enumerate(picked[:per_tenant])
    ]
    ranked.sort(key=lambda r: r[:3])
    return [Due(tenant, mailbox, lane == 0) for _, lane, _, tenant, mailbox in ranked[:limit]]


async def settle(s: AsyncSession, tenant: str, mailbox: str) -> None:
    """Raises the mailbox's ``due_at`` to its earliest open operation (or drops its row when it
    has none), unless work was stored since ``version`` was read (see the module doc)."""
    version = await s.scalar(
        select(QueueMailbox.version).where(
            QueueMailbox.tenant_id == tenant, QueueMailbox.mailbox == mailbox
        )
    )
    if version is None:
        return
    open_ops = (
        Operation.tenant_id == tenant,
        Operation.mailbox == mailbox,
        Operation.state.in_(OPEN_STATES),
    )
    first = await s.scalar(
        select(Operation.not_before).where(*open_ops).order_by(Operation.not_before).limit(1)
    )
    same = (
        QueueMailbox.tenant_id == tenant,
        QueueMailbox.mailbox == mailbox,
        QueueMailbox.version == version,
    )
    if first is None:
        await s.execute(delete(QueueMailbox).where(*same))
        return
    interactive = await s.scalar(
        select(func.min(Operation.not_before)).where(*open_ops, Operation.lane == Lane.INTERACTIVE)
    )
    await s.execute(
        update(QueueMailbox).where(*same).values(due_at=first, interactive_at=interactive)
    )


async def sweep(s: AsyncSession) -> bool:
    """Lowers every mailbox's ``due_at`` to what grouping the outbox says (never raises it).

    One worker of the cluster at a time: the one holding ``SWEEP_LOCK_KEY`` until its
    transaction ends; the others skip (``False``) instead of grouping the outbox again."""
    if not await s.scalar(select(func.pg_try_advisory_xact_lock(SWEEP_LOCK_KEY))):
        return False
    found = (
        select(
            Operation.tenant_id,
            Operation.mailbox,
            func.min(Operation.not_before).label("due_at"),
            func.min(Operation.not_before)
            .filter(Operation.lane == Lane.INTERACTIVE)
            .label("interactive_at"),
        )
        .where(Operation.state.in_(OPEN_STATES))
        .group_by(Operation.tenant_id, Operation.mailbox)
    )
    stmt = pg_insert(QueueMailbox).from_select(
        ["tenant_id", "mailbox", "due_at", "interactive_at"], found
    )
    q = QueueMailbox.__table__.c
    await s.execute(
        stmt.on_conflict_do_update(
            index_elements=[q.tenant_id, q.mailbox],
            set_={
                "due_at": func.least(q.due_at, stmt.excluded.due_at),
                "interactive_at": func.least(q.interactive_at, stmt.excluded.interactive_at),
                "version": q.version + 1,
            },
            where=(stmt.excluded.due_at < q.due_at)
            | (
                stmt.excluded.interactive_at.is_not(None)
                & (q.interactive_at.is_(None) | (stmt.excluded.interactive_at < q.interactive_at))
            ),
        )
    )
    return True
