"""Batches through HTTP: commit with its outbox, progress and state, list, template edits,
deletion. The sync worker is played by updating ledger rows directly, as it would."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import select, update

from syncsvc.config import Settings
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, ExternalEvent, Operation
from tests.api.conftest import Tenants
from tests.api.test_plans import CALDAV_URL, fixed_clock_app, plan_body, put_users, row_counts

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def app(settings: Settings, db: Database) -> web.Application:
    return fixed_clock_app(settings, db)


async def commit(client: Client, tenants: Tenants, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/batches", json=body, headers=tenants.a.headers)
    assert response.status == 201, await response.text()
    created: dict[str, Any] = await response.json()
    return created


async def get_batch(client: Client, tenants: Tenants, batch_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/batches/{batch_id}", headers=tenants.a.headers)
    assert response.status == 200, await response.text()
    batch: dict[str, Any] = await response.json()
    return batch


async def set_ledger(db: Database, batch_id: str, state: str, **where: Any) -> None:
    """What the sync worker does once a provider answered."""
    async with db.session() as session, session.begin():
        query = update(ExternalEvent).where(ExternalEvent.batch_id == batch_id)
        for name, value in where.items():
            query = query.where(getattr(ExternalEvent, name) == value)
        await session.execute(query.values(state=state))


async def test_commit_writes_batch_activities_ledger_and_outbox(
    client: Client, tenants: Tenants, db: Database
) -> None:
    await put_users(client, tenants.a)
    created = await commit(client, tenants, plan_body())
    assert created["state"] == "syncing" and created["total"] == 49
    assert created["created_by"].endswith(created["id"])
    assert [(u["id"], u["count"]) for u in created["users"]] == [("u1", 25), ("u2", 24)]

    batch = await get_batch(client, tenants, created["id"])
    assert batch["state"] == "syncing" and batch["total"] == 49
    assert batch["sync"] == {"pending": 24, "synced": 0, "failed": 0, "deleting": 0, "deleted": 0}

    async with db.session() as session:
        acts = list(
            await session.scalars(
                select(Activity).where(Activity.batch_id == created["id"]).order_by(Activity.seq)
            )
        )
        ledger = list(await session.scalars(select(ExternalEvent)))
        ops = list(await session.scalars(select(Operation)))
    assert [a.seq for a in acts] == list(range(49))
    assert [a.target_id for a in acts] == [f"org-{i}" for i in range(49)]
    # Stored in UTC: 09:00 in Copenhagen (CEST) is 07:00 UTC.
    assert acts[0].start is not None and acts[0].start.isoformat() == "2030-06-05T07:00:00+00:00"
    # Only u2 has a calendar: one ledger row and one bulk create per u2 activity.
    u2_ids = {a.id for a in acts if a.user_id == "u2"}
    assert {row.activity_id for row in ledger} == u2_ids
    assert {(r.provider, r.calendar, r.state, r.event_id) for r in ledger} == {
        ("caldav", CALDAV_URL, "pending_create", None)
    }
    assert sorted(op.ledger_id or 0 for op in ops) == sorted(r.id for r in ledger)
    assert {(op.kind, op.lane, op.mailbox, op.state) for op in ops} == {
        ("create", "bulk", f"caldav:{CALDAV_URL}", "pending")
    }


async def test_state_follows_the_ledger(client: Client, tenants: Tenants, db: Database) -> None:
    await put_users(client, tenants.a)
    only_none = await commit(client, tenants, plan_body(targets=3, users=("u1",)))
    assert only_none["state"] == "synced"
    assert (await get_batch(client, tenants, only_none["id"]))["state"] == "synced"

    batch_id = (await commit(client, tenants, plan_body(targets=4, users=("u2",))))["id"]
    await set_ledger(db, batch_id, "synced")
    got = await get_batch(client, tenants, batch_id)
    assert (got["state"], got["sync"]["synced"], got["sync"]["pending"]) == ("synced", 4, 0)
    async with db.session() as session, session.begin():
        first = await session.scalar(
            select(ExternalEvent.id).where(ExternalEvent.batch_id == batch_id).limit(1)
        )
        await session.execute(
            update(ExternalEvent).where(ExternalEvent.id == first).values(state="failed")
        )
    got = await get_batch(client, tenants, batch_id)
    assert (got["state"], got["sync"]["failed"], got["sync"]["synced"]) == ("failed", 1, 3)


async def test_list_is_newest_first_with_a_cursor(client: Client, tenants: Tenants) -> None:
    await put_users(client, tenants.a)
    ids = [
        (await commit(client, tenants, plan_body(targets=1, users=("u1",))))["id"] for _ in range(3)
    ]
    seen: list[str] = []
    url = "/v1/batches?limit=2"
    while True:
        response = await client.get(url, headers=tenants.a.headers)
        assert response.status == 200
        page = await response.json()
        assert len(page["items"]) <= 2
        seen += [b["id"] for b in page["items"]]
        if page["next_cursor"] is None:
            break
        url = f"/v1/batches?limit=2&cursor={page['next_cursor']}"
    assert seen == ids[::-1]
    bad = await client.get("/v1/batches?cursor=xyz", headers=tenants.a.headers)
    assert bad.status == 422


async def test_patch_rerenders_and_bumps_versions_but_spares_user_edits(
    client: Client, tenants: Tenants, db: Database
) -> None:
    await put_users(client, tenants.a)
    batch_id = (await commit(client, tenants, plan_body(targets=4, users=("u2",))))["id"]
    async with db.session() as session, session.begin():
        acts = {
            a.seq: a
            for a in await session.scalars(select(Activity).where(Activity.batch_id == batch_id))
        }
        acts[1].user_edited = True
    await set_ledger(db, batch_id, "synced", activity_id=acts[0].id)
    async with db.session() as session:
        ops_before = len(list(await session.scalars(select(Operation))))

    patch = {
        "template": {"subject": "Call $account-name$ ($targetgroup-name$)", "reminder_minutes": 30}
    }
    response = await client.patch(f"/v1/batches/{batch_id}", json=patch, headers=tenants.a.headers)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert (body["updated"], body["skipped_user_edited"]) == (3, 1)

    async with db.session() as session:
        after = {
            a.seq: a
            for a in await session.scalars(select(Activity).where(Activity.batch_id == batch_id))
        }
        ledger = {r.activity_id: r.state for r in await session.scalars(select(ExternalEvent))}
        new_ops = list(await session.scalars(select(Operation).where(Operation.kind == "update")))
    assert after[0].subject == "Call Org 0 (Copenhagen breweries)"
    assert after[3].subject == "Call Org 3 (Copenhagen breweries)"
    assert after[1].subject == "Visit Org 1" and after[1].version == 1
    assert [after[s].version for s in (0, 2, 3)] == [2, 2, 2]
    assert after[0].reminder_minutes == 30 and after[1].reminder_minutes is None
    assert ledger[acts[0].id] == "pending_update"  # was synced
    assert ledger[acts[2].id] == "pending_create"  # create still pending: stays so
    assert len(new_ops) == 3 and {o.lane for o in new_ops} == {"bulk"}
    assert ops_before == 4

    forced = await client.patch(
        f"/v1/batches/{batch_id}",
        json={"template": {"subject": "Meet $account-name$"}, "force": True},
        headers=tenants.a.headers,
    )
    assert (await forced.json())["updated"] == 4
    async with db.session() as session:
        one = await session.get(Activity, acts[1].id)
    assert one is not None
    assert (one.subject, one.version, one.user_edited) == ("Meet Org 1", 2, False)

    for bad, loc in (
        ({"template": {"kind": "call"}}, ["body", "template", "kind"]),
        ({"template": {"subject": "$nope-tag$"}}, ["body", "template", "subject"]),
    ):
        response = await client.patch(
            f"/v1/batches/{batch_id}", json=bad, headers=tenants.a.headers
        )
        assert response.status == 422
        assert loc in [d["loc"] for d in (await response.json())["error"]["details"]]


async def test_delete_queues_every_event_and_answers_progress(
    client: Client, tenants: Tenants, db: Database
) -> None:
    await put_users(client, tenants.a)
    batch_id = (await commit(client, tenants, plan_body(targets=6)))["id"]  # 3 u1, 3 u2
    async with db.session() as session, session.begin():
        row = await session.scalar(
            select(ExternalEvent).where(ExternalEvent.batch_id == batch_id).limit(1)
        )
        assert row is not None
        row.state, row.event_id = "synced", "evt-1"

    response = await client.delete(f"/v1/batches/{batch_id}", headers=tenants.a.headers)
    assert response.status == 202, await response.text()
    body = await response.json()
    assert body["state"] == "deleting"
    assert body["sync"] == {"pending": 0, "synced": 0, "failed": 0, "deleting": 3, "deleted": 0}
    async with db.session() as session:
        states = {r.state for r in await session.scalars(select(ExternalEvent))}
        deletes = list(await session.scalars(select(Operation).where(Operation.kind == "delete")))
    assert states == {"pending_delete"}
    # The never-created rows get a delete too: their create may be in flight.
    assert len(deletes) == 3 and {o.lane for o in deletes} == {"bulk"}
    listed = await client.get(f"/v1/batches/{batch_id}/activities", headers=tenants.a.headers)
    assert (await listed.json())["items"] == []

    again = await client.delete(f"/v1/batches/{batch_id}", headers=tenants.a.headers)
    assert again.status == 202 and (await again.json())["state"] == "deleting"
    assert (await row_counts(db))["operations"] == 3 + 3  # 3 creates, 3 deletes: no more

    await set_ledger(db, batch_id, "deleted")
    done = await get_batch(client, tenants, batch_id)
    assert done["state"] == "deleted" and done["sync"]["deleted"] == 3
    patch = await client.patch(
        f"/v1/batches/{batch_id}", json={"template": {"subject": "x"}}, headers=tenants.a.headers
    )
    assert patch.status == 409


async def test_delete_without_calendars_is_done_at_once(client: Client, tenants: Tenants) -> None:
    await put_users(client, tenants.a)
    batch_id = (await commit(client, tenants, plan_body(targets=2, users=("u1",))))["id"]
    response = await client.delete(f"/v1/batches/{batch_id}", headers=tenants.a.headers)
    assert response.status == 202
    assert (await response.json())["state"] == "deleted"


async def test_tenants_cannot_see_each_others_batches(client: Client, tenants: Tenants) -> None:
    await put_users(client, tenants.a)
    batch_id = (await commit(client, tenants, plan_body(targets=2)))["id"]
    other = tenants.b.headers
    assert (await client.get(f"/v1/batches/{batch_id}", headers=other)).status == 404
    assert (await client.get(f"/v1/batches/{batch_id}/activities", headers=other)).status == 404
    assert (
        await client.get(f"/v1/batches/{batch_id}/activities?format=csv", headers=other)
    ).status == 404
    assert (
        await client.patch(
            f"/v1/batches/{batch_id}", json={"template": {"subject": "x"}}, headers=other
        )
    ).status == 404
    assert (await client.delete(f"/v1/batches/{batch_id}", headers=other)).status == 404
    listed = await client.get("/v1/batches", headers=other)
    assert (await listed.json()) == {"items": [], "next_cursor": None}
    assert (await get_batch(client, tenants, batch_id))["state"] == "syncing"
