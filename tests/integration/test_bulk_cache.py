"""A bulk write's larger SQLite page cache belongs to its connection for the write only."""

from __future__ import annotations

import pytest

from syncsvc.store.bulk import SQLITE_BULK_CACHE_KIB, bulk_cache
from syncsvc.store.db import Database


# PostgreSQL's buffers are the server's, shared: nothing per connection to change.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_cache_is_larger_during_the_write_and_as_before_after(db: Database) -> None:
    async with db.session() as s, s.begin():
        conn = await s.connection()
        before = (await conn.exec_driver_sql("PRAGMA cache_size")).scalar_one()
        async with bulk_cache(s):
            during = (await conn.exec_driver_sql("PRAGMA cache_size")).scalar_one()
        after = (await conn.exec_driver_sql("PRAGMA cache_size")).scalar_one()
    assert during == -SQLITE_BULK_CACHE_KIB != before
    assert after == before
