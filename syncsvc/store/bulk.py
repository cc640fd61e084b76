"""Bulk inserts that skip SQLAlchemy's per-row work: a batch of 100,000 targets writes 200,000
rows, and binding them through Core costs more than the database spends on them.

Rows are built as the columns store their values (``Values``: instants as naive UTC, JSON as
text), in a thread, then handed to the driver: PostgreSQL ``COPY`` (asyncpg's
``copy_records_to_table``), SQLite one ``executemany`` per slice (run in aiosqlite's thread).
Both go through the session's connection, so the rows join the caller's transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.store.types import dumps_fast

#: Rows per SQLite ``executemany`` and per PostgreSQL ``COPY``: the loop turns between them.
ROWS_PER_WRITE = 5_000
#: SQLite's page cache while a bulk write runs (KiB): its indexes of 100,000 new rows no
#: longer fit the default 2 MiB, and spilling pages mid-transaction slows every insert.
SQLITE_BULK_CACHE_KIB = 65_536


class Values:
    """Python values as one backend's columns store them: build rows with these (in a
    thread), then ``insert_rows`` hands them to the driver unchanged."""

    def __init__(self, dialect: str) -> None:
        self.sqlite = dialect == "sqlite"

    def instant(self, value: datetime | None) -> Any:
        """Naive UTC; on SQLite as SQLAlchemy's text, so these rows sort with its own."""
        if value is None:
            return None
        naive = value.astimezone(UTC).replace(tzinfo=None)
        return naive.isoformat(" ", "microseconds") if self.sqlite else naive

    def day(self, value: date | None) -> Any:
        return value.isoformat() if self.sqlite and value is not None else value

    @staticmethod
    def json(value: Any) -> str:
        return dumps_fast(value)


@contextlib.asynccontextmanager
async def bulk_cache(session: AsyncSession) -> AsyncIterator[None]:
    """On SQLite, a larger page cache for this connection while a bulk write runs, given
    back after (lowering the size frees the pages): one connection's, not every pooled one's."""
    conn = await session.connection()
    if conn.dialect.name != "sqlite":
        yield
        return
    before = (await conn.exec_driver_sql("PRAGMA cache_size")).scalar_one()
    await conn.exec_driver_sql(f"PRAGMA cache_size=-{SQLITE_BULK_CACHE_KIB}")
    try:
        yield
    finally:
        await conn.exec_driver_sql(f"PRAGMA cache_size={int(before)}")


async def insert_rows(
    session: AsyncSession,
    table: Table,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
) -> None:
    """Writes ``rows`` (values in ``columns`` order, made with ``Values``) into ``table`` in the
    session's transaction."""
    conn = await session.connection()
    sqlite = conn.dialect.name == "sqlite"
    names = ", ".join(f'"{c}"' for c in columns)
    sql = f"INSERT INTO {table.name} ({names}) VALUES ({', '.join('?' for _ in columns)})"
    driver: Any = None
    if not sqlite:
        driver = (await conn.get_raw_connection()).driver_connection
    for start in range(0, len(rows), ROWS_PER_WRITE):
        part = rows[start : start + ROWS_PER_WRITE]
        if sqlite:
            await conn.exec_driver_sql(sql, part)
        else:
            await driver.copy_records_to_table(table.name, records=part, columns=list(columns))
