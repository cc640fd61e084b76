"""GET /v1/activities: every filter alone and combined, pages, CSV and XLSX exports, refusals.

Each expectation is computed here from the unfiltered list (JSON fields only), so the SQL
filters are checked against a plain reading of what a CRM user sees. The clock and calendar
are those of ``test_activities.py`` (batches from Wednesday 2030-06-05, Copenhagen).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openpyxl import load_workbook

from syncsvc.api.pagination import encode_cursor
from syncsvc.config import Settings
from syncsvc.store.db import Database
from tests.api.conftest import TenantKey, Tenants
from tests.api.test_plans import fixed_clock_app, plan_body, put_users

Client = TestClient[web.Request, web.Application]
Item = dict[str, Any]


@pytest.fixture
def app(settings: Settings, db: Database) -> web.Application:
    return fixed_clock_app(settings, db)


async def commit(client: Client, tenant: TenantKey, body: dict[str, Any]) -> dict[str, Any]:
    created = await client.post("/v1/batches", json=body, headers=tenant.headers)
    assert created.status == 201, await created.text()
    batch: dict[str, Any] = await created.json()
    return batch


async def listed(client: Client, tenant: TenantKey, query: dict[str, Any] | str = "") -> list[Item]:
    """Every page of the list, two rows at a time (so the cursor is used throughout)."""
    params = query if isinstance(query, str) else urlencode(query, doseq=True)
    items: list[Item] = []
    cursor = None
    while True:
        url = f"/v1/activities?limit=2&{params}" + (f"&cursor={cursor}" if cursor else "")
        response = await client.get(url, headers=tenant.headers)
        assert response.status == 200, await response.text()
        page = await response.json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def world(client: Client, tenants: Tenants) -> tuple[list[Item], dict[str, Any]]:
    """Tenant A: batch ``meet`` (5 meetings over u1, u2), batch ``todo`` (2 tasks for u1),
    one follow-up call, one cancelled and one unanswered meeting, one meeting moved to
    00:30 on Friday (Thursday in UTC), one subject with a literal ``%``. Tenant B: one
    batch of its own that A must never see."""
    await put_users(client, tenants.a)
    await put_users(client, tenants.b)
    meet = await commit(client, tenants.a, plan_body(targets=5))
    todo_body = plan_body(targets=2, users=("u1",))
    todo_body["template"] = {"kind": "task", "subject": "Call back $account-name$", "due_days": 3}
    todo = await commit(client, tenants.a, todo_body)
    await commit(client, tenants.b, plan_body(targets=3))
    first = await listed(client, tenants.a, {"batch_id": meet["id"]})
    headers = tenants.a.headers
    follow = await client.post(
        f"/v1/activities/{first[0]['id']}/follow-ups",
        json={"subject": "Ring again"},
        headers=headers,
    )
    assert follow.status == 201
    for activity, change in (
        (first[1], {"status": "cancelled"}),
        (first[2], {"status": "unanswered", "subject": "50% off offer"}),
        (first[3], {"start": "2030-06-07T00:30:00+02:00", "description": "Early BIRD"}),
    ):
        patched = await client.patch(
            f"/v1/activities/{activity['id']}", json=change, headers=headers
        )
        assert patched.status == 200, await patched.text()
    everything = await listed(client, tenants.a)
    return everything, {"meet": meet, "todo": todo}


async def test_every_filter_alone_and_combined(client: Client, tenants: Tenants) -> None:
    everything, batches = await world(client, tenants)
    meet, todo = batches["meet"], batches["todo"]
    assert len(everything) == 8  # 5 meetings, 1 follow-up, 2 tasks; nothing of tenant B
    timed = [a for a in everything if a["start"] is not None]
    assert [a["kind"] for a in everything[-2:]] == ["task", "task"]  # tasks after timed ones
    assert timed == sorted(timed, key=lambda a: a["start"])  # one zone: text order is time
    [call] = [a for a in everything if a["kind"] == "call"]
    assert (call["direction"], call["phone"]) == ("outgoing", "")
    assert all(a["direction"] is None for a in everything if a["kind"] != "call")

    def day(a: Item) -> str:
        return str(a["start"] or a["due"])[:10]  # the assignee's own day

    parent = call["follow_up_of"]
    cases: list[tuple[dict[str, Any], Callable[[Item], bool]]] = [
        ({"user_id": "u1"}, lambda a: a["user_id"] == "u1"),
        ({"user_id": ["u1", "u2"]}, lambda a: True),
        ({"batch_id": todo["id"]}, lambda a: a["batch_id"] == todo["id"]),
        ({"kind": "task"}, lambda a: a["kind"] == "task"),
        ({"kind": "meeting,call"}, lambda a: a["kind"] in ("meeting", "call")),
        ({"status": ["cancelled", "unanswered"]}, lambda a: a["status"] != "planned"),
        ({"status": "planned"}, lambda a: a["status"] == "planned"),
        ({"from": "2030-06-07"}, lambda a: day(a) >= "2030-06-07"),
        ({"to": "2030-06-06"}, lambda a: day(a) <= "2030-06-06"),
        ({"from": "2030-06-06", "to": "2030-06-06"}, lambda a: day(a) == "2030-06-06"),
        ({"created_by": meet["created_by"]}, lambda a: a["batch_id"] == meet["id"]),
        ({"follow_ups": "has"}, lambda a: a["id"] == parent),
        ({"follow_ups": "is"}, lambda a: a["follow_up_of"] is not None),
        ({"follow_ups": "none"}, lambda a: a["id"] != parent and a["follow_up_of"] is None),
        ({"q": "early bird"}, lambda a: "early bird" in a["description"].lower()),
        ({"q": "50%"}, lambda a: "50%" in a["subject"]),
        ({"q": "0_"}, lambda a: False),  # "_" is a character, not a wildcard
        ({"external_state": "none"}, lambda a: a["external"] is None),
        (
            {"external_state": "pending_create"},
            lambda a: (a["external"] or {}).get("state") == "pending_create",
        ),
        ({"external_state": "synced"}, lambda a: False),
        ({"direction": "outgoing"}, lambda a: a["direction"] == "outgoing"),
        ({"direction": "incoming"}, lambda a: False),
        (
            {"user_id": "u1", "status": "planned", "kind": "meeting", "from": "2030-06-05"},
            lambda a: a["user_id"] == "u1" and a["status"] == "planned" and a["kind"] == "meeting",
        ),
        (
            {"batch_id": meet["id"], "follow_ups": "none", "to": "2030-06-06"},
            lambda a: (
                a["batch_id"] == meet["id"]
                and a["id"] != parent
                and a["follow_up_of"] is None
                and day(a) <= "2030-06-06"
            ),
        ),
    ]
    empty = []
    for query, keep in cases:
        expected = [a["id"] for a in everything if keep(a)]
        got = [a["id"] for a in await listed(client, tenants.a, query)]
        assert got == expected, query
        if not expected:
            empty.append(query)
    assert empty == [{"q": "0_"}, {"external_state": "synced"}, {"direction": "incoming"}]
    # The moved meeting starts Friday 00:30 in Copenhagen, Thursday 22:30 in UTC.
    [early] = await listed(client, tenants.a, {"q": "early bird"})
    assert early["start"] == "2030-06-07T00:30:00+02:00"
    assert early["id"] in {a["id"] for a in await listed(client, tenants.a, {"from": "2030-06-07"})}
    assert early["id"] not in {
        a["id"] for a in await listed(client, tenants.a, {"to": "2030-06-06"})
    }
    assert all(a["kind"] == "task" for a in await listed(client, tenants.a, {"from": "2030-06-08"}))


async def test_unknown_filter_values_are_422_naming_them(client: Client, tenants: Tenants) -> None:
    await world(client, tenants)
    other_batch = (await listed(client, tenants.b))[0]["batch_id"]
    for query, loc, named in (
        ("status=planned&status=done", ["query", "status"], "'done'"),
        ("status=planned,finished", ["query", "status"], "'finished'"),
        ("kind=visit", ["query", "kind"], "'visit'"),
        ("external_state=gone", ["query", "external_state"], "'gone'"),
        ("direction=sideways", ["query", "direction"], "'sideways'"),
        ("follow_ups=maybe", ["query", "follow_ups"], "'maybe'"),
        ("user_id=u1&user_id=nobody", ["query", "user_id"], "'nobody'"),
        ("batch_id=nope", ["query", "batch_id"], "'nope'"),
        (f"batch_id={other_batch}", ["query", "batch_id"], other_batch),  # B's: unknown to A
        ("created_by=syncsvc:batch:nope", ["query", "created_by"], "'syncsvc:batch:nope'"),
        ("from=2030-13-01", ["query", "from"], ""),
        ("from=2030-06-07&to=2030-06-06", ["query"], "before"),
        ("colour=red", ["query", "colour"], ""),
        (f"cursor={encode_cursor([5, '', 'x'])}", ["query", "cursor"], ""),
        (f"cursor={encode_cursor([0, 'soon', 'x'])}", ["query", "cursor"], ""),
        (f"cursor={encode_cursor([0, '2030-06-05T09:00:00', 'x'])}", ["query", "cursor"], ""),
        (f"cursor={encode_cursor([2, 'x', 'x'])}", ["query", "cursor"], ""),
        (f"cursor={encode_cursor(['0', '', 'x'])}", ["query", "cursor"], ""),
        ("format=pdf", ["query", "format"], ""),
    ):
        response = await client.get(f"/v1/activities?{query}", headers=tenants.a.headers)
        assert response.status == 422, query
        details = (await response.json())["error"]["details"]
        assert any(d["loc"] == loc and named in d["msg"] for d in details), (query, details)


async def test_exports_are_exactly_the_filtered_list(client: Client, tenants: Tenants) -> None:
    everything, batches = await world(client, tenants)
    for query in ({}, {"status": "planned", "user_id": "u2"}, {"batch_id": batches["todo"]["id"]}):
        expected = await listed(client, tenants.a, query)
        params = urlencode(query, doseq=True)
        response = await client.get(
            f"/v1/activities?format=csv&{params}", headers=tenants.a.headers
        )
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(await response.text())))
        header = rows[0]
        assert [r[0] for r in rows[1:]] == [a["id"] for a in expected]

        response = await client.get(
            f"/v1/activities?format=xlsx&{params}", headers=tenants.a.headers
        )
        assert response.status == 200
        assert response.content_type == (
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
        )
        book = load_workbook(io.BytesIO(await response.read()), read_only=True)
        assert book.active is not None
        sheet = [
            ["" if c is None else c for c in row] for row in book.active.iter_rows(values_only=True)
        ]
        assert sheet[0] == header
        assert sheet[1:] == [[int(c) if c.isdigit() else c for c in r] for r in rows[1:]]
    # The columns a CRM user reads, for the follow-up call.
    [call] = [a for a in everything if a["kind"] == "call"]
    response = await client.get("/v1/activities?format=csv&kind=call", headers=tenants.a.headers)
    rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert [(r["id"], r["direction"], r["start"], r["follow_up_of"]) for r in rows] == [
        (call["id"], "outgoing", call["start"], call["follow_up_of"])
    ]


async def test_exports_neutralise_formulas(client: Client, tenants: Tenants) -> None:
    """A subject a spreadsheet would run (``=HYPERLINK``) reaches CSV and XLSX as text."""
    await put_users(client, tenants.a)
    body = plan_body(targets=1, users=("u1",))
    body["template"] = {"kind": "meeting", "subject": '=HYPERLINK("x") $account-name$'}
    await commit(client, tenants.a, body)
    response = await client.get("/v1/activities?format=xlsx", headers=tenants.a.headers)
    book = load_workbook(io.BytesIO(await response.read()))
    sheet = book.active
    assert sheet is not None
    subject = [c.value for c in sheet[1]].index("subject")
    cell = sheet.cell(row=2, column=subject + 1)
    assert (cell.value, cell.data_type) == ('\'=HYPERLINK("x") Org 0', "s")
