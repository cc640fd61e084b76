"""Activities through HTTP: a batch's list (pages and CSV), one change, many, follow-ups.

Dates are checked against a calendar: the clock is fixed at Monday 2030-06-03 10:00 in
Copenhagen, batches start on Wednesday 2030-06-05 with 1:00 meetings and 0:15 between them,
so a day's slots are 09:00, 10:15, 12:30, 13:45 and 15:00.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import select, update

from syncsvc.api.pagination import csv_cell
from syncsvc.config import Settings
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, ExternalEvent, Operation
from tests.api.conftest import Tenants
from tests.api.test_plans import CALDAV_URL, fixed_clock_app, plan_body, put_users

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def app(settings: Settings, db: Database) -> web.Application:
    return fixed_clock_app(settings, db)


async def batch_activities(
    client: Client, tenants: Tenants, body: dict[str, Any]
) -> tuple[str, list[dict[str, Any]]]:
    await put_users(client, tenants.a)
    created = await client.post("/v1/batches", json=body, headers=tenants.a.headers)
    assert created.status == 201, await created.text()
    batch_id = (await created.json())["id"]
    listed = await client.get(
        f"/v1/batches/{batch_id}/activities?limit=500", headers=tenants.a.headers
    )
    items: list[dict[str, Any]] = (await listed.json())["items"]
    return batch_id, items


async def test_list_pages_in_target_order_and_csv_has_every_row(
    client: Client, tenants: Tenants
) -> None:
    batch_id, everything = await batch_activities(client, tenants, plan_body(targets=5))
    seen: list[dict[str, Any]] = []
    url = f"/v1/batches/{batch_id}/activities?limit=2"
    pages = 0
    while url:
        page = await (await client.get(url, headers=tenants.a.headers)).json()
        seen += page["items"]
        pages += 1
        cursor = page["next_cursor"]
        url = f"/v1/batches/{batch_id}/activities?limit=2&cursor={cursor}" if cursor else ""
    assert pages == 3 and seen == everything
    assert [a["target_id"] for a in seen] == [f"org-{i}" for i in range(5)]
    # Users mode, 5 over u1 and u2: the first 3 to u1 (no calendar), the next 2 to u2.
    first, last = seen[0], seen[4]
    assert {
        k: first[k]
        for k in (
            "batch_id",
            "user_id",
            "kind",
            "start",
            "end",
            "due",
            "subject",
            "description",
            "status",
            "follow_up_of",
            "external",
        )
    } == {
        "batch_id": batch_id,
        "user_id": "u1",
        "kind": "meeting",
        "start": "2030-06-05T09:00:00+02:00",
        "end": "2030-06-05T10:00:00+02:00",
        "due": None,
        "subject": "Visit Org 0",
        "description": "",
        "status": "planned",
        "follow_up_of": None,
        "external": None,
    }
    assert last["user_id"] == "u2" and last["start"] == "2030-06-05T10:15:00+02:00"
    assert last["external"] == {"provider": "caldav", "event_id": None, "state": "pending_create"}

    response = await client.get(
        f"/v1/batches/{batch_id}/activities?format=csv&limit=1", headers=tenants.a.headers
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(await response.text())))
    assert rows[0][:12] == [
        "id",
        "batch_id",
        "target_id",
        "user_id",
        "kind",
        "start",
        "end",
        "due",
        "subject",
        "description",
        "status",
        "follow_up_of",
    ]
    assert [r[0] for r in rows[1:]] == [a["id"] for a in everything]
    bad = await client.get(
        f"/v1/batches/{batch_id}/activities?cursor=WzFd",  # "[1]"
        headers=tenants.a.headers,
    )
    assert bad.status == 422
    assert rows[1][5] == "2030-06-05T09:00:00+02:00"
    assert rows[5][-3:] == ["caldav", "", "pending_create"]


async def test_one_change_goes_to_the_interactive_lane(
    client: Client, tenants: Tenants, db: Database
) -> None:
    _, acts = await batch_activities(client, tenants, plan_body(targets=2, users=("u2",)))
    one = acts[0]
    async with db.session() as session, session.begin():
        await session.execute(
            update(ExternalEvent)
            .where(ExternalEvent.activity_id == one["id"])
            .values(state="synced", event_id="evt-1")
        )
    url = f"/v1/activities/{one['id']}"
    response = await client.patch(
        url, json={"status": "completed", "reminder_minutes": 10}, headers=tenants.a.headers
    )
    assert response.status == 200, await response.text()
    changed = await response.json()
    assert (changed["status"], changed["reminder_minutes"], changed["version"]) == (
        "completed",
        10,
        2,
    )
    assert changed["external"] == {
        "provider": "caldav",
        "event_id": "evt-1",
        "state": "pending_update",
    }
    async with db.session() as session:
        ops = list(await session.scalars(select(Operation).where(Operation.kind == "update")))
    assert [(o.lane, o.mailbox, o.payload["activity_id"]) for o in ops] == [
        ("interactive", f"caldav:{CALDAV_URL}", one["id"])
    ]
    assert (await (await client.get(url, headers=tenants.a.headers)).json()) == changed

    # Moving the start keeps the length; an end before the start is refused.
    moved = await client.patch(
        url, json={"start": "2030-06-20T10:00:00+02:00"}, headers=tenants.a.headers
    )
    assert (await moved.json())["end"] == "2030-06-20T11:00:00+02:00"
    for bad, loc in (
        ({"end": "2030-06-20T09:00:00+02:00"}, ["body", "end"]),
        (
            {"start": "2030-06-21T10:00:00+02:00", "end": "2030-06-21T10:00:00+02:00"},
            ["body", "end"],
        ),
        ({"subject": None}, ["body", "subject"]),
        ({"status": "done"}, ["body", "status"]),
        ({"colour": "red"}, ["body", "colour"]),
    ):
        response = await client.patch(url, json=bad, headers=tenants.a.headers)
        assert response.status == 422, bad
        assert loc in [d["loc"] for d in (await response.json())["error"]["details"]]
    final = await (await client.get(url, headers=tenants.a.headers)).json()
    assert (final["start"], final["version"]) == ("2030-06-20T10:00:00+02:00", 3)


async def test_a_task_has_a_due_date_and_no_time(client: Client, tenants: Tenants) -> None:
    body = plan_body(targets=1, users=("u1",))
    body["template"] = {"kind": "task", "subject": "Call back", "due_days": 3}
    _, acts = await batch_activities(client, tenants, body)
    assert (acts[0]["start"], acts[0]["end"], acts[0]["due"]) == (None, None, "2030-06-06")
    response = await client.patch(
        f"/v1/activities/{acts[0]['id']}",
        json={"start": "2030-06-20T10:00:00+02:00"},
        headers=tenants.a.headers,
    )
    assert response.status == 422
    assert (await response.json())["error"]["details"][0]["loc"] == ["body", "start"]


async def test_many_at_once_is_all_or_nothing(
    client: Client, tenants: Tenants, db: Database
) -> None:
    _, acts = await batch_activities(client, tenants, plan_body(targets=3, users=("u2",)))
    ids = [a["id"] for a in acts]
    response = await client.patch(
        "/v1/activities", json={"ids": ids[:2], "status": "cancelled"}, headers=tenants.a.headers
    )
    assert response.status == 200 and (await response.json()) == {"updated": 2}

    # Tenant B's activity is as unknown to tenant A as a made-up id.
    await put_users(client, tenants.b)
    other = await client.post(
        "/v1/batches", json=plan_body(targets=1, users=("u1",)), headers=tenants.b.headers
    )
    other_id = (
        await (
            await client.get(
                f"/v1/batches/{(await other.json())['id']}/activities", headers=tenants.b.headers
            )
        ).json()
    )["items"][0]["id"]
    response = await client.patch(
        "/v1/activities",
        json={"ids": [ids[2], "nope", other_id], "status": "completed"},
        headers=tenants.a.headers,
    )
    assert response.status == 404
    details = (await response.json())["error"]["details"]
    assert [d["loc"] for d in details] == [["body", "ids", 1], ["body", "ids", 2]]

    async with db.session() as session:
        rows = {
            a.id: a for a in await session.scalars(select(Activity).where(Activity.id.in_(ids)))
        }
        ops = list(await session.scalars(select(Operation).where(Operation.kind == "update")))
    assert [(rows[i].status, rows[i].version) for i in ids] == [
        ("cancelled", 2),
        ("cancelled", 2),
        ("planned", 1),
    ]
    assert sorted(o.payload["activity_id"] for o in ops) == sorted(ids[:2])
    assert {o.lane for o in ops} == {"interactive"}


async def test_follow_up_takes_the_next_free_slot(
    client: Client, tenants: Tenants, db: Database
) -> None:
    # Six meetings for u2: all five slots of Wednesday, and Thursday 09:00.
    _, acts = await batch_activities(client, tenants, plan_body(targets=6, users=("u2",)))
    assert acts[5]["start"] == "2030-06-06T09:00:00+02:00"
    url = f"/v1/activities/{acts[0]['id']}/follow-ups"
    first = await client.post(url, json={}, headers=tenants.a.headers)
    assert first.status == 201, await first.text()
    call = await first.json()
    assert (call["kind"], call["follow_up_of"], call["user_id"], call["target_id"]) == (
        "call",
        acts[0]["id"],
        "u2",
        "org-0",
    )
    assert (call["start"], call["end"]) == (
        "2030-06-06T10:15:00+02:00",
        "2030-06-06T11:15:00+02:00",
    )
    assert call["external"] == {"provider": "caldav", "event_id": None, "state": "pending_create"}
    second = await (
        await client.post(url, json={"subject": "Again"}, headers=tenants.a.headers)
    ).json()
    assert (second["start"], second["subject"]) == ("2030-06-06T12:30:00+02:00", "Again")
    given = await (
        await client.post(
            url,
            json={"start": "2030-06-20T13:00:00+02:00", "duration": "00:30"},
            headers=tenants.a.headers,
        )
    ).json()
    assert (given["start"], given["end"]) == (
        "2030-06-20T13:00:00+02:00",
        "2030-06-20T13:30:00+02:00",
    )
    listed = await client.get(
        f"/v1/batches/{acts[0]['batch_id']}/activities?limit=4", headers=tenants.a.headers
    )
    page = await listed.json()
    rest = await (
        await client.get(
            f"/v1/batches/{acts[0]['batch_id']}/activities?cursor={page['next_cursor']}",
            headers=tenants.a.headers,
        )
    ).json()
    assert [a["id"] for a in page["items"] + rest["items"]] == [a["id"] for a in acts] + [
        call["id"],
        second["id"],
        given["id"],
    ]
    assert rest["next_cursor"] is None
    async with db.session() as session:
        creates = list(
            await session.scalars(
                select(Operation).where(Operation.kind == "create", Operation.lane == "interactive")
            )
        )
    assert sorted(o.payload["activity_id"] for o in creates) == sorted(
        [call["id"], second["id"], given["id"]]
    )


async def test_tenants_cannot_touch_each_others_activities(
    client: Client, tenants: Tenants
) -> None:
    _, acts = await batch_activities(client, tenants, plan_body(targets=1))
    url = f"/v1/activities/{acts[0]['id']}"
    other = tenants.b.headers
    assert (await client.get(url, headers=other)).status == 404
    assert (await client.patch(url, json={"status": "completed"}, headers=other)).status == 404
    assert (await client.post(f"{url}/follow-ups", json={}, headers=other)).status == 404
    mine = await (await client.get(url, headers=tenants.a.headers)).json()
    assert (mine["status"], mine["version"]) == ("planned", 1)


async def test_csv_export_neutralises_cells_a_spreadsheet_would_run(
    client: Client, tenants: Tenants
) -> None:
    """OWASP CSV injection: a CRM subject like ``=HYPERLINK(...)`` reaches the file as text."""
    body = plan_body(targets=2)
    body["template"] = {"kind": "meeting", "subject": '=HYPERLINK("x") $account-name$'}
    body["targets"][1]["name"] = "@SUM(A1)"
    batch_id, everything = await batch_activities(client, tenants, body)
    assert everything[0]["subject"] == '=HYPERLINK("x") Org 0'  # JSON keeps the value as is
    response = await client.get(
        f"/v1/batches/{batch_id}/activities?format=csv", headers=tenants.a.headers
    )
    rows = list(csv.reader(io.StringIO(await response.text())))
    subject = rows[0].index("subject")
    assert [r[subject] for r in rows[1:]] == [
        '\'=HYPERLINK("x") Org 0',
        '\'=HYPERLINK("x") @SUM(A1)',
    ]
    assert rows[1][rows[0].index("start")] == "2030-06-05T09:00:00+02:00"  # plain cells untouched


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_every_formula_start_is_neutralised_and_other_cells_kept(start: str) -> None:
    assert csv_cell(start + "1+1") == "'" + start + "1+1"
    assert csv_cell("a" + start) == "a" + start
    assert csv_cell(None) == "" and csv_cell(3) == 3
