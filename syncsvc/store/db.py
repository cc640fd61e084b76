"""The database handle: one async engine, sessions, and the schema brought up to date."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from syncsvc.errors import ErrorDetail, ValidationError

SQLITE_BUSY_TIMEOUT_MS = 30_000
POOL_RECYCLE_S = 1800


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
        kwargs: dict[str, Any] = {}
        if self.dialect == "sqlite":
            if self.url.database and self.url.database != ":memory:":
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        else:
            kwargs["pool_size"] = 10
            # No pre-ping: it costs a round trip on every checkout (a third of a feed's 304).
            # Recycling bounds a connection's age; a connection that died still fails once
            # and the pool replaces it.
            kwargs["pool_recycle"] = POOL_RECYCLE_S
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> AsyncSession:
        return self._sessions()

    async def migrate(self) -> None:
        """Brings the schema up to date (Alembic ``upgrade head``)."""
        from syncsvc.store.migrate import upgrade

        await upgrade(self.engine)

    async def aclose(self) -> None:
        await self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL lets readers work while a worker writes; foreign keys are off by default in SQLite."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
