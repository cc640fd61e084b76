"""Microsoft Graph change notifications and delta sync: what happens after Graph says
"a mailbox's events changed".

The flow, per mailbox of a user whose connection is ``graph``:

1. **Subscriptions** (``graph_subs``, one operation per tenant queued every
   ``SUBSCRIPTIONS_CHECK_S`` by :func:`run_subscription_checks`, running
   :func:`~syncsvc.changes.source.check_subscriptions`): every mailbox gets one
   subscription to ``/users/{m}/events``. Graph validates our webhook before it answers the
   create, so the row is stored after it, with the secret ``clientState`` kept only as its
   SHA-256. A subscription ending within :func:`renew_before_s` is renewed (``PATCH``); one
   whose user is gone or changed connection is deleted. A new subscription is followed by a
   full delta, so whatever changed before it existed is caught up.
2. **Notifications** (``POST /webhooks/graph``, :func:`record_notifications`): each item's
   ``clientState`` must match its subscription's (constant time). Forged or unknown items are
   logged and dropped; the valid ones of the same request are processed. A request with no
   valid item is refused with 403, one with at least one is answered 202 — Graph retries
   non-2xx answers, and a request from Graph may carry an item of a subscription we just
   replaced, which must not make it resend the rest. Changes store one ``graph_sync`` per
   mailbox (not a second while one waits); lifecycle events store a ``graph_lifecycle``
   renewal (``reauthorizationRequired``) or re-creation (``subscriptionRemoved``), or a full
   delta (``missed``). No provider call happens in the request, and requests arriving together
   share one transaction (group commit), each answered once its work is committed.
3. **Sync** (``graph_sync``, :func:`~syncsvc.changes.source.sync` with
   :meth:`GraphSource.read`): a ``calendarView/delta`` round from the stored
   ``@odata.deltaLink``; events become :class:`~syncsvc.changes.apply.ExternalChange`\\ s
   for :func:`~syncsvc.changes.apply.apply_external_changes`; the new link is stored. A
   ``410`` starts over with a full delta: our untouched events carry the ``changeKey`` we
   recorded, so a full round reports no spurious edits. Out-of-office changes (or a full
   round, or removed events, whose ``showAs`` is unknown) refresh the user's days off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.changes.apply import ExternalChange
from syncsvc.changes.schedule import enqueue_checks, run_checks
from syncsvc.changes.source import Round, check_subscriptions, sync
from syncsvc.config import Settings
from syncsvc.errors import (
    ErrorDetail,
    Forbidden,
    Permanent,
    ProviderError,
    ProviderNotFound,
    Throttled,
    Transient,
)
from syncsvc.providers.base import CalendarProvider
from syncsvc.providers.graph import CANCELLED_SUBJECT_PREFIX, GraphProvider
from syncsvc.providers.graph_subscriptions import (
    SUBSCRIPTION_MAX_MIN,
    DeltaResult,
    delta,
    renew,
    subscribe,
    unsubscribe,
)
from syncsvc.queue.outbox import SubscriptionTask, enqueue_task
from syncsvc.queue.worker import TaskContext
from syncsvc.store.crypto import hash_token
from syncsvc.store.db import Database
from syncsvc.store.models import Operation, Subscription, User
from syncsvc.store.states import OpKind, OpState
from syncsvc.store.types import utcnow

log = logging.getLogger("syncsvc.changes.graph")

PROVIDER = "graph"
#: The per-tenant subscription checks' mailbox prefix (their rate-limit and fairness unit).
SUBSCRIPTIONS_MAILBOX = f"{PROVIDER}:subscriptions"
WEBHOOK_PATH = "/webhooks/graph"
LIFECYCLE_PATH = "/webhooks/graph/lifecycle"
#: Renew a subscription this long before it ends (or at half its life, if that is shorter).
RENEW_BEFORE_S = 24 * 3600
#: How often each tenant's subscriptions are checked.
SUBSCRIPTIONS_CHECK_S = 15 * 60
#: Bytes of randomness in a clientState (Graph allows 128 characters; this gives 43).
CLIENT_STATE_BYTES = 32
#: The delta window around now: activities are planned ahead, moved ones rarely far back.
DELTA_PAST_DAYS = 31
DELTA_AHEAD_DAYS = 730
CHANGE_TYPES = frozenset({"created", "updated", "deleted"})
LIFECYCLE_ACTIONS = {
    "reauthorizationRequired": "renew",
    "subscriptionRemoved": "recreate",
    "missed": "full_sync",
}
OUT_OF_OFFICE = "oof"
#: Notification requests stored by one transaction at most (group commit).
GROUP_MAX = 256


@dataclass(frozen=True, slots=True)
class NotificationItem:
    """One item of a notification's ``value`` (a change or a lifecycle event)."""

    subscription_id: str
    client_state: str
    change_type: str | None = None
    lifecycle_event: str | None = None


