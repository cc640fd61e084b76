"""A single change's database work does not queue behind bulk work for a connection: the
worker's dispatcher and interactive cycles use the database's urgent pool (PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from sqlalchemy import text

from syncsvc.store.db import Database
from tests.servers.postgres import PostgresServer


async def test_the_urgent_pool_answers_while_bulk_work_holds_every_connection(
    postgres_server: PostgresServer,
) -> None:
    db = Database(await postgres_server.create_database())
    try:
        async with contextlib.AsyncExitStack() as held:
            pool = db.engine.pool
            for _ in range(pool.size() + 10):  # the pool and all of its overflow
                session = await held.enter_async_context(db.session())
                await session.execute(text("SELECT 1"))
            blocked = asyncio.create_task(_select(db, urgent=False))
            done, _ = await asyncio.wait({blocked}, timeout=1.0)
            assert not done, "the main pool had a free connection after all"
            assert await asyncio.wait_for(_select(db, urgent=True), 30) == 1
        assert await asyncio.wait_for(blocked, 30) == 1  # and the bulk work goes on after
    finally:
        await db.aclose()


async def _select(db: Database, *, urgent: bool) -> int:
    async with db.session(urgent=urgent) as s:
        return int((await s.execute(text("SELECT 1"))).scalar_one())


pytestmark = pytest.mark.timeout(120)
