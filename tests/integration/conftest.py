"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from syncsvc.store.db import Database


@pytest_asyncio.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A migrated database of each kind (``database_url``), closed after the test."""
    database = Database(database_url)
    await database.migrate()
    try:
        yield database
    finally:
        await database.aclose()