@dataclass(frozen=True, slots=True)
class Recorded:
    accepted: int
    rejected: int
    #: Operations stored (the rest were already waiting).
    queued: int


def notification_url(settings: Settings) -> str:
    return settings.public_base_url.rstrip("/") + WEBHOOK_PATH


def lifecycle_url(settings: Settings) -> str:
    return settings.public_base_url.rstrip("/") + LIFECYCLE_PATH


def subscription_lifetime(settings: Settings) -> timedelta:
    return timedelta(minutes=max(1, min(settings.graph_subscription_minutes, SUBSCRIPTION_MAX_MIN)))


def renew_before_s(settings: Settings) -> float:
    return min(RENEW_BEFORE_S, subscription_lifetime(settings).total_seconds() / 2)


def _mailbox(calendar: str) -> str:
    return f"{PROVIDER}:{calendar}"


# --- notifications ----------------------------------------------------------------------------


async def record_notifications(db: Database, items: Sequence[NotificationItem]) -> Recorded:
    """Verifies each item and stores the work it asks for before returning; raises
    ``Forbidden`` when none is valid.

    Requests that arrive together share one transaction (group commit, see
    :class:`_Recorder`): one read of the subscriptions, one of the waiting operations and the
    inserts, for all of them. Alone, a request still commits at once.
    """
    recorder = _RECORDERS.get(db)
    if recorder is None:
        recorder = _RECORDERS[db] = _Recorder(db)
    return await recorder.record(items)


class _Recorder:
    """Group commit of notifications: while one transaction runs, the requests that arrive
    queue up and are stored together by the next, so the database work per notification falls
    as load rises, and every request is answered only after its work is committed."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._waiting: list[tuple[Sequence[NotificationItem], asyncio.Future[Recorded]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def record(self, items: Sequence[NotificationItem]) -> Recorded:
        future: asyncio.Future[Recorded] = asyncio.get_running_loop().create_future()
        self._waiting.append((items, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:GROUP_MAX], self._waiting[GROUP_MAX:]
            try:
                outcomes = await _record_group(self.db, [items for items, _ in batch])
            except Exception as exc:  # every waiting request learns of it (a 500, retried)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue  # the caller went away; its work is stored anyway
                if isinstance(outcome, Recorded):
                    future.set_result(outcome)
                else:
                    future.set_exception(outcome)


#: One recorder per database handle (and so per process and event loop).
_RECORDERS: weakref.WeakKeyDictionary[Database, _Recorder] = weakref.WeakKeyDictionary()


async def _record_group(
    db: Database, requests: Sequence[Sequence[NotificationItem]]
) -> list[Recorded | Forbidden]:
    """Verifies every request's items and stores the work of all of them in one transaction."""
    ids = sorted({i.subscription_id for items in requests for i in items if i.subscription_id})
    wanted: dict[tuple[str, int], _Wanted] = {}
    owner: dict[tuple[str, int], int] = {}
    counts: list[tuple[int, int]] = []
    async with db.session() as s, s.begin():
        subs = {
            sub.external_id: sub
            for sub in (
                await s.execute(
                    select(Subscription).where(
                        Subscription.provider == PROVIDER, Subscription.external_id.in_(ids)
                    )
                )
            ).scalars()
        }
        for index, items in enumerate(requests):
            accepted, sample = 0, ""
            reasons: Counter[str] = Counter()
            for item in items:
                sub = subs.get(item.subscription_id)
                if sub is None or not hmac.compare_digest(
                    hash_token(item.client_state).encode(), sub.client_state.encode()
                ):
                    reasons["unknown_subscription" if sub is None else "wrong_client_state"] += 1
                    sample = sample or item.subscription_id[:64]
                    continue
                action = _action(item)
                if action is None:
                    reasons["unknown_type"] += 1
                    continue
                accepted += 1
                _want(wanted, owner, index, sub, action)
            if reasons:  # one line per request, however many items were forged
                log.warning(
                    "event=webhook.graph.rejected items=%d reasons=%s subscription=%s",
                    sum(reasons.values()),
                    ",".join(f"{r}:{n}" for r, n in sorted(reasons.items())),
                    sample,
                )
            counts.append((accepted, sum(reasons.values())))
        inserted = await _store_work(s, wanted)
    outcomes: list[Recorded | Forbidden] = []
    for index, (accepted, rejected) in enumerate(counts):
        if accepted == 0:
            outcomes.append(
                Forbidden(
                    "no notification belongs to a known subscription",
                    [ErrorDetail(("body", "value"), "unknown subscription or wrong clientState")],
                )
            )
        else:
            queued = sum(1 for key in inserted if owner[key] == index)
            outcomes.append(Recorded(accepted, rejected, queued))
    return outcomes


