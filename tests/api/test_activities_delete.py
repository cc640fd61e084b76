"""Deleting activities (one, by ids, by the list's filters) and the assignee rule for deletes
and edits: what the assignee changed in their own calendar is theirs unless ``force``.

What reaches the calendars is checked against Radicale and the Graph fake in
``tests/integration/test_activities_sync.py``; here the ledger and outbox rows are read.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import select, update

from syncsvc.config import Settings
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, Batch, ExternalEvent, Operation
from tests.api.conftest import TenantKey, Tenants
from tests.api.test_activities_list import commit, listed
from tests.api.test_plans import fixed_clock_app, plan_body, put_users

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def app(settings: Settings, db: Database) -> web.Application:
    return fixed_clock_app(settings, db)


async def two_batches(client: Client, tenants: Tenants) -> tuple[list[dict[str, Any]], str]:
    """Tenant A: 4 meetings for u2 (CalDAV); tenant B: 1 meeting. Answers A's list and B's
    activity id."""
    await put_users(client, tenants.a)
    await put_users(client, tenants.b)
    await commit(client, tenants.a, plan_body(targets=4, users=("u2",)))
    await commit(client, tenants.b, plan_body(targets=1, users=("u2",)))
    [theirs] = await listed(client, tenants.b)
    return await listed(client, tenants.a), theirs["id"]


async def mark_edited(db: Database, *ids: str) -> None:
    """As the webhooks do when the assignee moves an event in their own calendar."""
    async with db.session() as session, session.begin():
        await session.execute(update(Activity).where(Activity.id.in_(ids)).values(user_edited=True))


async def ledger(db: Database) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Per activity: its ledger state and its operations (kind, lane)."""
    async with db.session() as session:
        events = list(await session.scalars(select(ExternalEvent)))
        ops = list(await session.scalars(select(Operation).order_by(Operation.id)))
    return {
        e.activity_id: (e.state, [(o.kind, o.lane) for o in ops if o.ledger_id == e.id])
        for e in events
    }


async def delete(client: Client, tenant: TenantKey, body: Any) -> tuple[int, Any]:
    response = await client.request("DELETE", "/v1/activities", json=body, headers=tenant.headers)
    return response.status, await response.json()


async def test_one_delete_removes_it_and_its_event(
    client: Client, tenants: Tenants, db: Database
) -> None:
    acts, theirs = await two_batches(client, tenants)
    one = acts[0]
    url = f"/v1/activities/{one['id']}"
    response = await client.delete(url, headers=tenants.a.headers)
    assert response.status == 200, await response.text()
    assert await response.json() == {"deleted": 1, "not_found": []}
    assert (await client.get(url, headers=tenants.a.headers)).status == 404
    assert [a["id"] for a in await listed(client, tenants.a)] == [a["id"] for a in acts[1:]]
    batch = await (
        await client.get(f"/v1/batches/{one['batch_id']}", headers=tenants.a.headers)
    ).json()
    assert (batch["total"], batch["sync"]["deleting"], batch["sync"]["pending"]) == (3, 1, 3)
    rows = await ledger(db)
    assert rows[one["id"]] == ("pending_delete", [("create", "bulk"), ("delete", "interactive")])
    assert {rows[a["id"]][0] for a in acts[1:]} == {"pending_create"}
    # Twice, or another tenant's: 404, and B's activity is untouched.
    assert (await client.delete(url, headers=tenants.a.headers)).status == 404
    other = await client.delete(f"/v1/activities/{theirs}", headers=tenants.a.headers)
    assert other.status == 404
    assert rows[theirs] == ("pending_create", [("create", "bulk")])
    assert (await client.get(f"/v1/activities/{theirs}", headers=tenants.b.headers)).status == 200


async def test_many_by_ids_counts_unknown_and_foreign_ids_as_not_found(
    client: Client, tenants: Tenants, db: Database
) -> None:
    acts, theirs = await two_batches(client, tenants)
    before = await ledger(db)
    status, body = await delete(
        client, tenants.a, {"ids": [acts[0]["id"], "nope", theirs, acts[2]["id"], acts[0]["id"]]}
    )
    assert status == 200, body
    assert body == {"deleted": 2, "not_found": ["nope", theirs]}
    assert [a["id"] for a in await listed(client, tenants.a)] == [acts[1]["id"], acts[3]["id"]]
    after = await ledger(db)
    assert {k for k in after if after[k] != before[k]} == {acts[0]["id"], acts[2]["id"]}
    assert after[acts[0]["id"]][0] == "pending_delete"
    assert (await client.get(f"/v1/activities/{theirs}", headers=tenants.b.headers)).status == 200


