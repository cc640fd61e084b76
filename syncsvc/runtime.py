"""Assembles the long-running parts of a process: sync workers, their task handlers, scheduler.

It sits above every layer, so it may wire ``service`` handlers into the ``queue`` worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from syncsvc.changes import caldav, google, graph
from syncsvc.config import Settings
from syncsvc.queue.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from syncsvc.queue.worker import TaskHandler, Worker
from syncsvc.scheduler import run_scheduler
from syncsvc.service import callbacks, connections
from syncsvc.service.connections import UserProviders
from syncsvc.service.retention import RetentionPolicy, run_retention
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import RECONNECT_MAX_S, Database, is_unavailable
from syncsvc.store.states import OpKind

log = logging.getLogger("syncsvc.runtime")

#: Handlers of ledger-less operations, by ``Operation.kind``. A handler receives the operation
#: (``payload``, ``tenant_id``, ``mailbox``) and raises ``syncsvc.errors`` to ask for a retry
#: (``Throttled``, ``Transient``) or to give up (any other ``SyncSvcError``).
TASK_HANDLERS: Mapping[str, TaskHandler] = {
    OpKind.GOOGLE_SYNC: google.google_sync,
    OpKind.GOOGLE_SUBS: google.google_subscriptions,
    OpKind.LEGACY_GOOGLE_SUBS: google.google_subscriptions,
    OpKind.GRAPH_SYNC: graph.graph_sync,
    OpKind.GRAPH_LIFECYCLE: graph.graph_lifecycle,
    OpKind.GRAPH_SUBS: graph.graph_subscriptions,
    OpKind.LEGACY_GRAPH_SUBS: graph.graph_subscriptions,
    OpKind.CALDAV_POLL: caldav.caldav_poll,
    OpKind.CALLBACK: callbacks.deliver_callback,
}


def _dump_tasks_on_sigusr1() -> None:
    """``kill -USR1 <worker>`` logs where every task of the process waits: for an operator
    (or a test) looking at a worker that seems stuck."""

    def dump() -> None:
        for task in asyncio.all_tasks():
            chain: list[str] = []
            coro: Any = task.get_coro()
            while coro is not None and len(chain) < 30:  # follow what each coroutine awaits
                frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
                if frame is None:
                    chain.append(type(coro).__name__)
                    break
                chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
                coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
            log.warning("event=task.dump task=%s at=%s", task.get_name(), " > ".join(chain))

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)


async def run_workers(settings: Settings, db: Database, stop: asyncio.Event) -> None:
    """The sync workers, the scheduler of saved batches, the Google channel and Graph
    subscription checks, the CalDAV polls and the pruning of old history, until ``stop`` is set.

    The limiter is Redis when configured (shared by every process), else this process's own.
    """
    _dump_tasks_on_sigusr1()
    limiter: RateLimiter
    if settings.redis_url:
        limiter = RedisRateLimiter.from_url(settings.redis_url)
    else:
        limiter = MemoryRateLimiter()
    registry = UserProviders(
        settings, SecretBox(settings.secret_key, settings.secret_key_previous), db
    )
    worker = Worker(
        settings,
        db,
        limiter,
        registry,
        embedded=settings.redis_url is None,
        tasks=TASK_HANDLERS,
        on_revoked=partial(connections.access_revoked, db),
    )
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(supervised("worker", worker.run, db, stop))
            group.create_task(
                supervised("scheduler", lambda s: run_scheduler(settings, db, s), db, stop)
            )
            group.create_task(
                supervised("channels", lambda s: google.run_channel_checks(db, s), db, stop)
            )
            group.create_task(
                supervised(
                    "subscriptions", lambda s: graph.run_subscription_checks(db, s), db, stop
                )
            )
            poll_s = settings.caldav_poll_minutes * 60
            group.create_task(
                supervised("caldav_polls", lambda s: caldav.run_polls(db, s, poll_s), db, stop)
            )
            policy = RetentionPolicy.from_settings(settings)
            group.create_task(
                supervised("retention", lambda s: run_retention(db, policy, s), db, stop)
            )
    finally:
        await registry.aclose()
        if isinstance(limiter, RedisRateLimiter):
            await limiter.aclose()


async def supervised(
    name: str, loop: Callable[[asyncio.Event], Awaitable[None]], db: Database, stop: asyncio.Event
) -> None:
    """Runs ``loop`` until ``stop``, restarting it when it fails, so that no failure ends the
    process: a database outage (restart, cut connections, not started yet) is logged once
    per outage by ``db.outage`` and waited out with backoff, then the loop starts afresh
    (its claims are leases, nothing it held is lost); anything else is logged with its
    traceback and retried after a pause."""
    while not stop.is_set():
        try:
            await loop(stop)
            return
        except Exception as exc:
            if is_unavailable(exc):
                db.outage.down(exc)
            else:
                log.exception("event=loop.crashed loop=%s", name)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RECONNECT_MAX_S)
        await db.wait_until_up(stop)
