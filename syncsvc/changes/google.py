"""Google push channels and incremental sync: what happens after Google says "something changed".

The flow, per Google calendar of a user whose connection is ``google``:

1. **Channels.** ``google_subs`` (one operation per tenant, queued every
   ``CHANNELS_CHECK_S`` by :func:`run_channel_checks`, running
   :func:`~syncsvc.changes.source.check_subscriptions`) gives every such calendar one open
   channel: it stores the subscription row (channel id, a fresh secret token) *before* calling
   ``events.watch``, because Google's ``sync`` message may arrive before the call returns. A
   channel that ends within ``RENEW_BEFORE_S`` is renewed — new channel first, then
   ``channels.stop`` on the old one, so no change falls between them — and a channel whose user
   is gone, switched provider or calendar is stopped and forgotten. When the credentials to stop
   it are gone with the connection, the channel simply runs out (Google ends it at its
   expiration) and the webhook refuses its messages, since its row no longer exists.
2. **Notifications** (``POST /webhooks/google``, :func:`record_notification`): the channel must
   be known and its token match (constant time); ``sync`` is acknowledged and nothing else;
   ``exists`` / ``not_exists`` store one ``google_sync`` operation for the calendar unless one
   is already waiting. No provider call happens in the request.
3. **Sync** (``google_sync``, :func:`~syncsvc.changes.source.sync` with
   :meth:`GoogleSource.read`): ``events.list`` from the stored sync token;
   changed and cancelled events become :class:`~syncsvc.changes.apply.ExternalChange`\\ s
   for :func:`~syncsvc.changes.apply.apply_external_changes`, which decides what was the
   user's doing and reports it to the CRM; the new token is stored. A ``410`` drops the token
   and lists everything again: events we wrote and nobody touched carry the etag we recorded,
   so the full list reports no spurious edits. When an ``outOfOffice`` event changed (or after a
   full list) the user's days off are read again.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import delete, select, update

from syncsvc.changes.apply import DELETED_STATUS, ExternalChange
from syncsvc.changes.schedule import enqueue_checks, run_checks
from syncsvc.changes.source import Round, check_subscriptions, sync
from syncsvc.config import Settings
from syncsvc.errors import (
    ErrorDetail,
    Forbidden,
    Permanent,
    ProviderError,
    Throttled,
    Transient,
)
from syncsvc.providers.base import CalendarProvider
from syncsvc.providers.google import ChangeSet, GoogleProvider
from syncsvc.queue.outbox import chunks, enqueue_task
from syncsvc.queue.worker import TaskContext
from syncsvc.store.crypto import hash_token
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, ExternalEvent, Operation, Subscription, User
from syncsvc.store.states import OpKind, OpState
from syncsvc.store.types import utcnow

log = logging.getLogger("syncsvc.changes.google")

PROVIDER = "google"
#: Mailbox prefix of the per-tenant channel checks (``google:subscriptions:<tenant>``).
SUBSCRIPTIONS_MAILBOX = f"{PROVIDER}:subscriptions"
WEBHOOK_PATH = "/webhooks/google"
#: Lifetime asked for a new channel; Google may grant less (it caps channels at about a month).
CHANNEL_TTL_S = 7 * 24 * 3600
#: A channel ending sooner than this is replaced by the next check.
RENEW_BEFORE_S = 24 * 3600
#: How often each tenant's channels are checked; well inside ``RENEW_BEFORE_S``.
CHANNELS_CHECK_S = 15 * 60
OUT_OF_OFFICE = "outOfOffice"
#: Bytes of randomness in a channel token (Google allows 256 characters).
CHANNEL_TOKEN_BYTES = 32

STATES: frozenset[str] = frozenset({"sync", "exists", "not_exists"})


@dataclass(frozen=True, slots=True)
class Notification:
    """The headers of one Google push message (its body is empty)."""

    channel_id: str
    token: str
    resource_id: str
    state: str
    message_number: int | None


@dataclass(frozen=True, slots=True)
class Recorded:
    """What a notification led to: ``sync`` (acknowledged only), ``queued`` (a sync operation
    was stored) or ``pending`` (one was already waiting)."""

    outcome: Literal["sync", "queued", "pending"]
    mailbox: str


def webhook_address(settings: Settings) -> str:
    return settings.public_base_url.rstrip("/") + WEBHOOK_PATH


def _rejected(reason: str, channel_id: str) -> Forbidden:
    """Unknown channel and wrong token get the same answer, so probing learns nothing."""
    log.warning("event=webhook.google.rejected reason=%s channel=%s", reason, channel_id[:64])
    return Forbidden(
        "the notification does not belong to a known channel",
        [ErrorDetail(("header", "X-Goog-Channel-Token"), "unknown channel or wrong token")],
    )


async def record_notification(db: Database, note: Notification) -> Recorded:
    """Verifies a push message and, for a change, stores one sync operation for its calendar.

    One indexed read and at most one insert: the answer goes back to Google in milliseconds.
    """
    if note.state not in STATES:
        raise _rejected("unknown_state", note.channel_id)
    async with db.session() as s, s.begin():
        sub = (
            await s.execute(
                select(Subscription).where(
                    Subscription.provider == PROVIDER,
                    Subscription.external_id == note.channel_id,
                )
            )
        ).scalar_one_or_none()
        if sub is None:
            raise _rejected("unknown_channel", note.channel_id)
        if not hmac.compare_digest(sub.client_state, hash_token(note.token)):
            raise _rejected("wrong_token", note.channel_id)
        if sub.resource_id and note.resource_id and sub.resource_id != note.resource_id:
            raise _rejected("wrong_resource", note.channel_id)
        mailbox = f"{PROVIDER}:{sub.calendar}"
        if note.state == "sync":
            return Recorded("sync", mailbox)
        waiting = (
            await s.execute(
                select(Operation.id)
                .where(
                    Operation.mailbox == mailbox,
                    Operation.kind == OpKind.GOOGLE_SYNC,
                    Operation.state == OpState.PENDING,
                    Operation.tenant_id == sub.tenant_id,
                )
                .limit(1)
            )
        ).first()
        if waiting is not None:
            return Recorded("pending", mailbox)
        enqueue_task(s, sub.tenant_id, OpKind.GOOGLE_SYNC, mailbox, {"subscription_id": sub.id})
    return Recorded("queued", mailbox)


# --- the source ---------------------------------------------------------------------------


async def _google_provider(ctx: TaskContext, user: User) -> GoogleProvider:
    provider = await ctx.providers(user)
    if not isinstance(provider, GoogleProvider):
        raise Permanent(f"user {user.id}'s calendar is not a Google calendar")
    return provider


class GoogleSource:
    """Google's change detection: push channels, and ``events.list`` with sync tokens."""

    provider = PROVIDER

    async def read(
        self, ctx: TaskContext, sub: Subscription, calendar: CalendarProvider, token: str | None
    ) -> Round:
        if not isinstance(calendar, GoogleProvider):
            raise Permanent(f"{sub.calendar} is not a Google calendar")
        found = await calendar.changes(token)
        changes = await _without_our_cancellations(
            ctx.db, sub.calendar, external_changes(sub.calendar, found)
        )
        return Round(
            token=found.next_sync_token,
            full=found.full,
            changes=changes,
            days_off=found.full or any(e.event_type == OUT_OF_OFFICE for e in found.events),
            listed=len(found.events),
        )

    def needs_renewal(self, ctx: TaskContext, sub: Subscription, now: datetime) -> bool:
        """A channel whose ``watch`` never answered has no resource id: it is opened anew."""
        return not sub.resource_id or sub.expires_at <= now + timedelta(seconds=RENEW_BEFORE_S)

    async def open(
        self, ctx: TaskContext, user: User, calendar: str, *, sync_token: str | None
    ) -> Subscription:
        sub = await _watch(ctx, user, calendar, sync_token=sync_token)
        async with ctx.db.session() as s, s.begin():
            mailbox = f"{PROVIDER}:{calendar}"
            enqueue_task(
                s, user.tenant_id, OpKind.GOOGLE_SYNC, mailbox, {"subscription_id": sub.id}
            )
        return sub

    async def renew(self, ctx: TaskContext, user: User, sub: Subscription) -> None:
        """Channels cannot be extended: a new one opens first, then the old one stops, so no
        change falls between them. The new one carries the old one's token."""
        await _watch(ctx, user, sub.calendar, sync_token=sub.sync_token)
        await self.close(ctx, user, sub, reason="renewed")

    async def close(
        self, ctx: TaskContext, user: User | None, sub: Subscription, *, reason: str
    ) -> None:
        """Stops the channel where credentials still allow it, then forgets it.

        A user still on Google stops it with their own connection; one who left Google can
        still be reached through the service account's delegation (it needs only their
        address). Otherwise the channel runs out at its expiration, and without its row its
        messages are refused.
        """
        if sub.resource_id and user is not None:
            try:
                if user.calendar_provider == PROVIDER:
                    await (await _google_provider(ctx, user)).stop(sub.external_id, sub.resource_id)
                elif ctx.settings.google_service_account_file and user.email:
                    delegated = GoogleProvider.with_service_account(
                        ctx.settings, user.email, calendar_id=sub.calendar
                    )
                    try:
                        await delegated.stop(sub.external_id, sub.resource_id)
                    finally:
                        await delegated.aclose()
            except (Throttled, Transient):
                raise
            except ProviderError as exc:
                log.warning(
                    "event=google.channel.stop_failed channel=%s error=%s", sub.external_id, exc
                )
        async with ctx.db.session() as s, s.begin():
            await s.execute(delete(Subscription).where(Subscription.id == sub.id))
        log.info("event=google.channel.closed channel=%s reason=%s", sub.external_id, reason)


