"""Schedules through HTTP: create (next run hand-computed), read, list, delete, runs; every
bad field is a 422 naming it and writes nothing (a cron firing more often than the configured
minimum too); another tenant's schedule is a 404."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import func, select

from syncsvc.api.plans import CLOCK
from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.store.db import Database
from syncsvc.store.models import Schedule, ScheduleRun
from tests.api.conftest import TenantKey, Tenants

Client = TestClient[web.Request, web.Application]

#: A Wednesday; Finland moves to summer time on Sunday 2027-03-28.
NOW = datetime(2027, 3, 24, 10, 0, tzinfo=UTC)


@pytest.fixture
def app(settings: Settings, db: Database) -> web.Application:
    application = build_app(settings, db)
    application[CLOCK] = lambda: NOW
    return application


def schedule_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "Monday reminders",
        "cron": "0 6 * * mon",
        "timezone": "Europe/Helsinki",
        "targets_url": "https://crm.example.com/targetgroups/42/members?stale=90",
        "plan": {
            "targetgroup_name": "Not contacted for 90 days",
            "template": {"kind": "task", "subject": "Call $account-name$", "due_days": 7},
            "schedule": {"duration": "00:30"},
            "assignment": {"mode": "users", "users": ["u1"]},
        },
    }
    body.update(over)
    return body


async def put_user(client: Client, tenant: TenantKey, user_id: str = "u1") -> None:
    body = {
        "name": "Aino Virtanen",
        "timezone": "Europe/Helsinki",
        "calendar": {"provider": "none"},
    }
    response = await client.put(f"/v1/users/{user_id}", json=body, headers=tenant.headers)
    assert response.status == 200, await response.text()


async def create(client: Client, tenant: TenantKey, **over: Any) -> dict[str, Any]:
    response = await client.post(
        "/v1/schedules", json=schedule_body(**over), headers=tenant.headers
    )
    assert response.status == 201, await response.text()
    created: dict[str, Any] = await response.json()
    return created


async def count_schedules(db: Database) -> int:
    async with db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(Schedule)) or 0)


async def test_create_read_list_delete(client: Client, tenants: Tenants) -> None:
    await put_user(client, tenants.a)
    created = await create(client, tenants.a)
    # The next Monday 06:00 in Helsinki, already in summer time (+03:00).
    assert created["next_run_at"] == "2027-03-29T06:00:00+03:00"
    assert created["cron"] == "0 6 * * mon" and created["timezone"] == "Europe/Helsinki"
    assert created["targets_url"] == "https://crm.example.com/targetgroups/42/members?stale=90"
    plan = created["plan"]
    assert "targets" not in plan
    assert plan["schedule"]["start_date"] is None and plan["schedule"]["duration"] == "00:30"
    assert plan["template"]["due_days"] == 7 and plan["assignment"]["users"] == ["u1"]

    response = await client.get(f"/v1/schedules/{created['id']}", headers=tenants.a.headers)
    assert response.status == 200
    assert await response.json() == created

    second = await create(client, tenants.a, name="Daily", cron="@daily")
    assert second["next_run_at"] == "2027-03-25T00:00:00+02:00"
    third = await create(client, tenants.a, name="Hourly", cron="15 * * * *")
    assert third["next_run_at"] == "2027-03-24T12:15:00+02:00"

    first_page = await client.get("/v1/schedules?limit=2", headers=tenants.a.headers)
    page1 = await first_page.json()
    assert len(page1["items"]) == 2 and page1["next_cursor"]
    rest = await client.get(
        f"/v1/schedules?limit=2&cursor={page1['next_cursor']}", headers=tenants.a.headers
    )
    page2 = await rest.json()
    assert page2["next_cursor"] is None
    listed = [s["id"] for s in (*page1["items"], *page2["items"])]
    assert sorted(listed) == sorted([created["id"], second["id"], third["id"]])
    assert len(set(listed)) == 3

    response = await client.delete(f"/v1/schedules/{created['id']}", headers=tenants.a.headers)
    assert response.status == 204 and await response.read() == b""
    for method in ("GET", "DELETE"):
        gone = await client.request(
            method, f"/v1/schedules/{created['id']}", headers=tenants.a.headers
        )
        assert gone.status == 404
        assert (await gone.json())["error"]["code"] == "not_found"


async def test_runs_are_listed_latest_first_with_their_outcome(
    client: Client, tenants: Tenants, db: Database
) -> None:
    await put_user(client, tenants.a)
    created = await create(client, tenants.a)
    monday = datetime(2027, 3, 29, 3, 0, tzinfo=UTC)
    async with db.session() as session, session.begin():
        session.add_all(
            [
                ScheduleRun(
                    id="r1",
                    tenant_id=tenants.a.id,
                    schedule_id=created["id"],
                    occurrence=monday,
                    state="ok",
                    attempts=2,
                    batch_id="b1",
                    started_at=monday,
                    finished_at=monday + timedelta(minutes=1),
                ),
                ScheduleRun(
                    id="r2",
                    tenant_id=tenants.a.id,
                    schedule_id=created["id"],
                    occurrence=monday + timedelta(days=7),
                    state="retrying",
                    attempts=1,
                    next_attempt_at=monday + timedelta(days=7, minutes=1),
                    error="targets_url answered HTTP 503",
                    started_at=monday + timedelta(days=7),
                ),
            ]
        )
    response = await client.get(
        f"/v1/schedules/{created['id']}/runs?limit=1", headers=tenants.a.headers
    )
    assert response.status == 200
    page1 = await response.json()
    assert page1["items"] == [
        {
            "id": "r2",
            "occurrence": "2027-04-05T06:00:00+03:00",
            "state": "retrying",
            "attempts": 1,
            "started_at": "2027-04-05T03:00:00+00:00",
            "finished_at": None,
            "next_attempt_at": "2027-04-05T03:01:00+00:00",
            "batch_id": None,
            "error": "targets_url answered HTTP 503",
        }
    ]
    response = await client.get(
        f"/v1/schedules/{created['id']}/runs?limit=1&cursor={page1['next_cursor']}",
        headers=tenants.a.headers,
    )
    page2 = await response.json()
    assert page2["next_cursor"] is None
    [run] = page2["items"]
    assert (run["id"], run["state"], run["attempts"], run["batch_id"]) == ("r1", "ok", 2, "b1")
    assert run["occurrence"] == "2027-03-29T06:00:00+03:00"
    assert run["finished_at"] == "2027-03-29T03:01:00+00:00" and run["next_attempt_at"] is None

    # Deleting the schedule takes its run history with it.
    await client.delete(f"/v1/schedules/{created['id']}", headers=tenants.a.headers)
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(ScheduleRun)) == 0


def _plan_with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    body = schedule_body()
    node = body["plan"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return body


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (schedule_body(cron="0 6 * * someday"), ["body", "cron"]),
        (schedule_body(cron="61 6 * * mon"), ["body", "cron"]),
        (schedule_body(cron="0 6 * * mon 2027"), ["body", "cron"]),
        (schedule_body(cron="0 0 30 2 *"), ["body", "cron"]),
        (schedule_body(cron="*/5 * * * *"), ["body", "cron"]),
        (schedule_body(cron="0,1 * * * *"), ["body", "cron"]),
        (schedule_body(timezone="Europe/Helsingfors"), ["body", "timezone"]),
        (schedule_body(targets_url="ftp://crm.example.com/x"), ["body", "targets_url"]),
        (schedule_body(targets_url="https:///no-host"), ["body", "targets_url"]),
        (schedule_body(name=""), ["body", "name"]),
        (_plan_with(("targets",), [{"id": "org-1", "name": "Org"}]), ["body", "plan", "targets"]),
        (_plan_with(("template", "kind"), "visit"), ["body", "plan", "template", "kind"]),
        (_plan_with(("schedule", "duration"), "00:00"), ["body", "plan", "schedule", "duration"]),
        (
            _plan_with(("template", "subject"), "Hi $contact-nickname$"),
            ["body", "plan", "template", "subject"],
        ),
        (
            _plan_with(("assignment", "users"), ["u1", "nobody"]),
            ["body", "plan", "assignment", "users", 1],
        ),
    ],
    ids=[
        "cron-word",
        "cron-minute",
        "cron-six-fields",
        "cron-never",
        "cron-every-5-minutes",
        "cron-twice-an-hour-a-minute-apart",
        "zone",
        "url-scheme",
        "url-host",
        "name",
        "targets",
        "kind",
        "duration",
        "tag",
        "user",
    ],
)
async def test_bad_schedules_are_422_naming_the_field(
    client: Client, tenants: Tenants, db: Database, body: dict[str, Any], loc: list[Any]
) -> None:
    await put_user(client, tenants.a)
    response = await client.post("/v1/schedules", json=body, headers=tenants.a.headers)
    assert response.status == 422, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "validation_error"
    assert [d["loc"] for d in error["details"]] == [loc]
    assert await count_schedules(db) == 0


async def test_another_tenant_sees_nothing(client: Client, tenants: Tenants, db: Database) -> None:
    await put_user(client, tenants.a)
    created = await create(client, tenants.a)
    path = f"/v1/schedules/{created['id']}"
    for method, url in (("GET", path), ("DELETE", path), ("GET", f"{path}/runs")):
        response = await client.request(method, url, headers=tenants.b.headers)
        assert response.status == 404, (method, url)
    listed = await client.get("/v1/schedules", headers=tenants.b.headers)
    assert (await listed.json()) == {"items": [], "next_cursor": None}
    # B cannot assign A's users either.
    response = await client.post("/v1/schedules", json=schedule_body(), headers=tenants.b.headers)
    assert response.status == 422
    assert await count_schedules(db) == 1
    unauthenticated = await client.get("/v1/schedules")
    assert unauthenticated.status == 401


@pytest.mark.parametrize(
    ("cron", "minutes"),
    [("*/5 * * * *", 5), ("0,1 * * * *", 1), ("*/10 8-16 * * mon-fri", 10), ("* * * * *", 1)],
)
async def test_a_cron_more_frequent_than_the_minimum_is_422_naming_it(
    client: Client, tenants: Tenants, db: Database, cron: str, minutes: int
) -> None:
    await put_user(client, tenants.a)
    response = await client.post(
        "/v1/schedules", json=schedule_body(cron=cron), headers=tenants.a.headers
    )
    assert response.status == 422, await response.text()
    assert (await response.json())["error"]["details"] == [
        {
            "loc": ["body", "cron"],
            "msg": f"fires {minutes} minutes apart; schedules may fire at most every 15 minutes",
        }
    ]
    assert await count_schedules(db) == 0
    # Every 15 minutes is as often as the default allows.
    every_15 = await create(client, tenants.a, cron="*/15 * * * *")
    assert every_15["next_run_at"] == "2027-03-24T12:15:00+02:00"


async def test_the_minimum_interval_is_configurable(
    settings: Settings, db: Database, tenants: Tenants
) -> None:
    app = build_app(replace(settings, schedule_min_interval_minutes=60), db)
    app[CLOCK] = lambda: NOW
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        await put_user(client, tenants.a)
        await create(client, tenants.a, cron="@hourly")
        response = await client.post(
            "/v1/schedules", json=schedule_body(cron="*/30 * * * *"), headers=tenants.a.headers
        )
        assert response.status == 422, await response.text()
        [detail] = (await response.json())["error"]["details"]
        assert detail["msg"].endswith("at most every 60 minutes")