async def test_many_by_filter_deletes_exactly_what_the_list_shows(
    client: Client, tenants: Tenants, db: Database
) -> None:
    acts, _ = await two_batches(client, tenants)
    patched = await client.patch(
        "/v1/activities",
        json={"ids": [acts[1]["id"], acts[3]["id"]], "status": "cancelled"},
        headers=tenants.a.headers,
    )
    assert patched.status == 200
    shown = await listed(client, tenants.a, {"status": "cancelled"})
    status, body = await delete(client, tenants.a, {"filter": {"status": ["cancelled"]}})
    assert (status, body) == (200, {"deleted": 2, "not_found": []})
    assert {a["id"] for a in shown} == {acts[1]["id"], acts[3]["id"]}
    assert [a["id"] for a in await listed(client, tenants.a)] == [acts[0]["id"], acts[2]["id"]]
    async with db.session() as session:
        batch = await session.get(Batch, acts[0]["batch_id"])
    assert batch is not None and batch.total == 2
    # The same filters as the list, the same refusals.
    status, body = await delete(client, tenants.a, {"filter": {"user_id": ["ghost"]}})
    assert status == 422 and body["error"]["details"][0]["loc"] == ["body", "filter", "user_id"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"filter": {}},
        {"ids": []},
        {"ids": ["a"], "filter": {"status": ["planned"]}},
        {"filter": {"status": ["gone"]}},
        {"filter": {"colour": "red"}},
        {"ids": ["a"], "forse": True},
    ],
)
async def test_a_delete_must_say_what(client: Client, tenants: Tenants, body: Any) -> None:
    await two_batches(client, tenants)
    status, answer = await delete(client, tenants.a, body)
    assert status == 422, answer
    assert len(await listed(client, tenants.a)) == 4


async def test_what_the_assignee_changed_is_theirs_unless_forced(
    client: Client, tenants: Tenants, db: Database
) -> None:
    acts, _ = await two_batches(client, tenants)
    edited, plain = acts[0]["id"], acts[1]["id"]
    await mark_edited(db, edited)
    headers = tenants.a.headers
    url = f"/v1/activities/{edited}"

    # Single PATCH and DELETE: 409 naming it; nothing changes.
    response = await client.patch(url, json={"subject": "Mine now"}, headers=headers)
    assert response.status == 409
    assert edited in (await response.json())["error"]["details"][0]["msg"]
    assert (await client.delete(url, headers=headers)).status == 409
    # Bulk by ids and by filter, edits and deletes: 409 naming it; the plain one is untouched.
    for method, body in (
        ("PATCH", {"ids": [plain, edited], "status": "completed"}),
        ("PATCH", {"filter": {"batch_id": acts[0]["batch_id"]}, "status": "completed"}),
        ("DELETE", {"ids": [plain, edited]}),
        ("DELETE", {"filter": {"user_id": ["u2"]}}),
    ):
        response = await client.request(method, "/v1/activities", json=body, headers=headers)
        assert response.status == 409, (method, body)
        details = (await response.json())["error"]["details"]
        assert [edited in d["msg"] for d in details] == [True], details
    unchanged = await listed(client, tenants.a)
    assert [(a["id"], a["status"], a["subject"], a["version"]) for a in unchanged] == [
        (a["id"], a["status"], a["subject"], a["version"]) for a in acts
    ]
    assert all(ops == [("create", "bulk")] for _, ops in (await ledger(db)).values())

    # A bulk status that leaves the edited one as it is does not touch it, so it is allowed.
    same = await client.patch(
        "/v1/activities", json={"ids": [plain, edited], "status": "planned"}, headers=headers
    )
    assert (same.status, await same.json()) == (200, {"updated": 0})

    # With force the CRM's change wins and the activity is the CRM's again.
    forced = await client.patch(url, json={"subject": "Mine now", "force": True}, headers=headers)
    assert forced.status == 200
    assert ((await forced.json())["subject"], (await forced.json())["user_edited"]) == (
        "Mine now",
        False,
    )
    await mark_edited(db, edited)
    response = await client.patch(
        "/v1/activities",
        json={"filter": {"batch_id": acts[0]["batch_id"]}, "status": "completed", "force": True},
        headers=headers,
    )
    assert (response.status, await response.json()) == (200, {"updated": 4})
    await mark_edited(db, edited)
    status, body = await delete(client, tenants.a, {"ids": [edited, plain], "force": True})
    assert (status, body) == (200, {"deleted": 2, "not_found": []})
    await mark_edited(db, acts[2]["id"])
    response = await client.delete(f"/v1/activities/{acts[2]['id']}?force=true", headers=headers)
    assert response.status == 200
    assert [a["id"] for a in await listed(client, tenants.a)] == [acts[3]["id"]]
