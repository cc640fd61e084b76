"""The sync worker: claims due operations per mailbox, runs them through the rate limiter.

Shape of one worker process:

- a *dispatcher* loop polls for mailboxes with due operations and starts one *cycle* task per
  mailbox (never two in one process), up to ``MAX_MAILBOX_TASKS`` at once;
- a cycle claims small chunks of that mailbox's operations, interactive lane first, runs up to
  the mailbox's concurrency at once through the limiter, and ends after ``CYCLE_MAX_OPS`` so
  that no mailbox holds a task slot for long; each cycle is recorded (``sync_cycles``).

Claims are leases (``state='running'`` with ``not_before`` = lease end): a crashed worker's
operations become claimable again when the lease ends. The embedded default is one process, so
it frees every lease at start-up. On PostgreSQL, claims use ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, case, or_, select, update
from tenacity import RetryCallState, wait_exponential_jitter

from syncsvc import errors
from syncsvc.config import Settings
from syncsvc.limits import RateLimit
from syncsvc.providers.base import CalendarProvider, EventRef, EventSpec
from syncsvc.queue.ratelimit import Lease, RateLimiter
from syncsvc.queue.reconcile import Decision, decide, spec_for
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, Batch, ExternalEvent, Operation, SyncCycle, User
from syncsvc.store.types import utcnow

log = logging.getLogger("syncsvc.worker")

POLL_S = 0.2
CLAIM_TTL_S = 120.0
CYCLE_MAX_OPS = 200
MAX_MAILBOX_TASKS = 64
MAX_ATTEMPTS = 8
BACKOFF_MAX_S = 600.0
#: Google's throttling answers carry no Retry-After: back off from this, doubling per streak.
THROTTLE_BASE_S = 1.0
LANE_INTERACTIVE = "interactive"
FALLBACK_LIMIT = RateLimit(10, 1.0, 1)

ProviderFactory = Callable[[User], Awaitable[CalendarProvider]]


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a task handler may use: it raises ``syncsvc.errors`` to ask for a retry
    (``Throttled``, ``Transient``) or to give up (any other ``SyncSvcError``)."""

    settings: Settings
    db: Database
    providers: ProviderFactory


TaskHandler = Callable[[TaskContext, Operation], Awaitable[None]]