SOURCE = GoogleSource()


def external_changes(calendar: str, found: ChangeSet) -> list[ExternalChange]:
    """Our events (they carry our activity property) and every cancellation, which Google may
    list without properties; the rest of the user's calendar is none of our business."""
    return [
        ExternalChange(
            provider=PROVIDER,
            calendar=calendar,
            event_id=event.event_id,
            deleted=event.cancelled,
            start=None if event.cancelled else event.start,
            end=None if event.cancelled else event.end,
            subject=None if event.cancelled else event.subject,
            etag=event.etag,
        )
        for event in found.events
        if event.cancelled or event.activity_id is not None
    ]


async def _without_our_cancellations(
    db: Database, calendar: str, changes: list[ExternalChange]
) -> list[ExternalChange]:
    """Drops cancellations of events whose activity is cancelled already.

    Cancelling an activity sets its Google event to ``cancelled``, which a sync then lists as a
    deletion; if it runs before our write's etag is recorded, it would be reported to the CRM
    as the user's. Either way the activity is cancelled: there is nothing to tell.
    """
    gone = [c.event_id for c in changes if c.deleted]
    known: set[str] = set()
    async with db.session() as s:
        for chunk in chunks(gone):
            rows = await s.execute(
                select(ExternalEvent.event_id)
                .join(Activity, Activity.id == ExternalEvent.activity_id)
                .where(
                    ExternalEvent.provider == PROVIDER,
                    ExternalEvent.calendar == calendar,
                    ExternalEvent.event_id.in_(chunk),
                    Activity.status == DELETED_STATUS,
                )
            )
            known.update(str(event_id) for (event_id,) in rows)
    return [c for c in changes if not (c.deleted and c.event_id in known)]


