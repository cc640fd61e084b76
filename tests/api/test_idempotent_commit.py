"""An ``Idempotency-Key`` commits a batch once, whatever happens after the batch's commit.

The hook: the process "dies" right after the batch transaction committed and before the
middleware stores the answer (``idempotency.finish`` raises, as a kill -9 there would stop it).
A retry with the same key, even after the reservation's time-out, must answer the first batch
and leave exactly one batch behind.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import func, select, update

from syncsvc.config import Settings
from syncsvc.service import idempotency
from syncsvc.store.db import Database
from syncsvc.store.models import Batch, IdempotencyKey
from syncsvc.store.types import utcnow
from tests.api.conftest import Tenants
from tests.api.test_plans import fixed_clock_app, plan_body, put_users

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def app(settings: Settings, db: Database) -> web.Application:
    return fixed_clock_app(settings, db)


async def _batches(db: Database) -> int:
    async with db.session() as s:
        return int(await s.scalar(select(func.count()).select_from(Batch)) or 0)


async def test_a_crash_after_the_commit_never_commits_the_batch_twice(
    client: Client, tenants: Tenants, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await put_users(client, tenants.a)
    body = plan_body()
    headers = {**tenants.a.headers, "Idempotency-Key": "run-42"}

    async def dies(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the API process was killed here")

    with monkeypatch.context() as patch:
        patch.setattr(idempotency, "finish", dies)
        first = await client.post("/v1/batches", json=body, headers=headers)
    assert first.status == 500  # the client saw the connection go: it will retry
    assert await _batches(db) == 1

    # Even once the reservation would have timed out, the same key is the same batch.
    async with db.session() as s, s.begin():
        await s.execute(
            update(IdempotencyKey).values(
                created_at=utcnow() - timedelta(seconds=idempotency.RESERVATION_TTL_S + 1)
            )
        )
    retried = await client.post("/v1/batches", json=body, headers=headers)
    assert retried.status == 201, await retried.text()
    again = await client.post("/v1/batches", json=body, headers=headers)
    assert (await again.json())["id"] == (await retried.json())["id"]
    assert await _batches(db) == 1
    async with db.session() as s:
        (only,) = (await s.scalars(select(Batch.id))).all()
    assert (await retried.json())["id"] == only