@dataclass(slots=True)
class _Wanted:
    """One operation a delivery asks for, before it is stored (or found waiting)."""

    kind: Literal[OpKind.GRAPH_SYNC, OpKind.GRAPH_LIFECYCLE]
    tenant_id: str
    calendar: str
    payload: SubscriptionTask


def _want(
    wanted: dict[tuple[str, int], _Wanted],
    owner: dict[tuple[str, int], int],
    index: int,
    sub: Subscription,
    action: str,
) -> None:
    """Adds the operation ``action`` asks for (a full sync wins over an incremental one)."""
    full = action == "full_sync"
    payload: SubscriptionTask = {"subscription_id": sub.id}
    kind: Literal[OpKind.GRAPH_SYNC, OpKind.GRAPH_LIFECYCLE] = OpKind.GRAPH_SYNC
    if action in ("renew", "recreate"):
        kind = OpKind.GRAPH_LIFECYCLE
        payload["action"] = "renew" if action == "renew" else "recreate"
    key = (kind if kind == OpKind.GRAPH_SYNC else f"{kind}:{action}", sub.id)
    if key in wanted:
        if full:
            wanted[key].payload["full"] = True
        return
    if full:
        payload["full"] = True
    wanted[key] = _Wanted(kind, sub.tenant_id, sub.calendar, payload)
    owner[key] = index


def _action(item: NotificationItem) -> str | None:
    if item.lifecycle_event is not None:
        return LIFECYCLE_ACTIONS.get(item.lifecycle_event)
    if item.change_type is not None and set(item.change_type.split(",")) <= CHANGE_TYPES:
        return "sync"
    return None


async def _store_work(
    s: AsyncSession, wanted: dict[tuple[str, int], _Wanted]
) -> set[tuple[str, int]]:
    """Stores each wanted operation unless an equal one waits (a full sync upgrades a waiting
    incremental one); returns the keys of those stored."""
    if not wanted:
        return set()
    mailboxes = sorted({_mailbox(w.calendar) for w in wanted.values()})
    waiting = (
        (
            await s.execute(
                select(Operation).where(
                    Operation.mailbox.in_(mailboxes),
                    Operation.kind.in_((OpKind.GRAPH_SYNC, OpKind.GRAPH_LIFECYCLE)),
                    Operation.state == OpState.PENDING,
                )
            )
        )
        .scalars()
        .all()
    )
    inserted: set[tuple[str, int]] = set()
    for key, w in wanted.items():
        same = [
            op
            for op in waiting
            if op.kind == w.kind
            and op.payload.get("subscription_id") == w.payload["subscription_id"]
            and op.payload.get("action") == w.payload.get("action")
        ]
        if same:
            if w.payload.get("full") and not same[0].payload.get("full"):
                same[0].payload = {**same[0].payload, "full": True}
            continue
        enqueue_task(s, w.tenant_id, w.kind, _mailbox(w.calendar), w.payload)
        inserted.add(key)
    return inserted


