"""The skeleton every change source fills in, and the two jobs built on it.

A source is one provider's way of learning what users changed in their calendars. Each one
keeps a ``Subscription`` row per calendar, whose ``sync_token`` is where its next read starts:

* **reading changes since a token** (:meth:`Source.read`): Graph ``calendarView/delta``, Google
  ``events.list`` with a sync token, CalDAV ``sync-collection``. :func:`sync` runs a read, starts
  over with a full read when the provider has forgotten the token, applies what it found
  through :func:`~syncsvc.changes.apply.apply_external_changes`, reads days off again when they
  may have changed, and stores the new token;
* **keeping subscriptions alive** (:class:`PushSource`: open, renew, close), for the sources that
  push (Graph subscriptions, Google channels). :func:`check_subscriptions` gives each of a
  tenant's calendars on the provider one live subscription and closes the rest. CalDAV has no
  push: its rows are kept by its poll schedule (:mod:`syncsvc.changes.caldav`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from sqlalchemy import select, update

from syncsvc.changes.apply import ExternalChange, apply_external_changes, refresh_days_off
from syncsvc.errors import ProviderError, SyncTokenExpired, Throttled, Transient
from syncsvc.providers.base import CalendarProvider
from syncsvc.queue.outbox import Calendar, calendar_of
from syncsvc.queue.worker import TaskContext
from syncsvc.store.models import Operation, Subscription, User
from syncsvc.store.types import utcnow

log = logging.getLogger("syncsvc.changes")


@dataclass(frozen=True, slots=True)
class Round:
    """What one read of a calendar found."""

    #: Where the next read starts.
    token: str | None
    #: The read listed everything (no token, or the provider had forgotten it).
    full: bool
    #: Changes for ``apply_external_changes`` (it ignores events that are not ours).
    changes: Sequence[ExternalChange] = field(default_factory=list)
    #: Something that may be a day off changed (or the read was full).
    days_off: bool = False
    #: Items the provider listed, for the log.
    listed: int = 0
    #: When the read began, for sources whose reads may overlap our own writes (see
    #: ``apply_external_changes``).
    read_at: datetime | None = None


class Source(Protocol):
    """How one provider's calendar changes are read."""

    provider: str

    async def read(
        self, ctx: TaskContext, sub: Subscription, calendar: CalendarProvider, token: str | None
    ) -> Round:
        """Changes since ``token`` (``None``: a full read); raises ``SyncTokenExpired`` when the
        provider no longer knows the token."""
        ...


class PushSource(Source, Protocol):
    """A source whose provider pushes notifications to a subscription that expires."""

    def needs_renewal(self, ctx: TaskContext, sub: Subscription, now: datetime) -> bool: ...

    async def open(
        self, ctx: TaskContext, user: User, calendar: str, *, sync_token: str | None
    ) -> Subscription:
        """Opens and stores a subscription, and queues a sync from ``sync_token``."""
        ...

    async def renew(self, ctx: TaskContext, user: User, sub: Subscription) -> None: ...

    async def close(
        self, ctx: TaskContext, user: User | None, sub: Subscription, *, reason: str
    ) -> None:
        """Ends the subscription at the provider where credentials allow, and forgets it."""
        ...


async def subscription_for(
    ctx: TaskContext, op: Operation, provider: str
) -> tuple[Subscription, User] | None:
    """The calendar's newest subscription and its user, or ``None`` when the user's connection
    no longer is that calendar. The newest, not the one that sent the message: a renewal may have
    replaced that one since, and its change must not be lost with it."""
    calendar = op.mailbox.split(":", 1)[1]
    async with ctx.db.session() as s:
        sub = (
            await s.execute(
                select(Subscription)
                .where(
                    Subscription.provider == provider,
                    Subscription.tenant_id == op.tenant_id,
                    Subscription.calendar == calendar,
                )
                .order_by(Subscription.id.desc())
                .limit(1)
            )
        ).scalar_one_or_none()
        user = None if sub is None else await s.get(User, (sub.tenant_id, sub.user_id))
    if sub is None or user is None or calendar_of(user) != Calendar(provider, sub.calendar):
        return None  # dropped or changed meanwhile: nothing to follow any more
    return sub, user