async def _watch(
    ctx: TaskContext, user: User, calendar: str, *, sync_token: str | None
) -> Subscription:
    """Stores the channel, then opens it at Google; the row goes again if Google refuses.

    Only the token's SHA-256 is kept: Google echoes the token, we never send it again, and a
    leaked row then forges nothing.
    """
    token = secrets.token_urlsafe(CHANNEL_TOKEN_BYTES)
    sub = Subscription(
        provider=PROVIDER,
        tenant_id=user.tenant_id,
        user_id=user.id,
        calendar=calendar,
        external_id=uuid.uuid4().hex,
        client_state=hash_token(token),
        sync_token=sync_token,
        expires_at=utcnow() + timedelta(seconds=CHANNEL_TTL_S),
    )
    async with ctx.db.session() as s, s.begin():
        s.add(sub)
    provider = await _google_provider(ctx, user)
    try:
        channel = await provider.watch(
            sub.external_id, webhook_address(ctx.settings), token, sub.expires_at
        )
    except BaseException:
        async with ctx.db.session() as s, s.begin():
            await s.execute(delete(Subscription).where(Subscription.id == sub.id))
        raise
    async with ctx.db.session() as s, s.begin():
        await s.execute(
            update(Subscription)
            .where(Subscription.id == sub.id)
            .values(resource_id=channel.resource_id, expires_at=channel.expires_at)
        )
    sub.resource_id, sub.expires_at = channel.resource_id, channel.expires_at
    log.info(
        "event=google.channel.opened user=%s channel=%s expires=%s",
        user.id,
        sub.external_id,
        channel.expires_at.isoformat(),
    )
    return sub


# --- task handlers ------------------------------------------------------------------------


async def google_sync(ctx: TaskContext, op: Operation) -> None:
    """Applies what changed in one Google calendar since the stored sync token."""
    await sync(ctx, SOURCE, op)


async def google_subscriptions(ctx: TaskContext, op: Operation) -> None:
    """Opens, renews and stops the tenant's Google channels (see
    :func:`~syncsvc.changes.source.check_subscriptions`)."""
    await check_subscriptions(ctx, SOURCE, op.tenant_id)


async def enqueue_channel_checks(db: Database) -> int:
    """One ``google_subs`` operation per tenant with Google users or channels, unless
    one is waiting or running already. Returns how many were stored."""
    return await enqueue_checks(db, PROVIDER, OpKind.GOOGLE_SUBS, SUBSCRIPTIONS_MAILBOX)


async def run_channel_checks(
    db: Database, stop: asyncio.Event, interval_s: float = CHANNELS_CHECK_S
) -> None:
    """Queues the channel checks at start and every ``interval_s`` until ``stop``."""
    await run_checks(db, stop, interval_s, PROVIDER, OpKind.GOOGLE_SUBS, SUBSCRIPTIONS_MAILBOX)
