"""Quick close (status, and a follow-up call in the next free slot, in one request) and the
follow-up history (the whole chain, both directions, oldest first).

The calendar is that of ``test_activities.py``: six meetings for u2 fill Wednesday
2030-06-05 (09:00, 10:15, 12:30, 13:45, 15:00) and Thursday 09:00.
"""

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
from tests.api.test_activities_delete import mark_edited
from tests.api.test_activities_list import commit, listed
from tests.api.test_plans import fixed_clock_app, plan_body, put_users

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def app(settings: Settings, db: Database) -> web.Application:
    return fixed_clock_app(settings, db)


async def six_meetings(client: Client, tenants: Tenants) -> list[dict[str, Any]]:
    await put_users(client, tenants.a)
    await commit(client, tenants.a, plan_body(targets=6, users=("u2",)))
    return await listed(client, tenants.a)


async def test_close_with_a_follow_up_in_the_next_free_slot(
    client: Client, tenants: Tenants, db: Database
) -> None:
    acts = await six_meetings(client, tenants)
    first = acts[0]
    async with db.session() as session, session.begin():
        await session.execute(
            update(ExternalEvent)
            .where(ExternalEvent.activity_id == first["id"])
            .values(state="synced", event_id="evt-1")
        )
    response = await client.post(
        f"/v1/activities/{first['id']}/close",
        json={"status": "unanswered", "follow_up": {}},
        headers=tenants.a.headers,
    )
    assert response.status == 200, await response.text()
    answer = await response.json()
    closed, call = answer["activity"], answer["follow_up"]
    assert (closed["status"], closed["version"], closed["external"]["state"]) == (
        "unanswered",
        2,
        "pending_update",
    )
    assert (call["kind"], call["follow_up_of"], call["user_id"], call["target_id"]) == (
        "call",
        first["id"],
        "u2",
        "org-0",
    )
    assert (call["start"], call["end"], call["subject"]) == (
        "2030-06-06T10:15:00+02:00",
        "2030-06-06T11:15:00+02:00",
        first["subject"],
    )
    assert (call["direction"], call["external"]["state"]) == ("outgoing", "pending_create")
    async with db.session() as session:
        ops = list(await session.scalars(select(Operation).where(Operation.lane == "interactive")))
    assert sorted((o.kind, o.payload["activity_id"]) for o in ops) == sorted(
        [("update", first["id"]), ("create", call["id"])]
    )
    # Both are what a later read sees.
    got = await client.get(f"/v1/activities/{first['id']}", headers=tenants.a.headers)
    assert (await got.json())["status"] == "unanswered"
    [listed_call] = await listed(client, tenants.a, {"kind": "call"})
    assert listed_call == call

    # Without a follow-up, at a given time, or with a subject of its own.
    plain = await client.post(
        f"/v1/activities/{acts[1]['id']}/close",
        json={"status": "completed"},
        headers=tenants.a.headers,
    )
    assert (await plain.json())["follow_up"] is None
    given = await client.post(
        f"/v1/activities/{acts[2]['id']}/close",
        json={
            "status": "completed",
            "follow_up": {"start": "2030-06-20T13:00:00+02:00", "subject": "Contract"},
        },
        headers=tenants.a.headers,
    )
    follow = (await given.json())["follow_up"]
    assert (follow["start"], follow["end"], follow["subject"]) == (
        "2030-06-20T13:00:00+02:00",
        "2030-06-20T14:00:00+02:00",
        "Contract",
    )


@pytest.mark.parametrize(
    "body",
    [
        {"status": "planned"},
        {"status": "done"},
        {},
        {"status": "completed", "follow_up": {"colour": "red"}},
        {"status": "completed", "follow_up": {"start": "2030-06-20T13:00:00"}},  # no offset
        {"status": "completed", "note": "x"},
    ],
)
async def test_a_close_must_make_sense(
    client: Client, tenants: Tenants, db: Database, body: Any
) -> None:
    acts = await six_meetings(client, tenants)
    response = await client.post(
        f"/v1/activities/{acts[0]['id']}/close", json=body, headers=tenants.a.headers
    )
    assert response.status == 422
    assert [(a["status"], a["version"]) for a in await listed(client, tenants.a)] == [
        ("planned", 1)
    ] * 6


async def test_close_keeps_the_assignee_rule_and_tenants_apart(
    client: Client, tenants: Tenants, db: Database
) -> None:
    acts = await six_meetings(client, tenants)
    url = f"/v1/activities/{acts[0]['id']}/close"
    await mark_edited(db, acts[0]["id"])
    body = {"status": "completed", "follow_up": {}}
    refused = await client.post(url, json=body, headers=tenants.a.headers)
    assert refused.status == 409
    assert acts[0]["id"] in (await refused.json())["error"]["details"][0]["msg"]
    assert len(await listed(client, tenants.a)) == 6  # no follow-up either
    assert (await client.post(url, json=body, headers=tenants.b.headers)).status == 404
    forced = await client.post(url, json={**body, "force": True}, headers=tenants.a.headers)
    assert forced.status == 200
    assert (await forced.json())["activity"]["user_edited"] is False


async def test_history_is_the_whole_chain_oldest_first(
    client: Client, tenants: Tenants, db: Database
) -> None:
    acts = await six_meetings(client, tenants)
    headers = tenants.a.headers

    async def follow(of: str) -> str:
        response = await client.post(f"/v1/activities/{of}/follow-ups", json={}, headers=headers)
        assert response.status == 201
        return str((await response.json())["id"])

    a = acts[0]["id"]
    b = await follow(a)
    c = await follow(b)
    d = await follow(a)

    async def history(of: str) -> list[str]:
        response = await client.get(f"/v1/activities/{of}/history", headers=headers)
        assert response.status == 200, await response.text()
        return [item["id"] for item in (await response.json())["items"]]

    for member in (a, b, c, d):
        assert await history(member) == [a, b, c, d], member
    assert await history(acts[1]["id"]) == [acts[1]["id"]]
    response = await client.get(f"/v1/activities/{c}/history", headers=headers)
    items = (await response.json())["items"]
    assert [(i["status"], i["follow_up_of"]) for i in items] == [
        ("planned", None),
        ("planned", a),
        ("planned", b),
        ("planned", a),
    ]
    assert all(i["start"] for i in items)
    # A deleted call is left out, and the chain still holds through it.
    assert (await client.delete(f"/v1/activities/{b}", headers=headers)).status == 200
    assert await history(c) == [a, c, d]
    assert (await client.get(f"/v1/activities/{b}/history", headers=headers)).status == 404
    assert (
        await client.get(f"/v1/activities/{a}/history", headers=tenants.b.headers)
    ).status == 404
    # The list's follow-up filter reads the same links.
    has = await listed(client, tenants.a, {"follow_ups": "has"})
    assert [i["id"] for i in has] == [a]  # b, deleted, no longer counts
    async with db.session() as session:
        assert (await session.get(Activity, b)) is not None  # deleted, still known to the chain
