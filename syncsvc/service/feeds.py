"""Per-user secret iCal feeds: create/rotate/revoke the URL, and answer a feed cheaply.

The token is shown once (in the URL) and only its SHA-256 is stored; a feed is found by that
hash with an indexed equality, so no secret is ever compared in Python.

Feeds are polled often and mostly unchanged, so answering is split in two. ``feed_state``
yields a strong ETag from the database alone, usually with ONE indexed query: a ``304`` needs
nothing else. ``feed_body`` renders only when the ETag is new to this process; bodies are
cached by ETag, and concurrent requests for the same new ETag share one render.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.errors import Conflict, ErrorDetail, NotFound
from syncsvc.feeds.ical import FeedCalendar, FeedItem, render_feed
from syncsvc.providers.base import EventSpec
from syncsvc.queue.reconcile import spec_for
from syncsvc.service.users import get_user
from syncsvc.store.crypto import hash_token
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, Feed, User
from syncsvc.store.types import utcnow

#: ``secrets.token_urlsafe`` bytes: 256 bits, well above the 128 a guess must face.
FEED_TOKEN_BYTES = 32
#: Activities of a deleted batch stay in the feed as CANCELLED for this many whole UTC days
#: after the day of deletion (so subscribers remove them), then leave it at a midnight: the
#: feed changes with the data or the date, never with the time of the request.
DELETED_KEPT_DAYS = 30
#: Longest a write to activities may take from stamping ``updated_at`` to committing, clock
#: skew between processes included. A feed whose newest change is older than this cannot
#: still receive an older-stamped commit, so that change alone identifies its state.
WRITE_SETTLE_S = 300
#: Rendered bodies kept per process, by total size.
BODY_CACHE_MAX_BYTES = 64 * 1024 * 1024
#: Raised when the rendered form changes, so clients holding an old ETag get the new form.
FEED_FORMAT_VERSION = 1
FEED_NAME_PREFIX = "syncsvc"


def feed_url(public_base_url: str, token: str) -> str:
    return f"{public_base_url.rstrip('/')}/feeds/{token}.ics"


async def rotate(session: AsyncSession, tenant_id: str, user_id: str) -> str:
    """A new token for the user's feed; the previous one stops working when this commits."""
    await get_user(session, tenant_id, user_id)
    token = secrets.token_urlsafe(FEED_TOKEN_BYTES)
    feed = await session.get(Feed, (tenant_id, user_id))
    if feed is None:
        session.add(Feed(tenant_id=tenant_id, user_id=user_id, token_hash=hash_token(token)))
    else:
        feed.token_hash = hash_token(token)
        feed.created_at = utcnow()
    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict(
            "the feed was changed concurrently; retry",
            [ErrorDetail(("path", "user_id"), "busy")],
        ) from exc
    return token


async def revoke(session: AsyncSession, tenant_id: str, user_id: str) -> None:
    """Removes the user's feed; revoking a user without one is fine."""
    await get_user(session, tenant_id, user_id)
    feed = await session.get(Feed, (tenant_id, user_id))
    if feed is not None:
        await session.delete(feed)
        await session.flush()


@dataclass(frozen=True, slots=True)
class FeedState:
    """What answers a conditional request: whose feed it is and its current ETag."""

    tenant_id: str
    user_id: str
    #: A strong entity tag, quoted (``"<hex>"``).
    etag: str
    #: Deleted activities stamped before this are left out; the body must use the same.
    cutoff: datetime


def deleted_cutoff(now: datetime) -> datetime:
    """Midnight UTC starting the oldest day whose deletions are still shown."""
    day = now.astimezone(UTC).date() - timedelta(days=DELETED_KEPT_DAYS)
    return datetime.combine(day, time(), tzinfo=UTC)


def _visible(cutoff: datetime) -> ColumnElement[bool]:
    """Activities the feed shows: renderable, and not deleted before ``cutoff`` (a deleted
    activity's last change is its deletion)."""
    return and_(
        or_(Activity.start.is_not(None), Activity.due.is_not(None)),
        or_(Activity.deleted.is_(False), Activity.updated_at >= cutoff),
    )


def _of_user(tenant_id: Any, user_id: Any) -> ColumnElement[bool]:
    return and_(Activity.tenant_id == tenant_id, Activity.user_id == user_id)


