"""The operator's view of the sync: cycles, queue depth, dead operations, batches, health.

Everything is read from the database (the outbox, the ledger and ``sync_cycles``), so any API
process shows the work of every worker process; nothing here needs the workers' memory.
Operators see every tenant.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.errors import ConsentRevoked, GrantRevoked
from syncsvc.metrics import Metrics
from syncsvc.queue.outbox import chunks
from syncsvc.queue.transitions import retry_dead
from syncsvc.service.batches import SyncCounts, counts_from, derive_state
from syncsvc.store.db import Database
from syncsvc.store.models import Batch, ExternalEvent, Operation, SyncCycle, Tenant, User
from syncsvc.store.states import BatchState, OpState
from syncsvc.store.types import utcnow

log = logging.getLogger("syncsvc.ops")

#: Outbox states an operator watches (``done`` is history).
QUEUE_STATES = (OpState.PENDING, OpState.RUNNING, OpState.DEAD)
LIST_LIMIT_MAX = 500
#: The throughput chart: this long a window, in buckets this wide.
CHART_WINDOW_S = 600
CHART_BUCKET_S = 10
#: A cycle runs at most ``CYCLE_MAX_OPS`` operations; one longer than this is not looked for
#: when filling the chart (keeps the query on the ``started_at`` index).
CYCLE_LONGEST_S = 3600
#: Batches on the dashboard: every one with outstanding or dead work (up to a cap) and the
#: newest others.
ACTIVE_BATCHES_MAX = 30
RECENT_BATCHES = 10
USERS_PER_BATCH_MAX = 50
#: A mailbox counts as throttled while its last cycle, this recent, was throttled.
THROTTLED_RECENT_S = 300
#: Mailboxes whose health is shown: seen in a cycle this recently, or with queued work.
HEALTH_WINDOW_S = 24 * 3600
HEALTH_CYCLES_MAX = 5000
HEALTH_USERS_MAX = 200
#: The error code the worker writes first in ``last_error`` for rejected credentials.
AUTH_FAILED_PREFIX = "auth_failed"


def provider_of(mailbox: str) -> str:
    """``caldav:https://…`` → ``caldav``: mailboxes are ``<provider>:<calendar>``."""
    return mailbox.split(":", 1)[0]


# --- Cycles --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CycleView:
    id: int
    provider: str
    mailbox: str
    started_at: datetime
    finished_at: datetime | None
    done: int
    failed: int
    throttled: int

    @property
    def duration_ms(self) -> int | None:
        if self.finished_at is None:
            return None
        return round((self.finished_at - self.started_at).total_seconds() * 1000)


def _cycle_view(row: SyncCycle) -> CycleView:
    return CycleView(
        id=row.id,
        provider=row.provider,
        mailbox=row.mailbox,
        started_at=row.started_at,
        finished_at=row.finished_at,
        done=row.done,
        failed=row.failed,
        throttled=row.throttled,
    )


async def list_cycles(
    session: AsyncSession,
    limit: int,
    after: tuple[datetime, int] | None = None,
    *,
    mailbox: str | None = None,
    provider: str | None = None,
) -> list[CycleView]:
    """Newest first by (started_at, id); up to ``limit + 1`` rows (the extra one says more
    exist)."""
    limit = max(1, min(limit, LIST_LIMIT_MAX))
    query = select(SyncCycle)
    if mailbox is not None:
        query = query.where(SyncCycle.mailbox == mailbox)
    if provider is not None:
        query = query.where(SyncCycle.provider == provider)
    if after is not None:
        started_at, last_id = after
        query = query.where(
            or_(
                SyncCycle.started_at < started_at,
                and_(SyncCycle.started_at == started_at, SyncCycle.id < last_id),
            )
        )
    rows = await session.scalars(
        query.order_by(SyncCycle.started_at.desc(), SyncCycle.id.desc()).limit(limit + 1)
    )
    return [_cycle_view(row) for row in rows]


@dataclass(frozen=True, slots=True)
class Bucket:
    """Operations finished in ``[start, start + CHART_BUCKET_S)``; a cycle's counts are spread
    over the buckets it spans, in proportion to the time it spent in each."""

    start: datetime
    done: float
    failed: float
    throttled: float


