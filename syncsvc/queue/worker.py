"""The sync worker: claims due operations per mailbox, runs them through the rate limiter.

Shape of one worker process:

- a *dispatcher* loop polls for mailboxes with due operations and starts one *cycle* task per
  tenant's mailbox (never two in one process), up to ``MAX_MAILBOX_TASKS`` at once (16 on
  SQLite, fewer while the process is CPU-bound), shared fairly between tenants
  (``queue/fairness.py``: a tenant over its share while another waits ends cycles early);
  a cycle for a single change takes its connections from the database's urgent pool;
- a cycle claims small chunks of that mailbox's operations, interactive lane first, runs up to
  the mailbox's concurrency at once through the limiter, and claims the next chunk as soon as
  less than half of one is in hand (a pipeline: no token waits for a chunk's slowest call, and
  a single change waits behind half a chunk at most); it ends after ``CYCLE_MAX_OPS`` so
  that no mailbox holds a task slot for long; each cycle is recorded (``sync_cycles``);
- creates of one chunk go through the provider's batch endpoint (Graph ``$batch``, Google
  batch) when it has one: one grant of ``n`` tokens, and as many concurrency slots as the
  provider serves items of one batch at once.

Claims are short leases (``queue/claims.py``) that the worker renews while it holds them (a
heartbeat every ``HEARTBEAT_S``) and hands back when it stops; outcomes are recorded by
``queue/transitions.py``. The embedded default is one process, so it frees every lease at
start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from tenacity import RetryCallState, wait_exponential_jitter

from syncsvc import errors
from syncsvc.config import Settings
from syncsvc.limits import RateLimit
from syncsvc.metrics import SYNC_OPERATIONS
from syncsvc.providers.base import BatchResult, CalendarProvider, EventRef, EventSpec
from syncsvc.queue import claims, transitions
from syncsvc.queue import due as queue_due
from syncsvc.queue.claims import CLAIM_TTL_S, HEARTBEAT_S, Claimed, Loaded
from syncsvc.queue.due import Due
from syncsvc.queue.fairness import share_slots
from syncsvc.queue.ratelimit import LEASE_TTL_S, Lease, RateLimiter
from syncsvc.queue.reconcile import (
    Action,
    Decision,
    LedgerRow,
    decide,
    spec_for,
)
from syncsvc.queue.transitions import Success
from syncsvc.store.db import Database, is_unavailable
from syncsvc.store.models import Operation, SyncCycle, User
from syncsvc.store.types import utcnow
from syncsvc.tracing import operation_span

log = logging.getLogger("syncsvc.worker")

__all__ = ["CLAIM_TTL_S", "HEARTBEAT_S", "TaskContext", "TaskHandler", "Worker"]

POLL_S = 0.2
CYCLE_MAX_OPS = 200
MAX_MAILBOX_TASKS = 64
#: On SQLite every write waits for the one writer lock, taken by polling: more cycles than
#: this add no throughput, only a longer and unfair wait for a single change.
SQLITE_MAILBOX_TASKS = 16
#: A turn of the event loop (every ready task once) longer than ``LOOP_BUSY_S`` means the
#: process is bound by its CPU: more cycles would only queue up, and a single change would
#: wait behind all of them. The cycle limit then shrinks (to ``MIN_MAILBOX_TASKS`` at least)
#: and grows back by one per poll once turns are under ``LOOP_IDLE_S``.
LOOP_BUSY_S = 0.02
LOOP_IDLE_S = 0.005
MIN_MAILBOX_TASKS = 4
MAX_ATTEMPTS = 8
BACKOFF_MAX_S = 600.0
#: Google's throttling answers carry no Retry-After: back off from this, doubling per streak.
THROTTLE_BASE_S = 1.0
#: How often operations of a mailbox whose access was withdrawn look again (a new consent
#: wakes them at once).
REVOKED_PAUSE_S = 60.0
#: The limiter key of a provider's per-app limit (``app:graph``); no mailbox starts so.
APP_MAILBOX_PREFIX = "app:"
#: An operation waits in the process for a grant at most this long (a long pause, a busy
#: mailbox); then it goes back to the queue, so its claim never runs out while it waits.
HOLD_MAX_S = 10.0
#: A limiter that cannot be reached when a lease ends is asked again this often, until the
#: lease would have expired anyway.
RELEASE_RETRY_S = 0.5
FALLBACK_LIMIT = RateLimit(10, 1.0, 1)

ProviderFactory = Callable[[User], Awaitable[CalendarProvider]]
#: Whether the running cycle serves a single change: its database work then skips the queue
#: of bulk work for a connection (``Database.session(urgent=True)``).
_URGENT: ContextVar[bool] = ContextVar("urgent", default=False)


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a task handler may use: it raises ``syncsvc.errors`` to ask for a retry
    (``Throttled``, ``Transient``) or to give up (any other ``SyncSvcError``)."""

    settings: Settings
    db: Database
    providers: ProviderFactory