async def feed_state(session: AsyncSession, token: str, now: datetime) -> FeedState:
    """The feed of ``token`` and its ETag; unknown or revoked → ``NotFound``.

    The ETag covers all the body is made of: the feed (its token), the user (zone, name:
    ``updated_at``), the day (which deletions are shown) and the user's activities, whose
    every change stamps ``updated_at``. Their newest stamp (one index lookup) identifies them
    once it is older than ``WRITE_SETTLE_S``. Until then a slower transaction could still
    commit an older stamp, so the count, the sum of versions and the number deleted are
    added (a scan of the user's activities): every edit raises a version, a deletion flips
    ``deleted``, a new activity adds one.
    """
    newest_change = (
        select(func.max(Activity.updated_at))
        .where(_of_user(Feed.tenant_id, Feed.user_id))
        .scalar_subquery()
    )
    stmt = (
        select(Feed.tenant_id, Feed.user_id, Feed.token_hash, User.updated_at, newest_change)
        .join(User, and_(User.tenant_id == Feed.tenant_id, User.id == Feed.user_id))
        .where(Feed.token_hash == hash_token(token))
    )
    row = (await session.execute(stmt)).one_or_none()
    if row is None:
        raise NotFound("no such feed", [ErrorDetail(("path", "token"), "unknown or revoked")])
    tenant_id, user_id, token_hash, user_updated, newest = row
    cutoff = deleted_cutoff(now)
    parts: list[object] = [FEED_FORMAT_VERSION, token_hash, user_updated, cutoff, newest]
    if newest is not None and newest > now - timedelta(seconds=WRITE_SETTLE_S):
        totals = select(
            func.count(),
            func.coalesce(func.sum(Activity.version), 0),
            func.coalesce(func.sum(case((Activity.deleted.is_(True), 1), else_=0)), 0),
        ).where(_of_user(tenant_id, user_id))
        parts.extend((await session.execute(totals)).one())
    fingerprint = "|".join(p.isoformat() if isinstance(p, datetime) else str(p) for p in parts)
    etag = '"' + hashlib.sha256(fingerprint.encode()).hexdigest()[:40] + '"'
    return FeedState(tenant_id=tenant_id, user_id=user_id, etag=etag, cutoff=cutoff)


async def feed_items(
    session: AsyncSession, tenant_id: str, user_id: str, cutoff: datetime
) -> tuple[FeedCalendar, list[FeedItem]]:
    """The user's visible activities as feed items, by start (tasks by due date after)."""
    user = await get_user(session, tenant_id, user_id)
    rows = await session.scalars(
        select(Activity)
        .where(_of_user(tenant_id, user_id), _visible(cutoff))
        .order_by(Activity.start.is_(None), Activity.start, Activity.due, Activity.id)
    )
    items = [
        FeedItem(spec=_spec(activity, user), modified=activity.updated_at) for activity in rows
    ]
    name = f"{FEED_NAME_PREFIX}: {user.name or user.id}"
    return FeedCalendar(name=name, timezone=user.timezone or "UTC"), items


def _spec(activity: Activity, user: User) -> EventSpec:
    spec = spec_for(activity, user)
    if activity.deleted:
        # Shown cancelled so subscribers drop it; a status change raises SEQUENCE.
        return replace(spec, status="cancelled", sequence=spec.sequence + 1)
    return spec


class _BodyCache:
    """Rendered bodies by ETag, least recently used out first, bounded by total bytes; one
    render per ETag at a time however many requests want it."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._rendering: dict[str, asyncio.Task[bytes]] = {}

    async def get_or_render(self, etag: str, render: Callable[[], Awaitable[bytes]]) -> bytes:
        body = self._bodies.get(etag)
        if body is not None:
            self._bodies.move_to_end(etag)
            return body
        task = self._rendering.get(etag)
        if task is None:
            task = asyncio.ensure_future(render())
            self._rendering[etag] = task
            task.add_done_callback(functools.partial(self._finished, etag))
        # A caller that goes away does not cancel the render the others wait for.
        return await asyncio.shield(task)

    def _finished(self, etag: str, task: asyncio.Task[bytes]) -> None:
        del self._rendering[etag]
        if task.cancelled() or task.exception() is not None:
            return
        body = task.result()
        if len(body) > self._max_bytes:
            return
        self._bodies[etag] = body
        self._bytes += len(body)
        while self._bytes > self._max_bytes:
            _, evicted = self._bodies.popitem(last=False)
            self._bytes -= len(evicted)


_bodies = _BodyCache(BODY_CACHE_MAX_BYTES)


async def feed_body(db: Database, state: FeedState) -> bytes:
    """The feed's iCalendar body for ``state.etag``: cached, or rendered once (off the event
    loop, so a large cold feed does not stall other requests)."""

    async def render() -> bytes:
        async with db.session() as session:
            calendar, items = await feed_items(
                session, state.tenant_id, state.user_id, state.cutoff
            )
        return await asyncio.to_thread(render_feed, calendar, items)

    return await _bodies.get_or_render(state.etag, render)
