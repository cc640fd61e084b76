"""Calls carry a direction and the other party's phone number (XS Office "Retning",
"Telefonnummer"): set by PATCH, copied to follow-ups, filtered and exported."""

from __future__ import annotations

import csv
import io

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from syncsvc.config import Settings
from syncsvc.store.db import Database
from tests.api.conftest import Tenants
from tests.api.test_activities_list import commit, listed
from tests.api.test_plans import fixed_clock_app, plan_body, put_users

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def app(settings: Settings, db: Database) -> web.Application:
    return fixed_clock_app(settings, db)


async def test_direction_and_phone(client: Client, tenants: Tenants) -> None:
    await put_users(client, tenants.a)
    body = plan_body(targets=2, users=("u1",))
    body["template"] = {"kind": "call", "subject": "Ring $account-name$"}
    await commit(client, tenants.a, body)
    calls = await listed(client, tenants.a)
    assert [(c["kind"], c["direction"], c["phone"]) for c in calls] == [
        ("call", "outgoing", "")
    ] * 2
    headers = tenants.a.headers
    url = f"/v1/activities/{calls[0]['id']}"
    response = await client.patch(
        url, json={"direction": "incoming", "phone": "+45 33 12 34 56"}, headers=headers
    )
    assert response.status == 200, await response.text()
    assert ((await response.json())["direction"], (await response.json())["phone"]) == (
        "incoming",
        "+45 33 12 34 56",
    )
    follow = await client.post(f"{url}/follow-ups", json={}, headers=headers)
    call = await follow.json()
    assert (call["direction"], call["phone"]) == ("outgoing", "+45 33 12 34 56")

    assert [c["id"] for c in await listed(client, tenants.a, {"direction": "incoming"})] == [
        calls[0]["id"]
    ]
    assert {c["id"] for c in await listed(client, tenants.a, {"q": "33 12"})} == {
        calls[0]["id"],
        call["id"],
    }
    response = await client.get("/v1/activities?format=csv&q=33%2012", headers=headers)
    rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert [(r["direction"], r["phone"]) for r in rows] == [
        ("incoming", "'+45 33 12 34 56"),  # "+" opens a formula: neutralised like any cell
        ("outgoing", "'+45 33 12 34 56"),
    ]

    for bad, loc in (
        ({"direction": "sideways"}, ["body", "direction"]),
        ({"phone": "+45\r\nX-Injected: 1"}, ["body", "phone"]),
        ({"phone": "1" * 65}, ["body", "phone"]),
        ({"phone": None}, ["body", "phone"]),
    ):
        response = await client.patch(url, json=bad, headers=headers)
        assert response.status == 422, bad
        assert loc in [d["loc"] for d in (await response.json())["error"]["details"]]

    # Only a call has a direction.
    await commit(client, tenants.a, plan_body(targets=1, users=("u1",)))
    [meeting] = await listed(client, tenants.a, {"kind": "meeting"})
    response = await client.patch(
        f"/v1/activities/{meeting['id']}", json={"direction": "outgoing"}, headers=headers
    )
    assert response.status == 422
    assert (await response.json())["error"]["details"][0]["loc"] == ["body", "direction"]
    response = await client.patch(url, json={"direction": None}, headers=headers)
    assert (await response.json())["direction"] is None


async def test_a_batch_of_calls_dials_each_targets_number(client: Client, tenants: Tenants) -> None:
    await put_users(client, tenants.a)
    body = plan_body(targets=3, users=("u1",))
    body["template"] = {"kind": "call", "subject": "Ring $account-name$"}
    body["targets"][0]["phone"] = "+45 70 10 20 30"
    body["targets"][1]["contacts"][0]["mobile"] = "+45 20 30 40 50"  # no number of its own
    await commit(client, tenants.a, body)
    phones = {c["target_id"]: c["phone"] for c in await listed(client, tenants.a)}
    assert phones == {"org-0": "+45 70 10 20 30", "org-1": "+45 20 30 40 50", "org-2": ""}

    body["template"] = {"kind": "meeting", "subject": "Visit $account-name$"}
    await commit(client, tenants.a, body)
    meetings = await listed(client, tenants.a, {"kind": "meeting"})
    assert {m["phone"] for m in meetings} == {""}  # only calls dial