# --- the source ---------------------------------------------------------------------------


async def _graph_provider(ctx: TaskContext, user: User) -> GraphProvider:
    provider = await ctx.providers(user)
    if not isinstance(provider, GraphProvider):
        raise Permanent(f"user {user.id}'s calendar is not a Graph mailbox")
    return provider


class GraphSource:
    """Graph's change detection: subscriptions, and ``calendarView/delta`` reads."""

    provider = PROVIDER

    async def read(
        self, ctx: TaskContext, sub: Subscription, calendar: CalendarProvider, token: str | None
    ) -> Round:
        if not isinstance(calendar, GraphProvider):
            raise Permanent(f"{sub.calendar} is not a Graph mailbox")
        now = utcnow()
        window = (now - timedelta(days=DELTA_PAST_DAYS), now + timedelta(days=DELTA_AHEAD_DAYS))
        result = await delta(calendar, token, window)
        return Round(
            token=result.delta_link,
            full=result.full,
            changes=external_changes(sub.calendar, result),
            days_off=result.full
            or any(e.removed or e.show_as == OUT_OF_OFFICE for e in result.events),
            listed=len(result.events),
        )

    def needs_renewal(self, ctx: TaskContext, sub: Subscription, now: datetime) -> bool:
        return (sub.expires_at - now).total_seconds() < renew_before_s(ctx.settings)

    async def open(
        self, ctx: TaskContext, user: User, calendar: str, *, sync_token: str | None
    ) -> Subscription:
        """Creates the subscription at Graph (which first validates our webhook), stores it
        and queues a sync from ``sync_token`` (``None``: a full delta)."""
        provider = await _graph_provider(ctx, user)
        secret = secrets.token_urlsafe(CLIENT_STATE_BYTES)
        created = await subscribe(
            provider,
            notification_url=notification_url(ctx.settings),
            lifecycle_url=lifecycle_url(ctx.settings),
            client_state=secret,
            expires_at=utcnow() + subscription_lifetime(ctx.settings),
        )
        sub = Subscription(
            provider=PROVIDER,
            tenant_id=user.tenant_id,
            user_id=user.id,
            calendar=calendar,
            external_id=created.id,
            client_state=hash_token(secret),
            resource_id=created.resource,
            sync_token=sync_token,
            expires_at=created.expires_at,
        )
        async with ctx.db.session() as s, s.begin():
            s.add(sub)
            await s.flush()
            mailbox = _mailbox(calendar)
            enqueue_task(s, user.tenant_id, OpKind.GRAPH_SYNC, mailbox, {"subscription_id": sub.id})
        log.info("event=graph.subscription.created mailbox=%s id=%s", calendar, created.id)
        return sub

    async def renew(self, ctx: TaskContext, user: User, sub: Subscription) -> None:
        """``PATCH``es the expiry; a subscription Graph no longer knows is created again."""
        provider = await _graph_provider(ctx, user)
        try:
            expires = await renew(
                provider, sub.external_id, utcnow() + subscription_lifetime(ctx.settings)
            )
        except ProviderNotFound:
            await self.recreate(ctx, user, sub)
            return
        async with ctx.db.session() as s, s.begin():
            await s.execute(
                update(Subscription)
                .where(Subscription.id == sub.id)
                .values(expires_at=expires, updated_at=utcnow())
            )
        log.info("event=graph.subscription.renewed mailbox=%s expires=%s", sub.calendar, expires)

    async def recreate(self, ctx: TaskContext, user: User, old: Subscription) -> None:
        """A new subscription replaces the old (best-effort deleted at Graph); its delta link
        carries over and a sync catches up what may have been missed meanwhile."""
        fresh = await self.open(ctx, user, old.calendar, sync_token=old.sync_token)
        async with ctx.db.session() as s, s.begin():
            await s.execute(delete(Subscription).where(Subscription.id == old.id))
        with contextlib.suppress(ProviderError):
            await unsubscribe(await _graph_provider(ctx, user), old.external_id)
        log.info(
            "event=graph.subscription.recreated mailbox=%s id=%s", old.calendar, fresh.external_id
        )

    async def close(
        self, ctx: TaskContext, user: User | None, sub: Subscription, *, reason: str
    ) -> None:
        """Deletes a subscription nobody needs. Without credentials to reach Graph it simply
        runs out, and without its row its notifications are refused."""
        if user is not None and user.calendar_provider == PROVIDER:
            try:
                await unsubscribe(await _graph_provider(ctx, user), sub.external_id)
            except (Throttled, Transient):
                raise
            except ProviderError as exc:
                log.warning(
                    "event=graph.subscription.delete_failed id=%s error=%s", sub.external_id, exc
                )
        async with ctx.db.session() as s, s.begin():
            await s.execute(delete(Subscription).where(Subscription.id == sub.id))
        log.info(
            "event=graph.subscription.deleted mailbox=%s id=%s reason=%s",
            sub.calendar,
            sub.external_id,
            reason,
        )


