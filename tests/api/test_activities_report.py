"""GET /v1/batches/{id}/report: one row per live activity with its targets, their contacts,
the assignee, the time and the sync state, as CSV or XLSX (Swedish seed, steps 5-6)."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openpyxl import load_workbook

from syncsvc.config import Settings
from syncsvc.store.db import Database
from tests.api.conftest import Tenants
from tests.api.test_activities_list import commit, listed
from tests.api.test_plans import fixed_clock_app, plan_body, put_users

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def app(settings: Settings, db: Database) -> web.Application:
    return fixed_clock_app(settings, db)


def contacts(i: int) -> str:
    return f"Anne Jensen{i} <anne{i}@example.com>; Bo Blocked <bo{i}@example.com>"


async def report(client: Client, tenants: Tenants, batch_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/batches/{batch_id}/report", headers=tenants.a.headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/csv")
    text = await response.text()
    xlsx = await client.get(f"/v1/batches/{batch_id}/report?format=xlsx", headers=tenants.a.headers)
    assert xlsx.status == 200
    book = load_workbook(io.BytesIO(await xlsx.read()), read_only=True)
    assert book.active is not None
    sheet = [
        ["" if c is None else str(c) for c in r] for r in book.active.iter_rows(values_only=True)
    ]
    assert sheet == list(csv.reader(io.StringIO(text)))  # the same rows in both formats
    return list(csv.DictReader(io.StringIO(text)))


async def test_one_row_per_activity_with_targets_contacts_assignee_and_sync_state(
    client: Client, tenants: Tenants
) -> None:
    await put_users(client, tenants.a)
    batch = await commit(client, tenants.a, plan_body(targets=4))
    acts = await listed(client, tenants.a, {"batch_id": batch["id"]})
    by_target = {a["target_id"]: a for a in acts}
    headers = tenants.a.headers
    first = by_target["org-0"]
    follow = await client.post(f"/v1/activities/{first['id']}/follow-ups", json={}, headers=headers)
    call = await follow.json()
    gone = by_target["org-2"]
    assert (await client.delete(f"/v1/activities/{gone['id']}", headers=headers)).status == 200

    rows = await report(client, tenants, batch["id"])
    assert [r["activity_id"] for r in rows] == [
        by_target["org-0"]["id"],
        by_target["org-1"]["id"],
        by_target["org-3"]["id"],
        call["id"],
    ]
    names = {"u1": "Christine Kayser", "u2": "Bo Berg"}
    for row in rows:
        activity = call if row["activity_id"] == call["id"] else by_target[row["target_ids"]]
        i = int(activity["target_id"].split("-")[1])
        assert row == {
            "activity_id": activity["id"],
            "target_ids": f"org-{i}",
            "target_names": f"Org {i}",
            "contacts": contacts(i),
            "user_id": activity["user_id"],
            "user_name": names[activity["user_id"]],
            "kind": activity["kind"],
            "start": activity["start"],
            "end": activity["end"],
            "due": "",
            "subject": activity["subject"],
            "status": "planned",
            "follow_up_of": activity["follow_up_of"] or "",
            "external_provider": "caldav" if activity["user_id"] == "u2" else "",
            "sync_state": "pending_create" if activity["user_id"] == "u2" else "",
        }


async def test_a_shared_activity_lists_every_target_and_contact(
    client: Client, tenants: Tenants
) -> None:
    await put_users(client, tenants.a)
    body = plan_body(targets=3, users=("u1",))
    body["template"] = {"kind": "meeting", "subject": "Seminar", "grouping": "shared"}
    batch = await commit(client, tenants.a, body)
    [row] = await report(client, tenants, batch["id"])
    assert (row["target_ids"], row["target_names"]) == (
        "org-0; org-1; org-2",
        "Org 0; Org 1; Org 2",
    )
    assert row["contacts"] == "; ".join(contacts(i) for i in range(3))


async def test_unknown_or_foreign_batches_and_formats(client: Client, tenants: Tenants) -> None:
    await put_users(client, tenants.a)
    batch = await commit(client, tenants.a, plan_body(targets=1))
    for url, headers, status in (
        ("/v1/batches/nope/report", tenants.a.headers, 404),
        (f"/v1/batches/{batch['id']}/report", tenants.b.headers, 404),
        (f"/v1/batches/{batch['id']}/report?format=pdf", tenants.a.headers, 422),
    ):
        assert (await client.get(url, headers=headers)).status == status, url