async def throughput(session: AsyncSession, now: datetime) -> list[Bucket]:
    """The chart's series: ``CHART_WINDOW_S`` up to ``now``, oldest bucket first."""
    end_s = (int(now.timestamp()) // CHART_BUCKET_S + 1) * CHART_BUCKET_S
    start_s = end_s - CHART_WINDOW_S
    window_start = datetime.fromtimestamp(start_s, tz=now.tzinfo)
    count = CHART_WINDOW_S // CHART_BUCKET_S
    done, failed, throttled = [0.0] * count, [0.0] * count, [0.0] * count
    rows = await session.execute(
        select(SyncCycle.started_at, SyncCycle.finished_at, *_COUNTS).where(
            SyncCycle.started_at >= window_start - timedelta(seconds=CYCLE_LONGEST_S),
            SyncCycle.finished_at >= window_start,
        )
    )
    for started_at, finished_at, n_done, n_failed, n_throttled in rows:
        if finished_at is None:
            continue
        first_s = max(started_at.timestamp(), float(start_s))
        last_s = min(finished_at.timestamp(), float(end_s) - 1e-6)
        span_s = finished_at.timestamp() - started_at.timestamp()
        for index, share in _shares(first_s, last_s, span_s, start_s):
            done[index] += n_done * share
            failed[index] += n_failed * share
            throttled[index] += n_throttled * share
    return [
        Bucket(
            datetime.fromtimestamp(start_s + i * CHART_BUCKET_S, tz=now.tzinfo),
            round(done[i], 2),
            round(failed[i], 2),
            round(throttled[i], 2),
        )
        for i in range(count)
    ]


_COUNTS = (SyncCycle.done, SyncCycle.failed, SyncCycle.throttled)


def _shares(
    first_s: float, last_s: float, span_s: float, start_s: int
) -> Iterable[tuple[int, float]]:
    """(bucket index, share of the cycle) for the part of a cycle inside the window."""
    if last_s < first_s:
        return
    if span_s <= 0:
        yield int((last_s - start_s) // CHART_BUCKET_S), 1.0
        return
    for index in range(
        int((first_s - start_s) // CHART_BUCKET_S), int((last_s - start_s) // CHART_BUCKET_S) + 1
    ):
        bucket_start = start_s + index * CHART_BUCKET_S
        overlap_s = min(bucket_start + CHART_BUCKET_S, last_s) - max(bucket_start, first_s)
        yield index, max(overlap_s, 0.0) / span_s


# --- Queue ---------------------------------------------------------------------------------


@dataclass(slots=True)
class LaneDepth:
    """One mailbox's lane: how much waits, runs and gave up."""

    mailbox: str
    lane: str
    pending: int = 0
    running: int = 0
    dead: int = 0
    #: Pending operations held back (backoff after an error, or the mailbox is paused).
    waiting: int = 0
    oldest_pending_at: datetime | None = None

    @property
    def provider(self) -> str:
        return provider_of(self.mailbox)

    def oldest_pending_age_s(self, now: datetime) -> float | None:
        if self.oldest_pending_at is None:
            return None
        return round(max((now - self.oldest_pending_at).total_seconds(), 0.0), 1)


async def queue_depth(session: AsyncSession, now: datetime) -> list[LaneDepth]:
    """Per mailbox and lane, busiest first; one grouped read on the outbox's state index."""
    rows = await session.execute(
        select(
            Operation.mailbox,
            Operation.lane,
            Operation.state,
            func.count(),
            func.min(Operation.created_at),
            func.sum(case((Operation.not_before > now, 1), else_=0)),
        )
        .where(Operation.state.in_(QUEUE_STATES))
        .group_by(Operation.mailbox, Operation.lane, Operation.state)
    )
    lanes: dict[tuple[str, str], LaneDepth] = {}
    for mailbox, lane, state, count, oldest, later in rows:
        depth = lanes.setdefault((mailbox, lane), LaneDepth(mailbox, lane))
        if state == OpState.PENDING:
            depth.pending, depth.waiting, depth.oldest_pending_at = count, int(later or 0), oldest
        elif state == OpState.RUNNING:
            depth.running = count
        else:
            depth.dead = count
    return sorted(
        lanes.values(),
        key=lambda d: (-(d.pending + d.running), -d.dead, d.mailbox, d.lane),
    )


async def refresh_queue_metrics(db: Database, metrics: Metrics) -> None:
    """Sets the queue gauges from the outbox at scrape time. A database that does not answer
    leaves them as they were: the scrape still shows the process's own metrics."""
    try:
        async with db.session() as session:
            await update_queue_metrics(session, metrics, utcnow())
    except (SQLAlchemyError, OSError) as exc:
        log.warning("event=metrics.queue.unavailable error=%s", type(exc).__name__)


async def update_queue_metrics(session: AsyncSession, metrics: Metrics, now: datetime) -> None:
    totals: dict[tuple[str, str, str], int] = {}
    oldest: dict[tuple[str, str], float] = {}
    for depth in await queue_depth(session, now):
        for state, count in (
            (OpState.PENDING, depth.pending),
            (OpState.RUNNING, depth.running),
            (OpState.DEAD, depth.dead),
        ):
            key = (depth.provider, depth.lane, state)
            totals[key] = totals.get(key, 0) + count
        age_s = depth.oldest_pending_age_s(now)
        if age_s is not None:
            key2 = (depth.provider, depth.lane)
            oldest[key2] = max(oldest.get(key2, 0.0), age_s)
    metrics.queue_operations.clear()
    metrics.queue_oldest_pending_age.clear()
    for labels, count in totals.items():
        metrics.queue_operations.labels(*labels).set(count)
    for labels2, age_s in oldest.items():
        metrics.queue_oldest_pending_age.labels(*labels2).set(age_s)


@dataclass(frozen=True, slots=True)
class DeadOperation:
    id: int
    kind: str
    mailbox: str
    lane: str
    tenant_id: str
    tenant_name: str
    batch_id: str | None
    activity_id: str | None
    user_id: str | None
    attempts: int
    last_error: str | None
    created_at: datetime
    failed_at: datetime

    @property
    def provider(self) -> str:
        return provider_of(self.mailbox)


async def dead_operations(
    session: AsyncSession, limit: int, before_id: int | None = None
) -> list[DeadOperation]:
    """Operations that gave up, newest first by id; up to ``limit + 1``."""
    limit = max(1, min(limit, LIST_LIMIT_MAX))
    query = (
        select(Operation, Tenant.name, ExternalEvent.activity_id, ExternalEvent.user_id)
        .join(Tenant, Tenant.id == Operation.tenant_id)
        .outerjoin(ExternalEvent, ExternalEvent.id == Operation.ledger_id)
        .where(Operation.state == OpState.DEAD)
    )
    if before_id is not None:
        query = query.where(Operation.id < before_id)
    rows = await session.execute(query.order_by(Operation.id.desc()).limit(limit + 1))
    return [
        DeadOperation(
            id=op.id,
            kind=op.kind,
            mailbox=op.mailbox,
            lane=op.lane,
            tenant_id=op.tenant_id,
            tenant_name=tenant_name,
            batch_id=op.batch_id,
            activity_id=activity_id,
            user_id=user_id,
            attempts=op.attempts,
            last_error=op.last_error,
            created_at=op.created_at,
            failed_at=op.updated_at,
        )
        for op, tenant_name, activity_id, user_id in rows
    ]


async def count_dead(session: AsyncSession) -> int:
    return int(
        await session.scalar(select(func.count()).where(Operation.state == OpState.DEAD)) or 0
    )


async def retry(db: Database, op_ids: Sequence[int] | None) -> int:
    """Dead operations (the given ones, or all for ``None``) back to pending; how many."""
    return await retry_dead(db, op_ids)


# --- Batches -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserProgress:
    id: str
    name: str
    sync: SyncCounts


@dataclass(frozen=True, slots=True)
class BatchProgress:
    id: str
    tenant_id: str
    tenant_name: str
    targetgroup_name: str
    state: str
    total: int
    created_at: datetime
    sync: SyncCounts
    users: tuple[UserProgress, ...]


async def batch_progress(session: AsyncSession) -> list[BatchProgress]:
    """Every batch with work left or given up (up to a cap), then the newest others;
    unfinished first, newest first within each group."""
    active = list(
        await session.scalars(
            select(Operation.batch_id)
            .where(Operation.state.in_(QUEUE_STATES), Operation.batch_id.is_not(None))
            .group_by(Operation.batch_id)
            .order_by(func.min(Operation.id).desc())
            .limit(ACTIVE_BATCHES_MAX)
        )
    )
    recent = list(
        await session.scalars(
            select(Batch.id)
            .order_by(Batch.created_at.desc(), Batch.id.desc())
            .limit(RECENT_BATCHES)
        )
    )
    ids = list(dict.fromkeys(str(i) for i in [*active, *recent]))
    if not ids:
        return []
    batches = (
        await session.execute(
            select(Batch, Tenant.name)
            .join(Tenant, Tenant.id == Batch.tenant_id)
            .where(Batch.id.in_(ids))
        )
    ).all()
    by_user: dict[str, dict[str, dict[str, int]]] = {}
    for chunk in chunks(ids):
        counted = await session.execute(
            select(ExternalEvent.batch_id, ExternalEvent.user_id, ExternalEvent.state, func.count())
            .where(ExternalEvent.batch_id.in_(chunk))
            .group_by(ExternalEvent.batch_id, ExternalEvent.user_id, ExternalEvent.state)
        )
        for batch_id, user_id, state, count in counted:
            by_user.setdefault(str(batch_id), {}).setdefault(user_id, {})[state] = count
    names = await _user_names(
        session, [(b.tenant_id, uid) for b, _ in batches for uid in by_user.get(b.id, {})]
    )
    out: list[BatchProgress] = []
    for batch, tenant_name in batches:
        users = by_user.get(batch.id, {})
        total_by_state: dict[str, int] = {}
        for states in users.values():
            for state, count in states.items():
                total_by_state[state] = total_by_state.get(state, 0) + count
        sync = counts_from(total_by_state)
        out.append(
            BatchProgress(
                id=batch.id,
                tenant_id=batch.tenant_id,
                tenant_name=tenant_name,
                targetgroup_name=batch.targetgroup_name,
                state=derive_state(batch.state, sync),
                total=batch.total,
                created_at=batch.created_at,
                sync=sync,
                users=tuple(
                    UserProgress(uid, names.get((batch.tenant_id, uid), uid), counts_from(s))
                    for uid, s in sorted(users.items())[:USERS_PER_BATCH_MAX]
                ),
            )
        )
    finished = (BatchState.SYNCED, BatchState.DELETED)
    out.sort(key=lambda b: b.created_at, reverse=True)
    out.sort(key=lambda b: b.state in finished)
    return out


async def _user_names(
    session: AsyncSession, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], str]:
    names: dict[tuple[str, str], str] = {}
    for chunk in chunks(sorted(set(keys))):
        rows = await session.execute(
            select(User.tenant_id, User.id, User.name).where(
                or_(*(and_(User.tenant_id == t, User.id == u) for t, u in chunk))
            )
        )
        for tenant_id, user_id, name in rows:
            names[(tenant_id, user_id)] = name or user_id
    return names


# --- Connection health ---------------------------------------------------------------------


@dataclass(slots=True)
class MailboxHealth:
    """``ok``, ``throttled`` (paused by the provider lately), ``failing`` (operations gave up)
    or ``reconnect_needed`` (the provider refused our credentials)."""

    mailbox: str
    status: str = "ok"
    last_cycle_at: datetime | None = None
    last_error: str | None = None
    dead: int = 0
    users: list[str] = field(default_factory=list)

    @property
    def provider(self) -> str:
        return provider_of(self.mailbox)


HEALTH_ORDER = {"reconnect_needed": 0, "failing": 1, "throttled": 2, "ok": 3}


async def mailbox_health(
    session: AsyncSession, now: datetime, lanes: Sequence[LaneDepth]
) -> list[MailboxHealth]:
    """Each mailbox seen lately or with queued work, the worst first."""
    health: dict[str, MailboxHealth] = {}
    last_cycles = await session.execute(
        select(SyncCycle.mailbox, SyncCycle.finished_at, SyncCycle.throttled, SyncCycle.done)
        .where(SyncCycle.started_at >= now - timedelta(seconds=HEALTH_WINDOW_S))
        .order_by(SyncCycle.started_at.desc(), SyncCycle.id.desc())
        .limit(HEALTH_CYCLES_MAX)
    )
    for mailbox, finished_at, throttled, done in last_cycles:
        if mailbox in health:
            continue
        entry = health[mailbox] = MailboxHealth(mailbox, last_cycle_at=finished_at)
        recent = (
            finished_at is not None and (now - finished_at).total_seconds() < THROTTLED_RECENT_S
        )
        if throttled and recent and not done:
            entry.status = "throttled"
    for depth in lanes:
        health.setdefault(depth.mailbox, MailboxHealth(depth.mailbox))
    dead = (
        await session.execute(
            select(
                Operation.mailbox,
                func.count(),
                func.max(Operation.id),
                func.sum(case((Operation.last_error.like(f"{AUTH_FAILED_PREFIX}%"), 1), else_=0)),
            )
            .where(Operation.state == OpState.DEAD)
            .group_by(Operation.mailbox)
        )
    ).all()
    newest = [newest_id for _, _, newest_id, _ in dead]
    errors = {
        op_id: error
        for chunk in chunks(newest)
        for op_id, error in await session.execute(
            select(Operation.id, Operation.last_error).where(Operation.id.in_(chunk))
        )
    }
    for mailbox, count, newest_id, auth_failed in dead:
        entry = health.setdefault(mailbox, MailboxHealth(mailbox))
        entry.dead, entry.last_error = count, errors.get(newest_id)
        entry.status = "reconnect_needed" if auth_failed else "failing"
    revoked = and_(
        Operation.state == OpState.PENDING,
        or_(
            Operation.last_error.like(f"{ConsentRevoked.code}:%"),
            Operation.last_error.like(f"{GrantRevoked.code}:%"),
        ),
    )
    waiting = await session.execute(
        select(Operation.mailbox, func.max(Operation.last_error))
        .where(revoked)
        .group_by(Operation.mailbox)
    )
    for mailbox, error in waiting:  # waiting for a new consent: nothing given up, but stuck
        entry = health.setdefault(mailbox, MailboxHealth(mailbox))
        entry.status, entry.last_error = "reconnect_needed", error
    users = await session.execute(
        select(Operation.mailbox, ExternalEvent.user_id)
        .join(ExternalEvent, ExternalEvent.id == Operation.ledger_id)
        .where(or_(Operation.state == OpState.DEAD, revoked))  # whom to ask to reconnect, too
        .group_by(Operation.mailbox, ExternalEvent.user_id)
        .limit(HEALTH_USERS_MAX)
    )
    for mailbox, user_id in users:
        health[mailbox].users.append(user_id)
    return sorted(health.values(), key=lambda h: (HEALTH_ORDER[h.status], h.mailbox))


# --- The dashboard's snapshot --------------------------------------------------------------

#: Rows of each list the dashboard shows (the ops endpoints page through all of them).
DASHBOARD_CYCLES = 25
DASHBOARD_DEAD = 50


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the dashboard shows at one instant, read in one session."""

    now: datetime
    cycles: list[CycleView]
    chart: list[Bucket]
    lanes: list[LaneDepth]
    dead: list[DeadOperation]
    dead_total: int
    batches: list[BatchProgress]
    health: list[MailboxHealth]


async def snapshot(session: AsyncSession, now: datetime) -> Snapshot:
    lanes = await queue_depth(session, now)
    return Snapshot(
        now=now,
        cycles=(await list_cycles(session, DASHBOARD_CYCLES))[:DASHBOARD_CYCLES],
        chart=await throughput(session, now),
        lanes=lanes,
        dead=(await dead_operations(session, DASHBOARD_DEAD))[:DASHBOARD_DEAD],
        dead_total=await count_dead(session),
        batches=await batch_progress(session),
        health=await mailbox_health(session, now, lanes),
    )
