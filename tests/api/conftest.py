"""An aiohttp test client on ``build_app`` for each database kind, and two tenants with keys.

Every API test runs on SQLite and on PostgreSQL through the parametrized ``database_url``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database

OPERATOR_KEY = "op-" + "k" * 40
SECRET_KEY = "test-secret-key-" + "s" * 32


@dataclass(frozen=True, slots=True)
class TenantKey:
    id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass(frozen=True, slots=True)
class Tenants:
    a: TenantKey
    b: TenantKey


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, secret_key=SECRET_KEY, operator_key=OPERATOR_KEY)


@pytest_asyncio.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    database = Database(settings.database_url)
    await database.migrate()
    try:
        yield database
    finally:
        await database.aclose()


@pytest.fixture
def app(settings: Settings, db: Database) -> web.Application:
    return build_app(settings, db)


@pytest_asyncio.fixture
async def client(app: web.Application) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


@pytest_asyncio.fixture
async def tenants(db: Database) -> Tenants:
    a, key_a = await create_tenant(db, "Tenant A")
    b, key_b = await create_tenant(db, "Tenant B")
    return Tenants(TenantKey(a.id, key_a), TenantKey(b.id, key_b))
