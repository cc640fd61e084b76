"""The database handle: one async engine, sessions, and the schema brought up to date."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from syncsvc import tracing
from syncsvc.errors import DatabaseUnavailable, ErrorDetail, ValidationError
from syncsvc.store.types import json_dumps, json_loads

SQLITE_BUSY_TIMEOUT_MS = 30_000
POOL_RECYCLE_S = 1800
#: Connections (plus as many on overflow) of the urgent pool, beside the main pool's 10.
URGENT_POOL_SIZE = 2
#: A connection attempt to a database that does not answer fails after this long (asyncpg
#: waits 60 s by default: long enough for a request or a worker loop to look hung).
CONNECT_TIMEOUT_S = 5.0
#: Waiting for the database to come back: first probe after this, doubling up to the cap.
RECONNECT_FIRST_S = 0.25
RECONNECT_MAX_S = 2.0

log = logging.getLogger("syncsvc.db")

#: Modules whose frames in a traceback say an ``OSError``/``TimeoutError`` came from talking
#: to the database (not from a calendar provider or Redis).
_DRIVER_MODULES = ("sqlalchemy.", "asyncpg.", "aiosqlite.")


def async_url(url: str) -> URL:
    """Plain SQLAlchemy URLs (``sqlite:///x.db``, ``postgresql://…``) with the async driver."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+asyncpg")
    raise ValidationError(
        "unsupported database",
        [ErrorDetail(("SYNCSVC_DATABASE_URL",), f"{backend} is not supported")],
    )


class Database:
    def __init__(self, url: str) -> None:
        self.url = async_url(url)
        self.dialect = self.url.get_backend_name()
        if self.dialect == "sqlite" and self.url.database and self.url.database != ":memory:":
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: AsyncEngine = self._engine(pool_size=10, max_overflow=10)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        #: A small pool of its own for work that must not queue behind bulk work for a
        #: connection (a worker's dispatcher, a single change): made on first use.
        self._urgent: tuple[AsyncEngine, async_sessionmaker[AsyncSession]] | None = None
        self.outage = Outage()
        self._watcher: asyncio.Task[bool] | None = None

    def _engine(self, pool_size: int, max_overflow: int) -> AsyncEngine:
        kwargs: dict[str, Any] = {}
        if self.dialect == "sqlite":
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        else:
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = max_overflow
            # No pre-ping: it costs a round trip on every checkout (a third of a feed's 304).
            # Recycling bounds a connection's age; a connection that died still fails once
            # and the pool replaces it.
            kwargs["pool_recycle"] = POOL_RECYCLE_S
            kwargs["connect_args"] = {"timeout": CONNECT_TIMEOUT_S}
        engine = create_async_engine(
            self.url, json_serializer=json_dumps, json_deserializer=json_loads, **kwargs
        )
        tracing.instrument_engine(engine.sync_engine)
        if self.dialect == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine

    def session(self, *, urgent: bool = False) -> AsyncSession:
        if not urgent:
            return self._sessions()
        if self._urgent is None:
            engine = self._engine(URGENT_POOL_SIZE, URGENT_POOL_SIZE)
            self._urgent = (engine, async_sessionmaker(engine, expire_on_commit=False))
        return self._urgent[1]()

    async def migrate(self) -> None:
        """Brings the schema up to date (Alembic ``upgrade head``)."""
        from syncsvc.store.migrate import upgrade

        await upgrade(self.engine)

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        await self.engine.dispose()
        if self._urgent is not None:
            await self._urgent[0].dispose()

    def unavailable(self, exc: BaseException) -> None:
        """Records an outage seen by a request: logged once, and watched in the background
        until the database answers again (logged once more)."""
        self.outage.down(exc)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self.wait_until_up())

    async def ping(self) -> None:
        """One ``SELECT 1`` on a connection of the pool; raises what the driver raises."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def wait_until_up(self, stop: asyncio.Event | None = None) -> bool:
        """Probes with backoff until the database answers (``True``), or ``stop`` is set
        (``False``). Ends the outage ``self.outage`` recorded, if any."""
        stop = stop or asyncio.Event()
        delay = RECONNECT_FIRST_S
        while not stop.is_set():
            try:
                await self.ping()
            except Exception as exc:  # whatever it is, the database is not usable yet
                self.outage.down(exc, probed=True)
            else:
                self.outage.up()
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
        return False


class Outage:
    """One log line when the database goes away and one when it is back, however many
    requests and loops of the process hit it in between.

    A connection the pool held through a restart fails on its first use after the database
    answered again (there is no pre-ping): such a failure within ``STALE_S`` of the line saying
    it is back is the tail of the same outage, watched as one but not logged again, unless the
    watcher's own probe fails too (then the database really went away again)."""

    STALE_S = 3.0

    def __init__(self) -> None:
        self.since: float | None = None
        self.back_at = float("-inf")
        self.tail = False

    def down(self, exc: BaseException, *, probed: bool = False) -> None:
        if self.since is None:
            self.since = time.monotonic()
            self.tail = self.since - self.back_at < self.STALE_S and not probed
            if not self.tail:
                log.warning("event=db.unavailable error=%s", describe(exc))
        elif probed and self.tail:
            self.tail = False
            log.warning("event=db.unavailable error=%s", describe(exc))

    def up(self) -> None:
        if self.since is not None:
            if not self.tail:
                log.warning("event=db.back after_s=%.1f", time.monotonic() - self.since)
                self.back_at = time.monotonic()
            self.since = None


def describe(exc: BaseException) -> str:
    """The innermost cause as ``Type: message`` on one line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached or used right now (down,
    restarting, a connection cut, SQLite locked), as opposed to a bug or a refused statement.

    An ``ExceptionGroup`` counts when every member does."""
    if isinstance(exc, DatabaseUnavailable):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(is_unavailable(e) for e in exc.exceptions)
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or isinstance(exc, InterfaceError):
            return True
        if isinstance(exc, OperationalError):
            orig = exc.orig
            return not isinstance(orig, sqlite3.OperationalError) or "locked" in str(orig)
        return _is_connection_class(exc.orig)
    if _is_connection_class(exc):
        return True
    if isinstance(exc, OSError | TimeoutError):
        return any(
            str(frame.f_globals.get("__name__", "")).startswith(_DRIVER_MODULES)
            for frame, _ in traceback.walk_tb(exc.__traceback__)
        )
    return False


def _is_connection_class(exc: BaseException | None) -> bool:
    """asyncpg's own connection errors (also seen wrapped by SQLAlchemy's adapter)."""
    try:
        from asyncpg import exceptions as pg  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - asyncpg is a dependency
        return False
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(
            exc,
            pg.PostgresConnectionError
            | pg.CannotConnectNowError
            | pg.AdminShutdownError
            | pg.CrashShutdownError
            | pg.ConnectionDoesNotExistError
            | pg.InterfaceError
            | pg.TooManyConnectionsError,
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL lets readers work while a worker writes; foreign keys are off by default in SQLite."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