async def sync(ctx: TaskContext, source: Source, op: Operation, *, full: bool = False) -> None:
    """Task handler body: applies what changed in one calendar since its stored token."""
    found = await subscription_for(ctx, op, source.provider)
    if found is None:
        return
    sub, user = found
    calendar = await ctx.providers(user)
    token = None if full else sub.sync_token
    try:
        got = await source.read(ctx, sub, calendar, token)
    except SyncTokenExpired:
        log.info(
            "event=changes.full reason=token_expired provider=%s calendar=%s",
            source.provider,
            sub.calendar,
        )
        got = await source.read(ctx, sub, calendar, None)
    applied = (
        await apply_external_changes(ctx.db, got.changes, read_at=got.read_at) if got.changes else 0
    )
    if got.days_off:
        await refresh_days_off(ctx.db, user, calendar)
    if got.token != sub.sync_token:
        async with ctx.db.session() as s, s.begin():
            # Every row of the calendar: one opened by a renewal meanwhile copied the old token.
            await s.execute(
                update(Subscription)
                .where(
                    Subscription.provider == source.provider,
                    Subscription.tenant_id == sub.tenant_id,
                    Subscription.calendar == sub.calendar,
                )
                .values(sync_token=got.token, updated_at=utcnow())
            )
    log.info(
        "event=changes.synced provider=%s calendar=%s listed=%d applied=%d full=%s",
        source.provider,
        sub.calendar,
        got.listed,
        applied,
        got.full,
    )


async def check_subscriptions(ctx: TaskContext, source: PushSource, tenant_id: str) -> None:
    """Task handler body: gives each of the tenant's calendars on the provider one live
    subscription (opened, or renewed when it ends soon) and closes every other one.

    Each user is handled on their own: one user's revoked credentials do not hold back the
    others. A throttled or transient failure is raised after the rest are done, so the check
    (which is idempotent) runs again later.
    """
    retry: ProviderError | None = None
    for user, subs in await _tenant_subscriptions(ctx, source.provider, tenant_id):
        try:
            await _reconcile(ctx, source, user, subs)
        except (Throttled, Transient) as exc:
            retry = retry or exc
        except ProviderError as exc:
            log.warning(
                "event=changes.subscription.failed provider=%s user=%s error=%s",
                source.provider,
                user.id if user else "-",
                exc,
            )
    if retry is not None:
        raise retry


async def _tenant_subscriptions(
    ctx: TaskContext, provider: str, tenant_id: str
) -> list[tuple[User | None, list[Subscription]]]:
    """Each of the tenant's users on the provider with their rows, then each row whose user is
    gone or on another provider (with that user, whose credentials may still close it)."""
    async with ctx.db.session() as s:
        users = (
            (
                await s.execute(
                    select(User).where(
                        User.tenant_id == tenant_id, User.calendar_provider == provider
                    )
                )
            )
            .scalars()
            .all()
        )
        subs = (
            (
                await s.execute(
                    select(Subscription)
                    .where(Subscription.tenant_id == tenant_id, Subscription.provider == provider)
                    .order_by(Subscription.id)
                )
            )
            .scalars()
            .all()
        )
        by_user: dict[str, list[Subscription]] = {u.id: [] for u in users}
        orphans: list[tuple[User | None, list[Subscription]]] = []
        for sub in subs:
            if sub.user_id in by_user:
                by_user[sub.user_id].append(sub)
            else:
                orphans.append((await s.get(User, (tenant_id, sub.user_id)), [sub]))
    return [(u, by_user[u.id]) for u in users] + orphans


async def _reconcile(
    ctx: TaskContext, source: PushSource, user: User | None, subs: Sequence[Subscription]
) -> None:
    calendar = None if user is None else calendar_of(user)
    wanted = (
        calendar.calendar if calendar is not None and calendar.provider == source.provider else None
    )
    keep = [s for s in subs if s.calendar == wanted]
    for sub in subs:
        if sub not in keep:
            await source.close(ctx, user, sub, reason="connection_changed")
    if wanted is None or user is None:
        return
    now = utcnow()
    live = max(keep, key=lambda s: s.expires_at, default=None)
    for sub in keep:
        if sub is not live:
            await source.close(ctx, user, sub, reason="duplicate")
    if live is None:
        await source.open(ctx, user, wanted, sync_token=None)
    elif source.needs_renewal(ctx, live, now):
        await source.renew(ctx, user, live)
