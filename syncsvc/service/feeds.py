"""Per-user secret iCal feeds: create/rotate/revoke the URL, and answer a feed cheaply.

The token is shown once (in the URL) and only its SHA-256 is stored; a feed is found by that
hash with an indexed equality, so no secret is ever compared in Python.

Feeds are polled often and mostly unchanged, so answering is split in two. ``feed_state``
yields a strong ETag from the database alone, with ONE statement run straight on the driver
(no ORM session, no transaction to begin and end): a ``304`` needs nothing else. Nothing of
the ETag is cached across requests, so a committed change shows in the very next answer.
``feed_body`` renders only when the ETag is new to this process; bodies are cached by ETag,
and concurrent requests for the same new ETag share one render.

A feed shows a window of whole UTC days around today (``FeedWindow``), so a user's history
does not grow it forever; it is rendered off the event loop, and an activity that cannot be
rendered is left out (one log line per render) rather than failing the whole feed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import secrets
import sqlite3
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    ScalarSelect,
    Select,
    String,
    and_,
    bindparam,
    case,
    cast,
    func,
    literal_column,
    null,
    or_,
    select,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from syncsvc.errors import Conflict, ErrorDetail, NotFound
from syncsvc.feeds.ical import FeedCalendar, FeedItem, RenderedFeed, render_feed
from syncsvc.providers.base import EventSpec
from syncsvc.queue.reconcile import spec_for
from syncsvc.service.users import get_user
from syncsvc.store.crypto import hash_token
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, Feed, User
from syncsvc.store.types import utcnow

log = logging.getLogger("syncsvc.feeds")

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
FEED_FORMAT_VERSION = 3
#: Activities fetched per round trip: the event loop serves other requests between slices.
FEED_FETCH_ROWS = 1000
#: Activity ids named in the one log line of a render that left some out.
SKIPPED_LOGGED_MAX = 20
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
class FeedWindow:
    """How many whole UTC days before and after today a feed shows
    (``SYNCSVC_FEED_DAYS_BACK``, ``SYNCSVC_FEED_DAYS_AHEAD``)."""

    days_back: int
    days_ahead: int

    def bounds(self, now: datetime) -> tuple[datetime, datetime]:
        """Midnight UTC starting the first day shown and ending the last: the feed moves on
        with the date, never with the time of the request."""
        today = now.astimezone(UTC).date()
        return _midnight(today - timedelta(days=self.days_back)), _midnight(
            today + timedelta(days=self.days_ahead + 1)
        )


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class FeedState:
    """What answers a conditional request: whose feed it is and its current ETag; the body
    must show exactly what the ETag covers (the same cutoff and window)."""

    tenant_id: str
    user_id: str
    #: A strong entity tag, quoted (``"<hex>"``).
    etag: str
    #: Deleted activities stamped before this are left out.
    cutoff: datetime
    #: Activities start (tasks without a start: are due) from ``since`` to before ``until``.
    since: datetime
    until: datetime
    #: Tasks as all-day VEVENTs (``?tasks=events``): another body, so another ETag.
    tasks_as_events: bool = False

    def with_tasks_as_events(self) -> FeedState:
        return replace(self, etag=self.etag[:-1] + '-events"', tasks_as_events=True)


def deleted_cutoff(now: datetime) -> datetime:
    """Midnight UTC starting the oldest day whose deletions are still shown."""
    return _midnight(now.astimezone(UTC).date() - timedelta(days=DELETED_KEPT_DAYS))


def _shown(state: FeedState) -> ColumnElement[bool]:
    """Activities the feed shows: in its window, and not deleted before the cutoff (a
    deleted activity's last change is its deletion)."""
    return and_(
        or_(
            and_(Activity.start >= state.since, Activity.start < state.until),
            and_(
                Activity.start.is_(None),
                Activity.due >= state.since.date(),
                Activity.due < state.until.date(),
            ),
        ),
        or_(Activity.deleted.is_(False), Activity.updated_at >= state.cutoff),
    )


def _of_user(tenant_id: Any, user_id: Any) -> ColumnElement[bool]:
    return and_(Activity.tenant_id == tenant_id, Activity.user_id == user_id)


def _state_statement(with_totals: bool) -> Select[str, str, str, datetime, datetime, str]:
    """The feed of ``:token_hash`` and all its ETag needs, as ONE statement (one round trip).

    The newest ``updated_at`` is an index lookup; the totals (a scan of the user's
    activities) are only evaluated when that newest change is after ``:settle_after``, and
    only ``with_totals`` (else that column is NULL and ``:settle_after`` is not a parameter).
    """

    def newest_change() -> ScalarSelect[datetime]:
        return (
            select(func.max(Activity.updated_at))
            .where(_of_user(Feed.tenant_id, Feed.user_id))
            .scalar_subquery()
        )

    # Constants as SQL literals: the only parameters are the token's hash and the stamp.
    zero = literal_column("0", Integer)
    one = literal_column("1", Integer)
    separator = literal_column("'|'", String)
    deleted = func.sum(case((Activity.deleted.is_(True), one), else_=zero))
    deleted_count = func.coalesce(deleted, zero)
    totals = (
        select(
            cast(func.count(), String)
            + separator
            + cast(func.coalesce(func.sum(Activity.version), zero), String)
            + separator
            + cast(deleted_count, String)
        )
        .where(_of_user(Feed.tenant_id, Feed.user_id))
        .scalar_subquery()
    )
    settle_after = bindparam("settle_after", type_=Activity.updated_at.type)
    unsettled = (
        case((newest_change() > settle_after, totals), else_=null()) if with_totals else null()
    )
    return (
        select(
            Feed.tenant_id,
            Feed.user_id,
            Feed.token_hash,
            User.updated_at,
            newest_change(),
            unsettled,
        )
        .join(User, and_(User.tenant_id == Feed.tenant_id, User.id == Feed.user_id))
        .where(Feed.token_hash == bindparam("token_hash"))
    )


@dataclass(frozen=True, slots=True)
class _Compiled:
    """``_STATE`` as the driver sees it: SQL text, parameter order, the stamp's converter."""

    sql: str
    names: tuple[str, ...]
    stamp: Callable[[Any], Any] | None


@functools.cache
def _compiled(dialect: Dialect, with_totals: bool = True) -> _Compiled:
    compiled = _state_statement(with_totals).compile(dialect=dialect)
    if compiled.positiontup is None:
        raise ValueError(f"{dialect.name}: a positional paramstyle was expected")
    # The dialect's implementation: on SQLite it writes the stored text, not a datetime.
    stamp = Activity.updated_at.type.dialect_impl(dialect).bind_processor(dialect)
    return _Compiled(str(compiled), tuple(compiled.positiontup), stamp)


async def _fetch_state(conn: AsyncConnection, token_hash: str, settle_after: datetime) -> Any:
    """One round trip straight on the driver: no transaction begun (so none to end), no
    cursor or result objects; ``aiosqlite`` does it in one hop to its thread, not four."""
    plan = _compiled(conn.dialect)
    stamp = settle_after if plan.stamp is None else plan.stamp(settle_after)
    values = {"token_hash": token_hash, "settle_after": stamp}
    args = [values[name] for name in plan.names]
    driver = (await conn.get_raw_connection()).driver_connection
    if driver is None:
        raise ConnectionError("the pooled connection has no driver connection")
    if conn.dialect.name == "sqlite":
        rows = await driver.execute_fetchall(plan.sql, args)
        return rows[0] if rows else None
    return await driver.fetchrow(plan.sql, *args)


class _SqliteReader:
    """A plain ``sqlite3`` connection, owned by the event loop's thread, for the settled
    lookup only: an indexed read of ~10 µs costs less inline than the two hops to an
    ``aiosqlite`` thread (query, then the pool's rollback). In WAL mode a reader never waits
    for a writer, and in autocommit every statement sees all that committed before it; it
    does not wait for locks at all (``timeout=0``): busy means the async path answers."""

    def __init__(self, path: str, dialect: Dialect) -> None:
        self._conn = sqlite3.connect(path, timeout=0, isolation_level=None)
        self._plan = _compiled(dialect, with_totals=False)
        stamp = _compiled(dialect).stamp
        if stamp is None:
            raise ValueError("SQLite stores stamps as text")
        self._stamp = stamp

    def settled(self, token_hash: str, settle_after: datetime) -> tuple[Any, ...] | None:
        """The state row if its newest change is settled; ``None`` when the async path
        must answer (recent change, unknown token, or a busy database)."""
        try:
            row: tuple[Any, ...] | None = self._conn.execute(
                self._plan.sql, (token_hash,)
            ).fetchone()
        except sqlite3.OperationalError:
            return None
        # Stamps are stored as fixed-width ISO text, so text order is time order.
        if row is None or (row[4] is not None and row[4] > self._stamp(settle_after)):
            return None
        return row


_readers: weakref.WeakKeyDictionary[Database, _SqliteReader | None] = weakref.WeakKeyDictionary()


def _reader(db: Database) -> _SqliteReader | None:
    """The database's inline reader (opened once, closed with it by the garbage collector);
    ``None`` for PostgreSQL (its driver already answers in one round trip) and in-memory
    SQLite (a second connection would be another database)."""
    try:
        return _readers[db]
    except KeyError:
        pass
    path = db.url.database
    reader = None
    if db.dialect == "sqlite" and path and path != ":memory:":
        reader = _SqliteReader(path, db.engine.dialect)
    _readers[db] = reader
    return reader


async def current_state(db: Database, token: str, now: datetime, window: FeedWindow) -> FeedState:
    """``feed_state`` as the feed route wants it: inline for a settled SQLite feed, else one
    statement on a pooled connection. Nothing is cached: every call reads the database."""
    reader = _reader(db)
    if reader is not None:
        row = reader.settled(hash_token(token), now - timedelta(seconds=WRITE_SETTLE_S))
        if row is not None:
            return _state_of(row, now, window)
    async with db.engine.connect() as conn:
        return await feed_state(conn, token, now, window)


async def feed_state(
    conn: AsyncConnection | AsyncSession, token: str, now: datetime, window: FeedWindow
) -> FeedState:
    """The feed of ``token`` and its ETag; unknown or revoked → ``NotFound``.

    The ETag covers all the body is made of: the feed (its token), the user (zone, name:
    ``updated_at``), the day (which deletions and which window are shown) and all the
    user's activities (those outside the window too: a move across its edge is a change),
    whose every change stamps ``updated_at``. Their newest stamp (one index lookup)
    identifies them once it is older than ``WRITE_SETTLE_S``. Until then a slower
    transaction could still commit an older stamp, so the count, the sum of versions and
    the number deleted are added (a scan of the user's activities): every edit raises a
    version, a deletion flips ``deleted``, a new activity adds one. All of it is one
    statement, run on the driver; stamps enter the fingerprint as the driver returns them
    (stable per database).
    """
    if isinstance(conn, AsyncSession):
        conn = await conn.connection()
    settle_after = now - timedelta(seconds=WRITE_SETTLE_S)
    row = await _fetch_state(conn, hash_token(token), settle_after)
    if row is None:
        raise NotFound("no such feed", [ErrorDetail(("path", "token"), "unknown or revoked")])
    return _state_of(tuple(row), now, window)


def _state_of(row: tuple[Any, ...], now: datetime, window: FeedWindow) -> FeedState:
    tenant_id, user_id, token_hash, user_updated, newest, totals = row
    cutoff = deleted_cutoff(now)
    since, until = window.bounds(now)
    days = f"{cutoff.isoformat()}|{since.isoformat()}|{until.isoformat()}"
    fingerprint = f"{FEED_FORMAT_VERSION}|{token_hash}|{user_updated}|{days}|{newest}|{totals}"
    etag = '"' + hashlib.sha256(fingerprint.encode()).hexdigest()[:40] + '"'
    return FeedState(
        tenant_id=tenant_id, user_id=user_id, etag=etag, cutoff=cutoff, since=since, until=until
    )


async def feed_activities(session: AsyncSession, state: FeedState) -> tuple[User, list[Activity]]:
    """The user and the activities their feed shows, by start (tasks by due date after),
    fetched in slices of ``FEED_FETCH_ROWS`` so other requests run between them."""
    user = await get_user(session, state.tenant_id, state.user_id)
    result = await session.stream_scalars(
        select(Activity)
        .where(_of_user(state.tenant_id, state.user_id), _shown(state))
        .order_by(Activity.start.is_(None), Activity.start, Activity.due, Activity.id)
        .execution_options(yield_per=FEED_FETCH_ROWS)
    )
    return user, [activity async for rows in result.partitions() for activity in rows]


def render_activities(user: User, activities: Sequence[Activity], state: FeedState) -> RenderedFeed:
    """The feed of ``activities`` (loaded, so safe to read in a worker thread); one that
    cannot be rendered is left out, named in ``skipped``, rather than costing the user the
    whole feed."""
    items: list[FeedItem] = []
    skipped: list[tuple[str, Exception]] = []
    for activity in activities:
        try:
            items.append(FeedItem(spec=_spec(activity, user), modified=activity.updated_at))
        except Exception as exc:  # e.g. an end past year 9999 in the user's zone
            skipped.append((activity.id, exc))
    calendar = FeedCalendar(
        name=f"{FEED_NAME_PREFIX}: {user.name or user.id}",
        timezone=user.timezone or "UTC",
        since=state.since,
        until=state.until,
    )
    rendered = render_feed(calendar, items, tasks_as_events=state.tasks_as_events)
    return replace(rendered, skipped=(*skipped, *rendered.skipped))


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
            user, activities = await feed_activities(session, state)
        rendered = await asyncio.to_thread(render_activities, user, activities, state)
        if rendered.skipped:
            ids = [activity_id for activity_id, _ in rendered.skipped]
            log.warning(
                "event=feed.skipped tenant=%s user=%s count=%d activities=%s",
                state.tenant_id,
                state.user_id,
                len(ids),
                ",".join(ids[:SKIPPED_LOGGED_MAX]),
                exc_info=rendered.skipped[0][1],
            )
        return rendered.body

    return await _bodies.get_or_render(state.etag, render)
