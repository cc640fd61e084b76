"""Assembles the long-running parts of a process: sync workers, their task handlers, scheduler.

It sits above every layer, so it may wire ``service`` handlers into the ``queue`` worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from syncsvc.config import Settings
from syncsvc.queue.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from syncsvc.queue.worker import TaskHandler, Worker
from syncsvc.scheduler import run_scheduler
from syncsvc.service import callbacks, google_push, graph_push
from syncsvc.service.changes import CALLBACK_KIND
from syncsvc.service.connections import UserProviders
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database

#: Handlers of ledger-less operations, by ``Operation.kind``. A handler receives the operation
#: (``payload``, ``tenant_id``, ``mailbox``) and raises ``syncsvc.errors`` to ask for a retry
#: (``Throttled``, ``Transient``) or to give up (any other ``SyncSvcError``).
TASK_HANDLERS: Mapping[str, TaskHandler] = {
    google_push.GOOGLE_SYNC: google_push.google_sync,
    google_push.GOOGLE_CHANNELS: google_push.google_channels,
    graph_push.GRAPH_SYNC: graph_push.graph_sync,
    graph_push.GRAPH_LIFECYCLE: graph_push.graph_lifecycle,
    graph_push.GRAPH_SUBSCRIPTION_CHECK: graph_push.graph_subscription_check,
    CALLBACK_KIND: callbacks.deliver_callback,
}


async def run_workers(settings: Settings, db: Database, stop: asyncio.Event) -> None:
    """The sync workers, the scheduler of saved batches and the Google channel and Graph
    subscription checks, until ``stop`` is set.

    The limiter is Redis when configured (shared by every process), else this process's own.
    """
    limiter: RateLimiter
    if settings.redis_url:
        limiter = RedisRateLimiter.from_url(settings.redis_url)
    else:
        limiter = MemoryRateLimiter()
    registry = UserProviders(settings, SecretBox(settings.secret_key))
    worker = Worker(
        settings,
        db,
        limiter,
        registry,
        embedded=settings.redis_url is None,
        tasks=TASK_HANDLERS,
    )
    try:
        async with asyncio.TaskGroup() as group:  # one failing cancels the other
            group.create_task(worker.run(stop))
            group.create_task(run_scheduler(settings, db, stop))
            group.create_task(google_push.run_channel_checks(db, stop))
            group.create_task(graph_push.run_subscription_checks(db, stop))
    finally:
        await registry.aclose()
        if isinstance(limiter, RedisRateLimiter):
            await limiter.aclose()