def backoff_s(attempt: int) -> float:
    """Exponential backoff with jitter (tenacity's formula) for the n-th failed attempt."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    return float(wait_exponential_jitter(initial=1, max=BACKOFF_MAX_S)(state))


@dataclass(slots=True)
class CycleStats:
    provider: str
    mailbox: str
    started_at: datetime = field(default_factory=utcnow)
    done: int = 0
    failed: int = 0
    throttled: int = 0


@dataclass(frozen=True, slots=True)
class _Claimed:
    op_id: int
    ledger_id: int | None
    kind: str


class Worker:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        limiter: RateLimiter,
        providers: ProviderFactory,
        *,
        embedded: bool,
        tasks: Mapping[str, TaskHandler] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.limiter = limiter
        self.providers = providers
        self.embedded = embedded
        #: Handlers of ledger-less operations by ``Operation.kind`` (see ``syncsvc/runtime.py``).
        self.tasks: Mapping[str, TaskHandler] = tasks or {}
        self._active: dict[str, asyncio.Task[None]] = {}
        self._throttle_streak: dict[str, int] = {}

    async def run(self, stop: asyncio.Event) -> None:
        if self.embedded:
            await self._free_all_claims()
        try:
            while not stop.is_set():
                for mailbox in await self._due_mailboxes():
                    if mailbox not in self._active and len(self._active) < MAX_MAILBOX_TASKS:
                        task = asyncio.create_task(self._cycle(mailbox, stop))
                        self._active[mailbox] = task
                        task.add_done_callback(self._forget_task)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL_S)
        finally:
            tasks = list(self._active.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        for mailbox, active in list(self._active.items()):
            if active is task:
                del self._active[mailbox]

    # --- claiming -------------------------------------------------------------------------

    async def _free_all_claims(self) -> None:
        async with self.db.session() as s, s.begin():
            await s.execute(
                update(Operation)
                .where(Operation.state == "running")
                .values(state="pending", not_before=utcnow())
            )

    async def _due_mailboxes(self) -> list[str]:
        now = utcnow()
        async with self.db.session() as s:
            rows = await s.execute(
                select(Operation.mailbox)
                .where(Operation.state.in_(("pending", "running")), Operation.not_before <= now)
                .group_by(Operation.mailbox)
                .order_by(
                    # mailboxes with interactive work first, then the longest waiting
                    case((Operation.lane == LANE_INTERACTIVE, 0), else_=1).label("l"),
                )
                .limit(MAX_MAILBOX_TASKS * 2)
            )
            return [r[0] for r in rows]

    async def _claim(self, mailbox: str, n: int) -> list[_Claimed]:
        now = utcnow()
        busy_ledgers = select(Operation.ledger_id).where(
            Operation.state == "running",
            Operation.not_before > now,
            Operation.ledger_id.is_not(None),
        )
        query = (
            select(Operation.id, Operation.ledger_id, Operation.kind)
            .where(
                Operation.mailbox == mailbox,
                Operation.state.in_(("pending", "running")),
                Operation.not_before <= now,
                or_(Operation.ledger_id.is_(None), Operation.ledger_id.not_in(busy_ledgers)),
            )
            .order_by(case((Operation.lane == LANE_INTERACTIVE, 0), else_=1), Operation.id)
            .limit(n)
        )
        if self.db.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        async with self.db.session() as s, s.begin():
            rows = (await s.execute(query)).all()
            seen: set[int] = set()
            claimed: list[_Claimed] = []
            for op_id, ledger_id, kind in rows:
                if ledger_id is not None:
                    if ledger_id in seen:
                        continue
                    seen.add(ledger_id)
                claimed.append(_Claimed(op_id, ledger_id, kind))
            if claimed:
                claimed_ids = [c.op_id for c in claimed]
                await s.execute(
                    update(Operation)
                    .where(Operation.id.in_(claimed_ids))
                    .values(state="running", not_before=now + timedelta(seconds=CLAIM_TTL_S))
                )
                # Other waiting operations of these rows are covered: the claimed ones act on
                # data read after this commit. Merging them saves a redundant call each.
                await s.execute(
                    update(Operation)
                    .where(
                        Operation.ledger_id.in_(seen),
                        Operation.state == "pending",
                        Operation.id.not_in(claimed_ids),
                    )
                    .values(state="done", last_error="merged")
                )
        return claimed

    # --- one cycle of one mailbox ---------------------------------------------------------

    async def _cycle(self, mailbox: str, stop: asyncio.Event) -> None:
        provider_name = mailbox.split(":", 1)[0]
        limit = self.settings.limits.get(provider_name, FALLBACK_LIMIT)
        stats = CycleStats(provider_name, mailbox)
        started = time.monotonic()
        try:
            while not stop.is_set() and stats.done + stats.failed < CYCLE_MAX_OPS:
                claimed = await self._claim(mailbox, max(limit.concurrency * 2, 4))
                if not claimed:
                    break
                sem = asyncio.Semaphore(limit.concurrency)

                async def run_one(c: _Claimed, sem: asyncio.Semaphore = sem) -> None:
                    async with sem:
                        await self._run_op(mailbox, limit, c, stats, stop)

                await asyncio.gather(*(run_one(c) for c in claimed))
        except Exception:
            # A bug must not end the worker silently: log it; the leases expire and retry.
            log.exception("sync.cycle.crashed mailbox=%s", mailbox)
        finally:
            if stats.done or stats.failed or stats.throttled:
                await self._record_cycle(stats)
                log.info(
                    "sync.cycle mailbox=%s done=%d failed=%d throttled=%d ms=%d",
                    mailbox,
                    stats.done,
                    stats.failed,
                    stats.throttled,
                    (time.monotonic() - started) * 1000,
                )

    async def _record_cycle(self, stats: CycleStats) -> None:
        async with self.db.session() as s, s.begin():
            s.add(
                SyncCycle(
                    provider=stats.provider,
                    mailbox=stats.mailbox,
                    started_at=stats.started_at,
                    finished_at=utcnow(),
                    done=stats.done,
                    failed=stats.failed,
                    throttled=stats.throttled,
                )
            )

    async def _acquire(self, mailbox: str, limit: RateLimit, stop: asyncio.Event) -> Lease | None:
        while not stop.is_set():
            try:
                got = await self.limiter.acquire(mailbox, limit)
            except errors.Transient as exc:
                log.warning("sync.limiter.unavailable mailbox=%s error=%s", mailbox, exc)
                got = exc.retry_after_s or 0.5
            if isinstance(got, Lease):
                return got
            await asyncio.sleep(min(max(got, 0.005), 1.0))
        return None

    async def _run_op(
        self,
        mailbox: str,
        limit: RateLimit,
        claimed: _Claimed,
        stats: CycleStats,
        stop: asyncio.Event,
    ) -> None:
        if claimed.ledger_id is None:
            await self._run_task(mailbox, limit, claimed, stats, stop)
            return
        loaded = await self._load(claimed.ledger_id)
        if loaded is None:
            await self._finish_op(claimed.op_id)
            return
        ledger, activity, user, batch_deleting = loaded
        decision = decide(ledger, activity, batch_deleting)
        lease = await self._acquire(mailbox, limit, stop)
        if lease is None:
            await self._requeue(claimed.op_id, 0.0, count_attempt=False)
            return
        try:
            provider = await self.providers(user)
            ref = await self._execute(provider, decision, ledger, spec_for(activity, user))
        except errors.Throttled as exc:
            stats.throttled += 1
            await self._throttled(mailbox, claimed.op_id, exc.retry_after_s)
            return
        except (errors.Transient, OSError, TimeoutError) as exc:
            stats.throttled += isinstance(exc, errors.Transient) and exc.retry_after_s is not None
            retry_after = exc.retry_after_s if isinstance(exc, errors.Transient) else None
            if retry_after:
                await self.limiter.pause(mailbox, retry_after)
            gave_up = await self._failed_attempt(claimed.op_id, ledger.id, str(exc), retry_after)
            stats.failed += gave_up
            return
        except errors.ProviderError as exc:
            log.warning("sync.op.failed mailbox=%s op=%d error=%s", mailbox, claimed.op_id, exc)
            await self._give_up(claimed.op_id, ledger.id, f"{exc.code}: {exc}")
            stats.failed += 1
            return
        finally:
            await self.limiter.release(lease)
        self._throttle_streak.pop(mailbox, None)
        await self._succeeded(claimed.op_id, ledger, decision, ref)
        stats.done += 1

    async def _run_task(
        self,
        mailbox: str,
        limit: RateLimit,
        claimed: _Claimed,
        stats: CycleStats,
        stop: asyncio.Event,
    ) -> None:
        """A ledger-less operation (a CRM callback, a calendar's incremental sync, …) runs its
        kind's handler under the same limits and retry rules as event operations."""
        handler = self.tasks.get(claimed.kind)
        if handler is None:
            await self._give_up_task(claimed.op_id, f"no handler for operation kind {claimed.kind}")
            stats.failed += 1
            return
        async with self.db.session() as s:
            op = await s.get(Operation, claimed.op_id)
        if op is None:
            return
        lease = await self._acquire(mailbox, limit, stop)
        if lease is None:
            await self._requeue(claimed.op_id, 0.0, count_attempt=False)
            return
        try:
            await handler(TaskContext(self.settings, self.db, self.providers), op)
        except errors.Throttled as exc:
            stats.throttled += 1
            await self._throttled(mailbox, claimed.op_id, exc.retry_after_s)
            return
        except (errors.Transient, OSError, TimeoutError) as exc:
            retry_after = exc.retry_after_s if isinstance(exc, errors.Transient) else None
            stats.failed += await self._failed_attempt(claimed.op_id, None, str(exc), retry_after)
            return
        except errors.SyncSvcError as exc:
            await self._give_up_task(claimed.op_id, f"{exc.code}: {exc}")
            stats.failed += 1
            return
        finally:
            await self.limiter.release(lease)
        await self._finish_op(claimed.op_id)
        stats.done += 1

    async def _give_up_task(self, op_id: int, error: str) -> None:
        async with self.db.session() as s, s.begin():
            await s.execute(
                update(Operation)
                .where(Operation.id == op_id)
                .values(state="dead", last_error=error[:2000], attempts=Operation.attempts + 1)
            )

    async def _execute(
        self,
        provider: CalendarProvider,
        decision: Decision,
        ledger: ExternalEvent,
        spec: EventSpec,
    ) -> EventRef | None:
        if decision.action == "create":
            return await provider.create(spec)
        if decision.action == "update":
            assert ledger.event_id is not None
            try:
                return await provider.update(EventRef(ledger.event_id, ledger.etag), spec)
            except errors.ProviderConflict:
                # Changed at the provider since our last write: update against its new version.
                fresh = await provider.find(spec.key)
                if fresh is None:
                    raise
                return await provider.update(fresh, spec)
        found: EventRef | None
        if decision.action == "delete":
            assert ledger.event_id is not None
            found = EventRef(ledger.event_id, ledger.etag)
        else:
            found = await provider.find(spec.key)
        if found is not None:
            await provider.delete(found)  # "already gone" counts as done (the Protocol's rule)
        return None

    # --- recording outcomes ---------------------------------------------------------------

    async def _load(self, ledger_id: int) -> tuple[ExternalEvent, Activity, User, bool] | None:
        async with self.db.session() as s:
            ledger = await s.get(ExternalEvent, ledger_id)
            if ledger is None:
                return None
            activity = await s.get(Activity, ledger.activity_id)
            if activity is None:
                return None
            user = await s.get(User, (activity.tenant_id, activity.user_id))
            if user is None:
                return None
            deleting = False
            if activity.batch_id is not None:
                batch = await s.get(Batch, activity.batch_id)
                deleting = batch is not None and batch.state in ("deleting", "deleted")
            return ledger, activity, user, deleting

    async def _succeeded(
        self, op_id: int, ledger: ExternalEvent, decision: Decision, ref: EventRef | None
    ) -> None:
        """Records the outcome; the state moves only if nobody changed the row meanwhile (a
        batch deleted while its create ran keeps ``pending_delete`` and its own operation)."""
        values: dict[str, object] = {"attempts": 0, "last_error": None}
        if ref is not None:
            values.update(event_id=ref.event_id, etag=ref.etag)
        async with self.db.session() as s, s.begin():
            await s.execute(
                update(ExternalEvent).where(ExternalEvent.id == ledger.id).values(**values)
            )
            await s.execute(
                update(ExternalEvent)
                .where(ExternalEvent.id == ledger.id, ExternalEvent.state == ledger.state)
                .values(state=decision.then)
            )
            await s.execute(update(Operation).where(Operation.id == op_id).values(state="done"))

    async def _finish_op(self, op_id: int) -> None:
        async with self.db.session() as s, s.begin():
            await s.execute(update(Operation).where(Operation.id == op_id).values(state="done"))

    async def _requeue(self, op_id: int, delay_s: float, *, count_attempt: bool) -> None:
        values: dict[str, object] = {
            "state": "pending",
            "not_before": utcnow() + timedelta(seconds=delay_s),
        }
        if count_attempt:
            values["attempts"] = Operation.attempts + 1
        async with self.db.session() as s, s.begin():
            await s.execute(update(Operation).where(Operation.id == op_id).values(**values))

    async def _throttled(self, mailbox: str, op_id: int, retry_after_s: float | None) -> None:
        """A throttled operation used none of its attempts; the whole mailbox pauses."""
        streak = self._throttle_streak.get(mailbox, 0) + 1
        self._throttle_streak[mailbox] = streak
        wait = retry_after_s
        if wait is None:
            wait = min(THROTTLE_BASE_S * 2 ** (streak - 1), 64.0) * (1 + random.random() / 2)
        await self.limiter.pause(mailbox, wait)
        await self._requeue(op_id, wait, count_attempt=False)

    async def _failed_attempt(
        self, op_id: int, ledger_id: int | None, error: str, retry_after_s: float | None
    ) -> bool:
        async with self.db.session() as s:
            attempts = (await s.get(Operation, op_id)) or None
            count = (attempts.attempts if attempts else 0) + 1
        if count >= MAX_ATTEMPTS:
            if ledger_id is None:
                await self._give_up_task(op_id, error)
            else:
                await self._give_up(op_id, ledger_id, error)
            return True
        async with self.db.session() as s, s.begin():
            await s.execute(
                update(Operation)
                .where(Operation.id == op_id)
                .values(
                    state="pending",
                    attempts=count,
                    last_error=error[:2000],
                    not_before=utcnow() + timedelta(seconds=retry_after_s or backoff_s(count)),
                )
            )
        return False

    async def _give_up(self, op_id: int, ledger_id: int, error: str) -> None:
        async with self.db.session() as s, s.begin():
            await s.execute(
                update(Operation)
                .where(Operation.id == op_id)
                .values(state="dead", last_error=error[:2000], attempts=Operation.attempts + 1)
            )
            await s.execute(
                update(ExternalEvent)
                .where(
                    ExternalEvent.id == ledger_id,
                    and_(ExternalEvent.state != "deleted", ExternalEvent.state != "synced"),
                )
                .values(state="failed", last_error=error[:2000])
            )


async def retry_dead(db: Database, op_ids: Sequence[int] | None = None) -> int:
    """Operator retry: dead operations (all, or the given ones) go back to pending with fresh
    attempts; their ledger rows return to the state the operation works towards."""
    async with db.session() as s, s.begin():
        query = select(Operation).where(Operation.state == "dead")
        if op_ids is not None:
            query = query.where(Operation.id.in_(list(op_ids)))
        ops = (await s.execute(query)).scalars().all()
        for op in ops:
            op.state, op.attempts, op.not_before = "pending", 0, utcnow()
            if op.ledger_id is not None:
                ledger = await s.get(ExternalEvent, op.ledger_id)
                if ledger is not None and ledger.state == "failed":
                    ledger.state = (
                        "pending_delete"
                        if op.kind == "delete"
                        else ("pending_update" if ledger.event_id else "pending_create")
                    )
        return len(ops)
