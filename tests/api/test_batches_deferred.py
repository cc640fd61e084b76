"""A batch larger than ``SYNCSVC_COMMIT_ASYNC_ACTIVITIES`` answers 202 ``committing`` and is
written in the background in one transaction: nothing of it is visible (activities, ledger,
operations a worker could claim) until the batch turns ``syncing``; a failed or interrupted
commit leaves a ``failed`` batch with an error and no rows, and the same Idempotency-Key
commits it afresh. On SQLite and PostgreSQL (the ``database_url`` parameter)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.api import batches as batches_api
from syncsvc.config import Settings
from syncsvc.service import batches as service
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, Batch, ExternalEvent, IdempotencyKey, Operation
from tests.api.conftest import Tenants
from tests.api.test_plans import fixed_clock_app, plan_body, put_users

Client = TestClient[web.Request, web.Application]
TARGETS = 12
POLL_S = 0.01


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, commit_async_activities=2)


@pytest.fixture
def app(settings: Settings, db: Database) -> web.Application:
    return fixed_clock_app(settings, db)


@pytest_asyncio.fixture
async def gate(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[asyncio.Event]:
    """Holds each deferred commit after its rows are written, before its transaction ends."""
    opened = asyncio.Event()
    write = service._write

    async def held(session: AsyncSession, planned: service.PlannedBatch, now: Any) -> None:
        await write(session, planned, now)
        if planned.id in service._PROGRESS:  # deferred commits only
            await opened.wait()

    monkeypatch.setattr(service, "_write", held)
    yield opened
    opened.set()


async def _rows(db: Database, batch_id: str) -> tuple[int, int, int]:
    async with db.session() as s:
        counts = [
            await s.scalar(select(func.count()).select_from(m).where(m.batch_id == batch_id))
            for m in (Activity, ExternalEvent, Operation)
        ]
    return (int(counts[0] or 0), int(counts[1] or 0), int(counts[2] or 0))


async def _until(client: Client, headers: dict[str, str], batch_id: str, state: str) -> Any:
    async with asyncio.timeout(20):
        while True:
            got = await client.get(f"/v1/batches/{batch_id}", headers=headers)
            view = await got.json()
            if view["state"] == state:
                return view
            await asyncio.sleep(POLL_S)


async def test_a_large_batch_answers_202_and_is_invisible_until_committed(
    client: Client, tenants: Tenants, db: Database, gate: asyncio.Event
) -> None:
    await put_users(client, tenants.a)
    headers = tenants.a.headers
    # With a key too: keeping the answer must not wait for the background write.
    keyed = {**headers, "Idempotency-Key": "big-0"}
    async with asyncio.timeout(10):
        answer = await client.post("/v1/batches", json=plan_body(TARGETS), headers=keyed)
    assert answer.status == 202, await answer.text()
    created = await answer.json()
    assert created["state"] == "committing"
    assert created["progress"] == {"done": 0, "total": TARGETS}
    batch_id = created["id"]

    # Written but not committed: progress says so, and nobody sees a row.
    view = await _until(client, headers, batch_id, "committing")
    async with asyncio.timeout(20):
        while view["progress"]["done"] < TARGETS:
            view = await (await client.get(f"/v1/batches/{batch_id}", headers=headers)).json()
    assert view["progress"] == {"done": TARGETS, "total": TARGETS}
    assert view["total"] == TARGETS
    assert await _rows(db, batch_id) == (0, 0, 0)  # a worker's claim reads operations
    listed = await (await client.get("/v1/batches", headers=headers)).json()
    assert [b["state"] for b in listed["items"]] == ["committing"]
    acts = await client.get(f"/v1/batches/{batch_id}/activities", headers=headers)
    assert (await acts.json())["items"] == []
    everything = await client.get("/v1/activities", headers=headers)
    assert (await everything.json())["items"] == []
    patched = await client.patch(
        f"/v1/batches/{batch_id}", json={"template": {"subject": "x"}}, headers=headers
    )
    assert patched.status == 409
    assert (await client.delete(f"/v1/batches/{batch_id}", headers=headers)).status == 409

    gate.set()
    done = await _until(client, headers, batch_id, "syncing")
    assert done["progress"] is None and done["error"] is None
    activities, ledger, operations = await _rows(db, batch_id)
    assert activities == TARGETS
    assert 0 < ledger == operations < TARGETS  # u2 has a calendar, u1 none
    acts = await client.get(f"/v1/batches/{batch_id}/activities?limit=500", headers=headers)
    assert len((await acts.json())["items"]) == TARGETS
    # The request was stored with the rows: a template edit re-renders every activity.
    patched = await client.patch(
        f"/v1/batches/{batch_id}",
        json={"template": {"subject": "Edited $account-name$"}},
        headers=headers,
    )
    assert patched.status == 200, await patched.text()
    acts = await client.get(f"/v1/batches/{batch_id}/activities?limit=500", headers=headers)
    subjects = [a["subject"] for a in (await acts.json())["items"]]
    assert len(subjects) == TARGETS and all(s.startswith("Edited ") for s in subjects)
    assert len(set(subjects)) == TARGETS  # each target's own name


async def test_small_batches_still_answer_201(
    client: Client, tenants: Tenants, db: Database
) -> None:
    await put_users(client, tenants.a)
    answer = await client.post("/v1/batches", json=plan_body(2), headers=tenants.a.headers)
    assert answer.status == 201, await answer.text()
    assert (await answer.json())["state"] == "syncing"


async def test_a_failed_commit_leaves_a_failed_batch_and_the_key_retries(
    client: Client,
    tenants: Tenants,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await put_users(client, tenants.a)
    headers = {**tenants.a.headers, "Idempotency-Key": "big-1"}
    body = plan_body(TARGETS)

    async def breaks(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the database refused the operations")

    with monkeypatch.context() as patch:
        patch.setattr("syncsvc.service.batches.add_batch_creates", breaks)
        answer = await client.post("/v1/batches", json=body, headers=headers)
        assert answer.status == 202, await answer.text()
        first = (await answer.json())["id"]
        failed = await _until(client, tenants.a.headers, first, "failed")
    assert "the database refused the operations" in failed["error"]
    assert await _rows(db, first) == (0, 0, 0)  # the activities written before it are gone
    async with db.session() as s:
        assert await s.get(IdempotencyKey, (tenants.a.id, "big-1")) is None

    retried = await client.post("/v1/batches", json=body, headers=headers)
    assert retried.status == 202, await retried.text()
    second = (await retried.json())["id"]
    assert second != first
    await _until(client, tenants.a.headers, second, "syncing")
    assert (await _rows(db, second))[0] == TARGETS
    replay = await client.post("/v1/batches", json=body, headers=headers)
    assert replay.status == 202
    assert (await replay.json())["id"] == second


async def test_a_commit_cut_by_a_restart_turns_failed_and_the_key_retries(
    settings: Settings,
    tenants: Tenants,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process dies after the 202 (its background write never runs); the next start
    marks the batch failed, with no rows, and forgets its key."""
    headers = {**tenants.a.headers, "Idempotency-Key": "big-2"}
    body = plan_body(TARGETS)

    def dies(app: web.Application, work: Coroutine[Any, Any, None]) -> None:
        work.close()

    async with TestClient(TestServer(fixed_clock_app(settings, db))) as first:
        await put_users(first, tenants.a)
        with monkeypatch.context() as patch:
            patch.setattr(batches_api, "_start", dies)
            answer = await first.post("/v1/batches", json=body, headers=headers)
        assert answer.status == 202, await answer.text()
        batch_id = (await answer.json())["id"]
        service._PROGRESS.pop(batch_id, None)  # that process's memory is gone with it
        async with db.session() as s:
            assert await s.scalar(select(Batch.state).where(Batch.id == batch_id)) == "committing"

    async with TestClient(TestServer(fixed_clock_app(settings, db))) as restarted:
        got = await restarted.get(f"/v1/batches/{batch_id}", headers=tenants.a.headers)
        view = await got.json()
        assert view["state"] == "failed"
        assert "interrupted" in view["error"]
        assert await _rows(db, batch_id) == (0, 0, 0)
        retried = await restarted.post("/v1/batches", json=body, headers=headers)
        assert retried.status == 202, await retried.text()
        second = (await retried.json())["id"]
        assert second != batch_id
        await _until(restarted, tenants.a.headers, second, "syncing")


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite keeps none
async def test_a_large_commit_refreshes_the_planners_statistics(
    client: Client, tenants: Tenants, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a large batch (here: both paths, with the bar lowered) leaves the bulk
    tables analysed, so the workers' next reads plan from what is there now."""
    monkeypatch.setattr(service, "ANALYZE_AFTER_ACTIVITIES", 2)
    await put_users(client, tenants.a)
    for n, targets in enumerate((3, TARGETS), 1):  # 201, then 202 (deferred)
        answer = await client.post(
            "/v1/batches", json=plan_body(targets), headers=tenants.a.headers
        )
        assert answer.status in (201, 202), await answer.text()
        await _until(client, tenants.a.headers, (await answer.json())["id"], "syncing")
        async with asyncio.timeout(20):
            while True:
                async with db.session() as s:
                    analysed = (
                        (
                            await s.execute(
                                text(
                                    "SELECT analyze_count FROM pg_stat_user_tables WHERE relname "
                                    "IN ('activities', 'external_events', 'operations')"
                                )
                            )
                        )
                        .scalars()
                        .all()
                    )
                if len(analysed) == 3 and min(analysed) >= n:
                    break
                await asyncio.sleep(POLL_S)