TaskHandler = Callable[[TaskContext, Operation], Awaitable[None]]
#: Told (tenant, mailbox, error) when a provider no longer grants access to a mailbox.
RevokedHook = Callable[[str, str, errors.ConsentRevoked], Awaitable[None]]


#: Errors that say "not now" rather than "this operation failed": waited out, no attempt used.
_WAIT_OUT = (errors.Throttled, errors.Unreachable)


async def _loop_turn_s() -> float:
    """How long one turn of the event loop takes now: the time to get back after yielding."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.sleep(0)
    return loop.time() - started


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
class _Job:
    """A claimed ledger operation with the fresh data its decision was taken on."""

    claimed: Claimed
    ledger: LedgerRow
    decision: Decision
    spec: EventSpec
    provider: CalendarProvider


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
        on_revoked: RevokedHook | None = None,
        slots: int | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.limiter = limiter
        self.providers = providers
        self.embedded = embedded
        #: Handlers of ledger-less operations by ``Operation.kind`` (see ``syncsvc/runtime.py``).
        self.tasks: Mapping[str, TaskHandler] = tasks or {}
        #: Told (tenant, provider, error) when a provider says our access was withdrawn.
        self.on_revoked = on_revoked
        #: Mailbox cycles at once in this process, shared fairly between tenants; and the
        #: current limit, below it while the process is CPU-bound.
        if slots is None:
            slots = MAX_MAILBOX_TASKS if db.dialect == "postgresql" else SQLITE_MAILBOX_TASKS
        self.slots = slots
        self._limit = slots
        self._turn_s = 0.0  # a moving average of the event loop's turns
        #: Running cycles by (tenant, mailbox): one per pair in a process.
        self._active: dict[tuple[str, str], asyncio.Task[None]] = {}
        #: Per tenant, cycles to end early because other tenants wait for a slot; and the
        #: cycles ending so (their slots are as good as free).
        self._give_back: dict[str, int] = {}
        self._yielding: set[tuple[str, str]] = set()
        #: Per mailbox: pauses in a row without a success, and when the current one ends.
        self._throttle_streak: dict[str, tuple[int, float]] = {}
        #: Creates per batched call last seen for a mailbox: sizes its next claims.
        self._batch_size: dict[str, int] = {}
        self._background: set[asyncio.Task[None]] = set()
        #: Operations this worker holds → the lease end it last wrote for them and the cycle
        #: holding them: only a live cycle's claims are renewed.
        self._held: dict[int, tuple[datetime, asyncio.Task[Any] | None]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        if self.embedded:
            await self._free_all_claims()
        background = [self._heartbeat(stop)]
        if self.db.dialect == "postgresql":
            background.append(self._sweep(stop))
        for job in background:
            task = asyncio.create_task(job)
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        try:
            while not stop.is_set():
                self._adapt_limit(await _loop_turn_s())
                self._dispatch(await self._due_mailboxes(), stop)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL_S)
        finally:
            tasks = [*self._active.values(), *self._background]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _dispatch(self, due: Sequence[Due], stop: asyncio.Event) -> None:
        """Starts cycles for due mailboxes, sharing the slots fairly between tenants."""
        urgent = {(d.tenant, d.mailbox) for d in due if d.interactive}
        active: dict[str, int] = {}
        for key in self._active.keys() - self._yielding:
            active[key[0]] = active.get(key[0], 0) + 1
        waiting: dict[str, list[str]] = {}
        for d in due:
            if (d.tenant, d.mailbox) not in self._active:
                waiting.setdefault(d.tenant, []).append(d.mailbox)
        shares = share_slots(active, waiting, self._limit - len(self._yielding))
        self._give_back = shares.give_back
        for key in shares.start:
            task = asyncio.create_task(self._cycle(*key, stop, urgent=key in urgent))
            self._active[key] = task
            task.add_done_callback(self._forget_task)

    def _adapt_limit(self, turn_s: float) -> None:
        """Fewer cycles while the loop's turns are slow, more again once they are quick."""
        self._turn_s = 0.7 * self._turn_s + 0.3 * turn_s
        if self._turn_s > LOOP_BUSY_S:
            self._limit = max(MIN_MAILBOX_TASKS, self._limit - max(1, self._limit // 8))
        elif self._turn_s < LOOP_IDLE_S:
            self._limit = min(self.slots, self._limit + 1)

    def _yields(self, tenant: str, mailbox: str) -> bool:
        """Whether a cycle should claim no more: another tenant waits for its slot (see
        ``queue/fairness.py``)."""
        owed = self._give_back.get(tenant, 0)
        if owed > 0:
            self._give_back[tenant] = owed - 1
            self._yielding.add((tenant, mailbox))
            return True
        return False

    def _session(self) -> AsyncSession:
        """A session from the pool of this cycle's kind (see ``_cycle``)."""
        return self.db.session(urgent=_URGENT.get())

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        for key, active in list(self._active.items()):
            if active is task:
                del self._active[key]
                self._yielding.discard(key)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Its record could not be written (the database went away): said once.
            if is_unavailable(exc):
                self.db.unavailable(exc)  # watched until it answers, so its end is logged too
            else:
                log.error("sync.cycle.unrecorded error=%r", exc)

    # --- claiming -------------------------------------------------------------------------

    async def _free_all_claims(self) -> None:
        async with self._session() as s, s.begin():
            await claims.free_all(s)

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        """Renews the leases of every operation still held, so they outlive slow calls."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_S)
            if self._held and not stop.is_set():
                try:
                    await self._renew()
                except Exception as exc:
                    # The leases may lapse (compare-and-set keeps the rows safe); the outage
                    # is the dispatcher's to report, once, with its recovery.
                    if not is_unavailable(exc):
                        raise

    async def _renew(self) -> None:
        _URGENT.set(True)  # a late renewal would let claims lapse
        by_lease: dict[datetime, list[int]] = {}
        for op_id, (lease_end, holder) in list(self._held.items()):
            if holder is None or holder.done():  # its cycle is gone: the lease may lapse
                del self._held[op_id]
            else:
                by_lease.setdefault(lease_end, []).append(op_id)
        async with self._session() as s, s.begin():
            new_end = await claims.renew(s, by_lease)
        for lease_ids in by_lease.values():
            for op_id in lease_ids:
                if op_id in self._held:
                    self._held[op_id] = (new_end, self._held[op_id][1])

    async def _hand_back(self, op_ids: Sequence[int]) -> None:
        """Claims of a stopping cycle that are still running go back to pending at once (no
        attempt spent); a crash between a provider's answer and here is the create-adoption
        case every operation already survives."""
        by_lease: dict[datetime, list[int]] = {}
        for op_id in op_ids:
            if op_id in self._held:
                by_lease.setdefault(self._held.pop(op_id)[0], []).append(op_id)
        if not by_lease:
            return
        async with self._session() as s, s.begin():
            await claims.hand_back(s, by_lease)

    async def _due_mailboxes(self) -> list[Due]:
        """(tenant, mailbox) with due operations: per tenant, those with interactive work
        first, then the longest waiting, at most a slot count each (so that one tenant's
        thousands of mailboxes never hide another's one). See ``queue/due.py``."""
        find = queue_due.by_table if self.db.dialect == "postgresql" else queue_due.by_grouping
        async with self.db.session(urgent=True) as s:
            # Enough rows for every cycle the dispatcher could start, past those running.
            return await find(s, utcnow(), self.slots, 2 * self.slots + len(self._active))

    async def _sweep(self, stop: asyncio.Event) -> None:
        """PostgreSQL: repeats the full grouping of ``queue/due.py`` now and then."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), queue_due.SWEEP_S)
            if stop.is_set():
                return
            try:
                async with self.db.session() as s, s.begin():
                    await queue_due.sweep(s)
            except Exception as exc:
                if not is_unavailable(exc):
                    raise

    async def _settle(self, tenant: str, mailbox: str) -> None:
        """PostgreSQL: the mailbox's next due time, now that its cycle is over."""
        if self.db.dialect != "postgresql":
            return
        try:
            async with self._session() as s, s.begin():
                await queue_due.settle(s, tenant, mailbox)
        except Exception as exc:  # it stays due earlier: a later cycle settles it
            if not is_unavailable(exc):
                raise

    async def _claim(self, tenant: str, mailbox: str, n: int) -> tuple[list[Claimed], Loaded]:
        """Claims a chunk and reads its ledger rows in the same transaction: a statement after
        the claim's sees every change committed before it, as a read after the commit would,
        and the chunk costs one transaction instead of two."""
        async with self._session() as s, s.begin():
            row_locks = self.db.dialect == "postgresql"
            claimed, lease_end = await claims.claim(s, tenant, mailbox, n, row_locks=row_locks)
            ledger_ids = [c.ledger_id for c in claimed if c.ledger_id is not None]
            loaded = await claims.load(s, ledger_ids) if ledger_ids else {}
        holder = asyncio.current_task()
        for c in claimed:
            self._held[c.op_id] = (lease_end, holder)
        return claimed, loaded

    # --- one cycle of one mailbox ---------------------------------------------------------

    async def _cycle(
        self, tenant: str, mailbox: str, stop: asyncio.Event, *, urgent: bool = False
    ) -> None:
        """Works one mailbox as a pipeline: more operations are claimed (interactive first)
        whenever fewer than half a chunk is left in hand, so the limiter's tokens never wait
        for a chunk's slowest call, and a single change waits behind half a chunk at most.
        A cycle started for interactive work takes its connections from the urgent pool."""
        _URGENT.set(urgent)  # this task's own context, and its work tasks'

        provider_name = mailbox.split(":", 1)[0]
        limit = self.settings.limits.get(provider_name, FALLBACK_LIMIT)
        stats = CycleStats(provider_name, mailbox)
        started = time.monotonic()
        sem = asyncio.Semaphore(limit.concurrency)
        running: dict[asyncio.Task[None], int] = {}  # work in hand → operations it carries
        mine: list[int] = []  # every operation this cycle claimed
        claimed_total = 0
        try:
            while not stop.is_set():
                size = max(limit.concurrency * 2, 4, self._batch_size.get(mailbox, 1) * 2)
                in_hand = sum(running.values())
                claimed: list[Claimed] = []
                loaded: Loaded = {}
                if claimed_total < CYCLE_MAX_OPS and self._yields(tenant, mailbox):
                    claimed_total = CYCLE_MAX_OPS  # its slot goes to another tenant
                if claimed_total < CYCLE_MAX_OPS and in_hand <= size // 2:
                    claimed, loaded = await self._claim(tenant, mailbox, size - in_hand)
                    claimed_total += len(claimed)
                    mine.extend(c.op_id for c in claimed)
                for work, ops in await self._plan(mailbox, limit, claimed, loaded, stats, stop):
                    running[asyncio.create_task(_guarded(sem, work))] = ops
                if not running:
                    if claimed:
                        continue  # all of them needed nothing; look for more
                    break
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    del running[task]
                    task.result()  # a bug in the work surfaces here
        except Exception as exc:
            # A bug must not end the worker silently: log it; the leases expire and retry.
            if is_unavailable(exc):
                self.db.unavailable(exc)  # one line per outage (and its end), no traceback
            else:
                log.exception("sync.cycle.crashed mailbox=%s", mailbox)
        finally:
            for task in running:
                task.cancel()
            try:
                await asyncio.gather(*running, return_exceptions=True)
            finally:
                # Even when this cycle is cancelled: ``_hand_back`` lets go of ``mine`` in
                # ``_held`` before its first await, so the heartbeat stops renewing them.
                try:
                    await self._hand_back(mine)
                except Exception as exc:  # the leases run out instead; the dispatcher says so
                    if not is_unavailable(exc):
                        raise
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
            # Last: until it runs, the mailbox only looks due (a lower bound, queue/due.py).
            await self._settle(tenant, mailbox)

    async def _record_cycle(self, stats: CycleStats) -> None:
        for outcome, count in (
            ("done", stats.done),
            ("failed", stats.failed),
            ("throttled", stats.throttled),
        ):
            if count:
                SYNC_OPERATIONS.labels(stats.provider, outcome).inc(count)
        async with self._session() as s, s.begin():
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

    async def _plan(
        self,
        mailbox: str,
        limit: RateLimit,
        claimed: Sequence[Claimed],
        loaded: Loaded,
        stats: CycleStats,
        stop: asyncio.Event,
    ) -> list[tuple[Callable[[], Awaitable[None]], int]]:
        """The work for a claimed chunk, with the number of operations each piece carries:
        creates in batched calls where the provider has them, the rest one call each. Work is
        returned unstarted, so work cancelled before it starts leaves no coroutine behind."""
        work: list[tuple[Callable[[], Awaitable[None]], int]] = [
            (partial(self._run_task, mailbox, limit, c, stats, stop), 1)
            for c in claimed
            if c.ledger_id is None
        ]
        creates: dict[int, list[_Job]] = {}
        ledger_ops = [c for c in claimed if c.ledger_id]
        for job in await self._prepare(mailbox, ledger_ops, loaded, stats):
            if job.decision.action == Action.CREATE and job.provider.batch_max > 1:
                creates.setdefault(id(job.provider), []).append(job)
            else:
                work.append((partial(self._run_one, mailbox, limit, job, stats, stop), 1))
        for jobs in creates.values():
            size = max(1, min(jobs[0].provider.batch_max, limit.capacity))
            self._batch_size[mailbox] = size
            for start in range(0, len(jobs), size):
                group = jobs[start : start + size]
                if len(group) == 1:
                    work.append((partial(self._run_one, mailbox, limit, group[0], stats, stop), 1))
                else:
                    run = partial(self._run_batch, mailbox, limit, group, stats, stop)
                    work.append((run, len(group)))
        return work

    async def _prepare(
        self, mailbox: str, claimed: Sequence[Claimed], loaded: Loaded, stats: CycleStats
    ) -> list[_Job]:
        """Decides on the ledger rows read with the claim; operations whose row or activity
        is gone are done."""
        jobs: list[_Job] = []
        for c in claimed:
            found = loaded.get(c.ledger_id) if c.ledger_id is not None else None
            if found is None:
                await self._finish_op(c.op_id)
                continue
            ledger, activity, user, batch_deleting = found
            try:
                provider = await self.providers(user)
                spec = spec_for(activity, user)
            except errors.ProviderError as exc:
                log.warning("sync.op.failed mailbox=%s op=%d error=%s", mailbox, c.op_id, exc)
                await self._give_up(c.op_id, ledger.id, f"{exc.code}: {exc}")
                stats.failed += 1
                continue
            except Exception as exc:  # one bad row fails alone
                error = _unexpected(exc, mailbox, c.op_id)
                stats.failed += await self._failed_attempt(c.op_id, ledger.id, str(error), None)
                continue
            decision = decide(ledger, activity, batch_deleting)
            jobs.append(_Job(c, ledger, decision, spec, provider))
        return jobs

    async def _acquire(
        self, mailbox: str, limit: RateLimit, stop: asyncio.Event, n: int = 1, slots: int = 1
    ) -> Lease | float:
        """A lease, or the seconds after which to requeue the operation instead: when the
        mailbox is paused for long, the wait has lasted ``HOLD_MAX_S``, or we are stopping."""
        give_back_at = time.monotonic() + HOLD_MAX_S
        while not stop.is_set():
            try:
                got = await self.limiter.acquire(mailbox, limit, n, slots)
            except errors.Transient as exc:
                log.warning("sync.limiter.unavailable mailbox=%s error=%s", mailbox, exc)
                got = exc.retry_after_s or 0.5
            if isinstance(got, Lease):
                refused = await self._app_tokens(mailbox, n)
                if refused is None:
                    return got
                # The mailbox's tokens are spent; the app's limit is far larger and rarely
                # binds, so asking it second wastes little.
                await self._release(got)
                got = refused
            if got > HOLD_MAX_S or time.monotonic() + got > give_back_at:
                return got
            await asyncio.sleep(min(max(got, 0.005), 1.0))
        return 0.0

    async def _app_tokens(self, mailbox: str, n: int) -> float | None:
        """Takes ``n`` tokens from the provider's per-app limit, if it has one: ``None`` when
        granted (or when the limiter cannot be reached: the mailbox limits still hold), else
        the seconds to wait."""
        provider = mailbox.split(":", 1)[0]
        limit = self.settings.app_limits.get(provider)
        if limit is None:
            return None
        try:
            key = f"{APP_MAILBOX_PREFIX}{provider}"
            got = await self.limiter.acquire(key, limit, min(n, limit.capacity))
        except errors.Transient:
            return None
        if isinstance(got, Lease):
            await self._release(got)
            return None
        return got

    async def _release(self, lease: Lease) -> None:
        """Frees the lease's slots. An unreachable limiter (Redis restarting) must not cost the
        outcome in hand: the release is retried in the background, and the slots expire anyway."""
        try:
            await self.limiter.release(lease)
        except errors.Transient:
            task = asyncio.create_task(self._release_later(lease))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _release_later(self, lease: Lease) -> None:
        deadline = time.monotonic() + LEASE_TTL_S
        while time.monotonic() < deadline:
            await asyncio.sleep(RELEASE_RETRY_S)
            try:
                await self.limiter.release(lease)
            except errors.Transient:
                continue
            return

    async def _pause(self, mailbox: str, seconds: float) -> None:
        """Honours Retry-After in the shared limiter; if it cannot be reached, the requeued
        operations still wait out ``seconds`` (their ``not_before``)."""
        try:
            await self.limiter.pause(mailbox, seconds)
        except errors.Transient as exc:
            log.warning("sync.limiter.unavailable mailbox=%s error=%s", mailbox, exc)

    async def _run_one(
        self, mailbox: str, limit: RateLimit, job: _Job, stats: CycleStats, stop: asyncio.Event
    ) -> None:
        got = await self._acquire(mailbox, limit, stop)
        if not isinstance(got, Lease):
            await self._requeue([job.claimed.op_id], got, count_attempt=False)
            return
        try:
            with operation_span(
                f"sync.{job.decision.action}",
                [job.claimed.trace],
                {"syncsvc.mailbox": mailbox, "syncsvc.operation": job.claimed.op_id},
            ):
                ref = await self._execute(job.provider, job.decision, job.ledger, job.spec)
        except (errors.ProviderError, OSError, TimeoutError) as exc:
            await self._record_errors(mailbox, [(job, _as_provider_error(exc))], stats)
            return
        except Exception as exc:  # a bug in an adapter fails this operation alone
            error = _unexpected(exc, mailbox, job.claimed.op_id)
            await self._record_errors(mailbox, [(job, error)], stats)
            return
        finally:
            await self._release(got)
        self._throttle_streak.pop(mailbox, None)
        await self._succeeded([(job, ref)])
        stats.done += 1

    async def _run_batch(
        self,
        mailbox: str,
        limit: RateLimit,
        jobs: Sequence[_Job],
        stats: CycleStats,
        stop: asyncio.Event,
    ) -> None:
        """Creates ``jobs`` in one batched call: ``n`` tokens, and a slot per item the provider
        serves at once (Graph: items to one mailbox count against its concurrency)."""
        n = len(jobs)
        got = await self._acquire(mailbox, limit, stop, n, min(n, limit.concurrency))
        if not isinstance(got, Lease):
            await self._requeue([j.claimed.op_id for j in jobs], got, count_attempt=False)
            return
        try:
            with operation_span(
                "sync.create_many",
                [j.claimed.trace for j in jobs],
                {"syncsvc.mailbox": mailbox, "syncsvc.operations": len(jobs)},
            ):
                results: Sequence[BatchResult] = await jobs[0].provider.create_many(
                    [j.spec for j in jobs]
                )
        except (errors.ProviderError, OSError, TimeoutError) as exc:
            error = _as_provider_error(exc)
            results = [BatchResult(j.spec.key, error=error) for j in jobs]
        except Exception as exc:  # a bug in an adapter fails these operations alone
            error = _unexpected(exc, mailbox, jobs[0].claimed.op_id)
            results = [BatchResult(j.spec.key, error=error) for j in jobs]
        finally:
            await self._release(got)
        failures: list[tuple[_Job, errors.ProviderError]] = []
        succeeded: list[tuple[_Job, EventRef | None]] = []
        for index, job in enumerate(jobs):
            result = results[index] if index < len(results) else None
            if result is not None and result.ref is not None and result.error is None:
                succeeded.append((job, result.ref))
            else:
                item_error = result.error if result is not None else None
                failures.append((job, item_error or errors.Transient("batch item not answered")))
        if succeeded:
            self._throttle_streak.pop(mailbox, None)
            await self._succeeded(succeeded)
            stats.done += len(succeeded)
        await self._record_errors(mailbox, failures, stats)

    async def _record_errors(
        self,
        mailbox: str,
        failures: Sequence[tuple[_Job, errors.ProviderError]],
        stats: CycleStats,
    ) -> None:
        """Throttling and an unreachable server pause the mailbox and use no attempt (one
        pause for the whole lot); other transient errors use an attempt; anything else gives
        up (api-contract.md)."""
        waiting = [(j, e) for j, e in failures if isinstance(e, _WAIT_OUT)]
        if waiting:
            stats.throttled += len(waiting)
            known = [e.retry_after_s for _, e in waiting if e.retry_after_s is not None]
            await self._throttled(
                mailbox, [j.claimed.op_id for j, _ in waiting], max(known) if known else None
            )
        revoked = [(j, e) for j, e in failures if isinstance(e, errors.ConsentRevoked)]
        if revoked:
            await self._revoked(
                mailbox,
                revoked[0][0].ledger.tenant_id,
                [j.claimed.op_id for j, _ in revoked],
                revoked[0][1],
            )
        for job, exc in failures:
            if isinstance(exc, (*_WAIT_OUT, errors.ConsentRevoked)):
                continue
            if isinstance(exc, errors.Transient):
                retry_after = exc.retry_after_s
                if retry_after:
                    stats.throttled += 1
                    await self._pause(mailbox, retry_after)
                stats.failed += await self._failed_attempt(
                    job.claimed.op_id, job.ledger.id, str(exc), retry_after
                )
                continue
            log.warning("sync.op.failed mailbox=%s op=%d error=%s", mailbox, job.claimed.op_id, exc)
            await self._give_up(job.claimed.op_id, job.ledger.id, f"{exc.code}: {exc}")
            stats.failed += 1

    async def _run_task(
        self,
        mailbox: str,
        limit: RateLimit,
        claimed: Claimed,
        stats: CycleStats,
        stop: asyncio.Event,
    ) -> None:
        """A ledger-less operation (a CRM callback, a calendar's incremental sync, …) runs its
        kind's handler under the same limits and retry rules as event operations."""
        handler = self.tasks.get(claimed.kind)
        if handler is None:
            await self._give_up(
                claimed.op_id, None, f"no handler for operation kind {claimed.kind}"
            )
            stats.failed += 1
            return
        async with self._session() as s:
            op = await s.get(Operation, claimed.op_id)
        if op is None:
            return
        got = await self._acquire(mailbox, limit, stop)
        if not isinstance(got, Lease):
            await self._requeue([claimed.op_id], got, count_attempt=False)
            return
        try:
            # The trace that queued it (a webhook's, a CRM request's): what the task queues in
            # turn, a callback say, carries it on.
            with operation_span(
                f"task.{claimed.kind}",
                [claimed.trace],
                {"syncsvc.mailbox": mailbox, "syncsvc.operation": claimed.op_id},
            ):
                await handler(TaskContext(self.settings, self.db, self.providers), op)
        except (*_WAIT_OUT, OSError, TimeoutError) as exc:  # not now: waited out, no attempt
            stats.throttled += 1
            retry_after = exc.retry_after_s if isinstance(exc, _WAIT_OUT) else None
            await self._throttled(mailbox, [claimed.op_id], retry_after)
            return
        except errors.Transient as exc:
            stats.failed += await self._failed_attempt(
                claimed.op_id, None, str(exc), exc.retry_after_s
            )
            return
        except errors.ConsentRevoked as exc:
            await self._revoked(mailbox, op.tenant_id, [claimed.op_id], exc)
            return
        except errors.SyncSvcError as exc:
            await self._give_up(claimed.op_id, None, f"{exc.code}: {exc}")
            stats.failed += 1
            return
        except Exception as exc:  # a bug in a handler fails this operation alone
            error = _unexpected(exc, mailbox, claimed.op_id)
            stats.failed += await self._failed_attempt(claimed.op_id, None, str(error), None)
            return
        finally:
            await self._release(got)
        await self._finish_op(claimed.op_id)
        stats.done += 1

    async def _execute(
        self,
        provider: CalendarProvider,
        decision: Decision,
        ledger: LedgerRow,
        spec: EventSpec,
    ) -> EventRef | None:
        if decision.action == Action.CREATE:
            return await provider.create(spec)
        if decision.action == Action.UPDATE:
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
        if decision.action == Action.DELETE:
            assert ledger.event_id is not None
            found = EventRef(ledger.event_id, ledger.etag)
        else:
            found = await provider.find(spec.key)
        if found is not None:
            await provider.delete(found)  # "already gone" counts as done (the Protocol's rule)
        return None

    # --- recording outcomes ---------------------------------------------------------------

    async def _succeeded(self, outcomes: Sequence[tuple[_Job, EventRef | None]]) -> None:
        """Records outcomes in one transaction (``transitions.succeeded``)."""
        if not outcomes:
            return
        rows = [
            Success(
                job.claimed.op_id,
                job.ledger.id,
                job.ledger.state,
                job.decision.then,
                ref.event_id if ref else None,
                ref.etag if ref else None,
            )
            for job, ref in outcomes
        ]
        async with self._session() as s, s.begin():
            await transitions.succeeded(s, rows)
        for row in rows:  # nothing left to hand back
            self._held.pop(row.op_id, None)

    async def _finish_op(self, op_id: int) -> None:
        async with self._session() as s, s.begin():
            await transitions.done(s, [op_id])
        self._held.pop(op_id, None)

    async def _requeue(
        self,
        op_ids: Sequence[int],
        delay_s: float,
        *,
        count_attempt: bool,
        error: str | None = None,
    ) -> None:
        async with self._session() as s, s.begin():
            await transitions.requeue(s, op_ids, delay_s, count_attempt=count_attempt, error=error)
        for op_id in op_ids:
            self._held.pop(op_id, None)

    async def _throttled(
        self, mailbox: str, op_ids: Sequence[int], retry_after_s: float | None
    ) -> None:
        """Throttled operations use none of their attempts; the whole mailbox pauses.

        Without a ``Retry-After`` the pause doubles with each pause in a row; operations that
        fail during the current pause (concurrent ones, a batch's items) join it instead of
        doubling it once each."""
        streak, until = self._throttle_streak.get(mailbox, (0, 0.0))
        now = time.monotonic()
        wait = retry_after_s
        if wait is None and until > now:
            wait = until - now
        elif wait is None:
            streak += 1
            wait = min(THROTTLE_BASE_S * 2 ** (streak - 1), 64.0) * (1 + random.random() / 2)
        self._throttle_streak[mailbox] = (streak, max(until, now + wait))
        await self._pause(mailbox, wait)
        await self._requeue(op_ids, wait, count_attempt=False)

    async def _revoked(
        self, mailbox: str, tenant_id: str, op_ids: Sequence[int], exc: errors.ConsentRevoked
    ) -> None:
        """Access was withdrawn: the operations wait (no attempt used) and are tried again
        every ``REVOKED_PAUSE_S`` or as soon as access is granted again."""
        error = f"{exc.code}: {exc}"
        log.warning("sync.access.revoked mailbox=%s error=%s", mailbox, exc)
        # Not a limiter pause: a new consent must be able to wake them (``not_before``) at once.
        await self._requeue(op_ids, REVOKED_PAUSE_S, count_attempt=False, error=error)
        if self.on_revoked is not None:
            try:
                await self.on_revoked(tenant_id, mailbox, exc)
            except Exception as hook_exc:
                if not is_unavailable(hook_exc):
                    raise
                log.warning("sync.access.revoked.unrecorded mailbox=%s", mailbox)

    async def _failed_attempt(
        self, op_id: int, ledger_id: int | None, error: str, retry_after_s: float | None
    ) -> bool:
        """An attempt is spent: ``True`` if it was the last (the operation is dead)."""
        async with self._session() as s:
            count = await transitions.attempts_of(s, op_id) + 1
        if count >= MAX_ATTEMPTS:
            await self._give_up(op_id, ledger_id, error)
            return True
        await self._requeue(
            [op_id], retry_after_s or backoff_s(count), count_attempt=True, error=error
        )
        return False

    async def _give_up(self, op_id: int, ledger_id: int | None, error: str) -> None:
        async with self._session() as s, s.begin():
            await transitions.give_up(s, op_id, ledger_id, error)
        self._held.pop(op_id, None)


def _unexpected(exc: Exception, mailbox: str, op_id: int) -> errors.Transient:
    """An exception nobody translated (a bug, or data an adapter cannot take): logged with
    its traceback, and an attempt of this operation only, so it ends ``dead`` with the error
    after its attempts while the mailbox's other work goes on. A database outage is not one:
    the cycle handles that."""
    if is_unavailable(exc):
        raise exc
    log.exception("sync.op.unexpected mailbox=%s op=%d", mailbox, op_id)
    error = errors.Transient(f"unexpected {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _as_provider_error(exc: BaseException) -> errors.ProviderError:
    """Network trouble outside an adapter's own translation is a transient provider error."""
    if isinstance(exc, errors.ProviderError):
        return exc
    error: errors.Transient
    if isinstance(exc, (OSError, TimeoutError)):
        error = errors.Unreachable(f"{type(exc).__name__}: {exc}")
    else:
        error = errors.Transient(f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


async def _guarded(sem: asyncio.Semaphore, work: Callable[[], Awaitable[None]]) -> None:
    async with sem:
        await work()
