"""The operator endpoints: ``/v1/ops/cycles``, ``/v1/ops/queue``, ``/v1/ops/retry``, and the
queue metrics, on SQLite and PostgreSQL.

A batch for a user whose CalDAV server refuses our credentials gives up (dead operations, a
failed batch); after the user is reconnected to a real Radicale calendar, an operator retry
and the worker sync it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select, update

from syncsvc.config import Settings
from syncsvc.queue.transitions import retry_dead
from syncsvc.runtime import run_workers
from syncsvc.store.db import Database
from syncsvc.store.models import Batch, ExternalEvent, Operation, SyncCycle
from tests.api.conftest import OPERATOR_KEY, Tenants
from tests.servers.radicale import RADICALE_PASSWORD, RADICALE_USER, new_calendar

Client = TestClient[web.Request, web.Application]
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}
WAIT_S = 30.0


def _batch_body(users: list[str], n: int) -> dict[str, Any]:
    return {
        "targetgroup_name": "Breweries",
        "targets": [{"id": f"t{i}", "name": f"Brewery {i}"} for i in range(n)],
        "template": {"kind": "meeting", "subject": "Visit $account-name$"},
        "schedule": {"start_date": "2030-06-03", "duration": "01:00"},
        "assignment": {"mode": "users", "users": users},
    }


def _caldav_user(url: str, password: str = RADICALE_PASSWORD) -> dict[str, Any]:
    return {
        "name": "Christine Kayser",
        "timezone": "Europe/Copenhagen",
        "calendar": {
            "provider": "caldav",
            "url": url,
            "username": RADICALE_USER,
            "password": password,
        },
    }


async def _wait(condition: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        got = await condition()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@pytest_asyncio.fixture
async def refusing_caldav() -> AsyncIterator[str]:
    """A CalDAV address whose server refuses every request with 401 (wrong password)."""

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="cal"'})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("/alice/calendar/"))


@pytest_asyncio.fixture
async def worker(settings: Settings, db: Database) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_workers(settings, db, stop))
    yield
    stop.set()
    await task


async def test_ops_need_the_operator_key(client: Client, tenants: Tenants) -> None:
    calls = [
        ("GET", "/v1/ops/cycles", None),
        ("GET", "/v1/ops/queue", None),
        ("POST", "/v1/ops/retry", {"all": True}),
    ]
    for method, path, body in calls:
        anonymous = await client.request(method, path, json=body)
        assert anonymous.status == 401, path
        tenant = await client.request(method, path, json=body, headers=tenants.a.headers)
        assert tenant.status == 403, path
        assert (await tenant.json())["error"]["code"] == "forbidden"
        operator = await client.request(method, path, json=body, headers=OPERATOR)
        assert operator.status == 200, (path, await operator.text())
    empty = await (await client.get("/v1/ops/queue", headers=OPERATOR)).json()
    assert empty == {"lanes": [], "dead_total": 0, "dead": {"items": [], "next_cursor": None}}


async def test_retry_body_is_ids_or_all(client: Client) -> None:
    for body in ({}, {"ids": []}, {"ids": [1], "all": True}, {"all": False}, {"ids": ["1"]}):
        answer = await client.post("/v1/ops/retry", json=body, headers=OPERATOR)
        assert answer.status == 422, body
    answer = await client.post("/v1/ops/retry", json={"ids": [12345]}, headers=OPERATOR)
    assert await answer.json() == {"retried": 0}


async def test_cycles_newest_first_filtered_and_paged(client: Client, db: Database) -> None:
    base = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    async with db.session() as s, s.begin():
        for i in range(5):
            provider = "caldav" if i % 2 == 0 else "graph"
            s.add(
                SyncCycle(
                    provider=provider,
                    mailbox=f"{provider}:box{i % 2}",
                    started_at=base + timedelta(seconds=10 * i),
                    finished_at=base + timedelta(seconds=10 * i, milliseconds=250 * i),
                    done=i,
                    failed=1 if i == 4 else 0,
                    throttled=2 if i == 3 else 0,
                )
            )
    first = await (await client.get("/v1/ops/cycles?limit=2", headers=OPERATOR)).json()
    assert [c["done"] for c in first["items"]] == [4, 3]
    assert first["items"][0] == {
        "id": first["items"][0]["id"],
        "provider": "caldav",
        "mailbox": "caldav:box0",
        "started_at": "2030-01-01T12:00:40+00:00",
        "finished_at": "2030-01-01T12:00:41+00:00",
        "duration_ms": 1000,
        "done": 4,
        "failed": 1,
        "throttled": 0,
    }
    rest = await (
        await client.get(f"/v1/ops/cycles?limit=2&cursor={first['next_cursor']}", headers=OPERATOR)
    ).json()
    last = await (
        await client.get(f"/v1/ops/cycles?limit=2&cursor={rest['next_cursor']}", headers=OPERATOR)
    ).json()
    assert [c["done"] for c in rest["items"] + last["items"]] == [2, 1, 0]
    assert last["next_cursor"] is None
    graph = await (await client.get("/v1/ops/cycles?provider=graph", headers=OPERATOR)).json()
    assert [c["done"] for c in graph["items"]] == [3, 1]
    box0 = await (await client.get("/v1/ops/cycles?mailbox=caldav:box0", headers=OPERATOR)).json()
    assert [c["done"] for c in box0["items"]] == [4, 2, 0]
    bad = await client.get("/v1/ops/cycles?cursor=WzFd", headers=OPERATOR)  # [1]
    assert bad.status == 422


async def test_retry_sends_failed_rows_back_to_what_they_work_towards(
    client: Client, db: Database, tenants: Tenants
) -> None:
    """Without a worker: three rows given up in different situations (the state the worker
    leaves them in), then one retry."""
    answer = await client.put(
        "/v1/users/u1", json=_caldav_user("http://127.0.0.1:9/cal/"), headers=tenants.a.headers
    )
    assert answer.status == 200
    keep = await client.post("/v1/batches", json=_batch_body(["u1"], 2), headers=tenants.a.headers)
    gone = await client.post("/v1/batches", json=_batch_body(["u1"], 1), headers=tenants.a.headers)
    keep_id, gone_id = (await keep.json())["id"], (await gone.json())["id"]
    async with db.session() as s, s.begin():
        rows = list(
            await s.scalars(
                select(ExternalEvent).order_by(ExternalEvent.batch_id, ExternalEvent.id)
            )
        )
        by_batch = {b: [r for r in rows if r.batch_id == b] for b in (keep_id, gone_id)}
        never_created, created = by_batch[keep_id]
        created.event_id = "evt-1"
        for row in rows:
            row.state, row.last_error = "failed", "auth_failed: CalDAV PUT answered 401"
        await s.execute(
            update(Operation).values(state="dead", attempts=1, last_error="auth_failed: 401")
        )
        # The batch was being deleted when its row gave up.
        await s.execute(update(Batch).where(Batch.id == gone_id).values(state="deleting"))
    queue = await (await client.get("/v1/ops/queue?limit=2", headers=OPERATOR)).json()
    assert queue["dead_total"] == 3
    assert [lane["dead"] for lane in queue["lanes"]] == [3]
    assert len(queue["dead"]["items"]) == 2 and queue["dead"]["next_cursor"]
    dead = queue["dead"]["items"][0]
    assert dead["tenant_name"] == "Tenant A" and dead["user_id"] == "u1"
    assert dead["last_error"] == "auth_failed: 401" and dead["attempts"] == 1
    more = await (
        await client.get(
            f"/v1/ops/queue?limit=2&cursor={queue['dead']['next_cursor']}", headers=OPERATOR
        )
    ).json()
    assert len(more["dead"]["items"]) == 1 and more["dead"]["next_cursor"] is None

    answer = await client.post("/v1/ops/retry", json={"all": True}, headers=OPERATOR)
    assert await answer.json() == {"retried": 3}
    async with db.session() as s:
        states = {r.id: (r.state, r.attempts) for r in await s.scalars(select(ExternalEvent))}
        ops = list(await s.scalars(select(Operation)))
    assert states[never_created.id] == ("pending_create", 0)
    assert states[created.id] == ("pending_update", 0)
    assert states[by_batch[gone_id][0].id] == ("pending_delete", 0)
    assert {(op.state, op.attempts) for op in ops} == {("pending", 0)}
    assert await retry_dead(db) == 0  # nothing dead is left


@pytest.mark.timeout(120)
async def test_dead_operations_show_and_a_retry_completes_them(
    client: Client,
    tenants: Tenants,
    refusing_caldav: str,
    radicale_url: str,
    worker: None,
) -> None:
    headers = tenants.a.headers
    await client.put("/v1/users/u1", json=_caldav_user(refusing_caldav, "wrong"), headers=headers)
    created = await client.post("/v1/batches", json=_batch_body(["u1"], 4), headers=headers)
    batch_id = (await created.json())["id"]

    async def failed() -> Any:
        got = await (await client.get(f"/v1/batches/{batch_id}", headers=headers)).json()
        return got if got["state"] == "failed" and got["sync"]["failed"] == 4 else None

    await _wait(failed, "the batch to fail")
    mailbox = f"caldav:{refusing_caldav}"
    queue = await (await client.get("/v1/ops/queue", headers=OPERATOR)).json()
    assert queue["lanes"] == [
        {
            "mailbox": mailbox,
            "provider": "caldav",
            "lane": "bulk",
            "pending": 0,
            "running": 0,
            "dead": 4,
            "waiting": 0,
            "oldest_pending_age_s": None,
        }
    ]
    assert queue["dead_total"] == 4
    for op in queue["dead"]["items"]:
        assert op["last_error"] == "auth_failed: CalDAV PUT answered 401"
        assert (op["tenant_name"], op["batch_id"], op["user_id"]) == ("Tenant A", batch_id, "u1")
        assert (op["kind"], op["attempts"]) == ("create", 1)

    async def failed_cycles() -> Any:
        got = await (await client.get(f"/v1/ops/cycles?mailbox={mailbox}", headers=OPERATOR)).json()
        return got["items"] if sum(c["failed"] for c in got["items"]) == 4 else None

    cycles = await _wait(failed_cycles, "the failed cycles")
    assert all(c["provider"] == "caldav" and c["done"] == 0 for c in cycles)
    metrics = await (await client.get("/metrics")).text()
    assert 'syncsvc_queue_operations{lane="bulk",provider="caldav",state="dead"} 4.0' in metrics
    assert 'syncsvc_sync_operations_total{outcome="failed",provider="caldav"}' in metrics

    # Reconnect the user to a real calendar, then retry: the worker completes all four.
    async with aiohttp.ClientSession() as http:
        calendar = await new_calendar(http, radicale_url)
    answer = await client.put("/v1/users/u1", json=_caldav_user(calendar), headers=headers)
    assert answer.status == 200
    ids = [op["id"] for op in queue["dead"]["items"]]
    answer = await client.post("/v1/ops/retry", json={"ids": ids}, headers=OPERATOR)
    assert await answer.json() == {"retried": 4}

    async def synced() -> Any:
        got = await (await client.get(f"/v1/batches/{batch_id}", headers=headers)).json()
        return got if got["state"] == "synced" else None

    done = await _wait(synced, "the retried batch to sync")
    assert done["sync"] == {"pending": 0, "synced": 4, "failed": 0, "deleting": 0, "deleted": 0}
    queue = await (await client.get("/v1/ops/queue", headers=OPERATOR)).json()
    assert queue["dead_total"] == 0 and queue["lanes"] == []
    cycles = (
        await (await client.get(f"/v1/ops/cycles?mailbox={mailbox}", headers=OPERATOR)).json()
    )["items"]
    assert sum(c["done"] for c in cycles) == 4
