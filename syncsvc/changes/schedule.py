"""The periodic check that keeps each tenant's push subscriptions alive, shared by providers.

Google channels and Graph subscriptions both expire and both are looked after by one operation
per tenant (``google_subs``, ``graph_subs``) that the worker runs under the usual
limits. This module queues those operations: one per tenant that has users on the provider or
subscriptions left over, and never a second while one is waiting or running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from syncsvc.queue.outbox import TenantKind, enqueue_task
from syncsvc.store.db import Database
from syncsvc.store.models import Operation, Subscription, Tenant, User
from syncsvc.store.states import OPEN_STATES

log = logging.getLogger("syncsvc.changes.schedule")


async def enqueue_checks(db: Database, provider: str, kind: TenantKind, mailbox_prefix: str) -> int:
    """Stores one ``kind`` operation (mailbox ``<mailbox_prefix>:<tenant>``) per tenant with
    ``provider`` users or subscriptions, unless one is pending or running. Returns how many."""
    async with db.session() as s, s.begin():
        with_users = select(User.tenant_id).where(User.calendar_provider == provider)
        with_subs = select(Subscription.tenant_id).where(Subscription.provider == provider)
        query = select(Tenant.id).where(Tenant.id.in_(with_users.union(with_subs)))
        tenants = (await s.execute(query)).scalars().all()
        waiting = select(Operation.tenant_id).where(
            Operation.kind == kind, Operation.state.in_(OPEN_STATES)
        )
        busy = set((await s.execute(waiting)).scalars().all())
        fresh = [t for t in tenants if t not in busy]
        for tenant_id in fresh:
            enqueue_task(s, tenant_id, kind, f"{mailbox_prefix}:{tenant_id}", {})
    return len(fresh)


async def run_checks(
    db: Database,
    stop: asyncio.Event,
    interval_s: float,
    provider: str,
    kind: TenantKind,
    mailbox_prefix: str,
) -> None:
    """Queues the checks at once and every ``interval_s`` until ``stop``."""
    await repeat(stop, interval_s, kind, lambda: enqueue_checks(db, provider, kind, mailbox_prefix))


async def repeat(
    stop: asyncio.Event, interval_s: float, what: str, step: Callable[[], Awaitable[object]]
) -> None:
    """Runs ``step`` at once and every ``interval_s`` until ``stop``; a database hiccup is
    logged and the next round tries again."""
    while not stop.is_set():
        try:
            await step()
        except (OSError, SQLAlchemyError) as exc:
            log.warning("event=push.checks.enqueue_failed kind=%s error=%r", what, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