SOURCE = GraphSource()


def external_changes(calendar: str, result: DeltaResult) -> list[ExternalChange]:
    """Every listed event; ``apply_external_changes`` ignores those that are not ours. The
    "Cancelled: " that we put before a cancelled activity's subject is ours, not a rename."""
    return [
        ExternalChange(
            provider=PROVIDER,
            calendar=calendar,
            event_id=e.event_id,
            deleted=e.removed,
            start=e.start,
            end=e.end,
            subject=e.subject.removeprefix(CANCELLED_SUBJECT_PREFIX) if e.subject else e.subject,
            etag=e.change_key,
        )
        for e in result.events
        if e.event_id
    ]


# --- task handlers ------------------------------------------------------------------------------


async def graph_sync(ctx: TaskContext, op: Operation) -> None:
    """Applies what changed in one mailbox since the stored delta link (``full``: all)."""
    await sync(ctx, SOURCE, op, full=bool(op.payload.get("full")))


async def graph_lifecycle(ctx: TaskContext, op: Operation) -> None:
    """A lifecycle event: renew (``reauthorizationRequired``) or re-create
    (``subscriptionRemoved``) one subscription."""
    async with ctx.db.session() as s:
        sub = await s.get(Subscription, int(op.payload["subscription_id"]))
        user = None if sub is None else await s.get(User, (sub.tenant_id, sub.user_id))
    if sub is None or user is None or user.calendar_provider != PROVIDER:
        return  # replaced or dropped meanwhile: nothing to follow any more
    if op.payload.get("action") == "renew":
        await SOURCE.renew(ctx, user, sub)
    else:
        await SOURCE.recreate(ctx, user, sub)


async def graph_subscriptions(ctx: TaskContext, op: Operation) -> None:
    """Gives each of the tenant's Graph mailboxes one live subscription (see
    :func:`~syncsvc.changes.source.check_subscriptions`)."""
    await check_subscriptions(ctx, SOURCE, op.tenant_id)


async def enqueue_subscription_checks(db: Database) -> int:
    """One ``graph_subs`` operation per tenant with Graph users or subscriptions,
    unless one is waiting or running. Returns how many were stored."""
    return await enqueue_checks(db, PROVIDER, OpKind.GRAPH_SUBS, SUBSCRIPTIONS_MAILBOX)


async def run_subscription_checks(
    db: Database, stop: asyncio.Event, interval_s: float = SUBSCRIPTIONS_CHECK_S
) -> None:
    """Queues the subscription checks at start and every ``interval_s`` until ``stop``."""
    await run_checks(db, stop, interval_s, PROVIDER, OpKind.GRAPH_SUBS, SUBSCRIPTIONS_MAILBOX)
