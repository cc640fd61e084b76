"""POST /v1/plans: the preview's shape and numbers (computed by hand), and its refusals.

The service's clock is fixed at ``NOW`` (Monday 2030-06-03 10:00 in Copenhagen) so that
every expected date below can be checked with a calendar. Denmark's Whit Monday (Pentecost
Monday) 2030 is June 10.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import func, select, update

from syncsvc.api.plans import CLOCK
from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, Batch, ExternalEvent, Operation, User
from tests.api.conftest import TenantKey, Tenants

Client = TestClient[web.Request, web.Application]

NOW = datetime(2030, 6, 3, 8, 0, tzinfo=UTC)
#: A Wednesday.
START = "2030-06-05"
CALDAV_URL = "http://127.0.0.1:5232/u2/calendar/"
WEEKDAY_WINDOWS = [
    {"from": "09:00", "to": "12:00", "count": 2},
    {"from": "12:30", "to": "16:00", "count": 3},
]


def fixed_clock_app(settings: Settings, db: Database) -> web.Application:
    application = build_app(settings, db)
    application[CLOCK] = lambda: NOW
    return application


@pytest.fixture
def app(settings: Settings, db: Database) -> web.Application:
    return fixed_clock_app(settings, db)


def plan_body(
    targets: int = 49, users: tuple[str, ...] = ("u1", "u2"), **over: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "targetgroup_name": "Copenhagen breweries",
        "targets": [
            {
                "id": f"org-{i}",
                "name": f"Org {i}",
                "email": f"org{i}@example.com",
                "contacts": [
                    {
                        "id": f"p{i}",
                        "first_name": "Anne",
                        "last_name": f"Jensen{i}",
                        "email": f"anne{i}@example.com",
                    },
                    {
                        "id": f"q{i}",
                        "first_name": "Bo",
                        "last_name": "Blocked",
                        "email": f"bo{i}@example.com",
                        "block_mass_email": True,
                    },
                ],
            }
            for i in range(targets)
        ],
        "template": {"kind": "meeting", "subject": "Visit $account-name$"},
        "schedule": {"start_date": START, "duration": "01:00", "interval": "00:15"},
        "assignment": {"mode": "users", "users": list(users)},
    }
    body.update(over)
    return body


async def put_users(client: Client, tenant: TenantKey) -> None:
    """u1: Denmark (public holidays), no calendar; u2: no country, a CalDAV calendar."""
    u1 = {
        "name": "Christine Kayser",
        "email": "ck@example.com",
        "timezone": "Europe/Copenhagen",
        "country": "DK",
        "calendar": {"provider": "none"},
    }
    u2 = {
        "name": "Bo Berg",
        "timezone": "Europe/Copenhagen",
        "calendar": {"provider": "caldav", "url": CALDAV_URL, "username": "u2", "password": "pw"},
    }
    for user_id, body in (("u1", u1), ("u2", u2)):
        response = await client.put(f"/v1/users/{user_id}", json=body, headers=tenant.headers)
        assert response.status == 200, await response.text()


async def row_counts(db: Database) -> dict[str, int]:
    async with db.session() as session:
        return {
            model.__tablename__: int(
                await session.scalar(select(func.count()).select_from(model)) or 0
            )
            for model in (Batch, Activity, ExternalEvent, Operation)
        }


async def test_preview_shape_and_hand_computed_numbers(
    client: Client, tenants: Tenants, db: Database
) -> None:
    await put_users(client, tenants.a)
    body = plan_body()
    body["template"]["invite_contacts"] = True
    response = await client.post("/v1/plans", json=body, headers=tenants.a.headers)
    assert response.status == 200, await response.text()
    plan = await response.json()
    assert set(plan) == {"total", "start_date", "standard_week", "users", "activities", "warnings"}
    assert plan["total"] == 49
    assert plan["start_date"] == START
    assert plan["standard_week"] == {
        "max": 25,
        "days": {
            **{d: WEEKDAY_WINDOWS for d in ("mon", "tue", "wed", "thu", "fri")},
            "sat": [],
            "sun": [],
        },
    }
    # 49 over 2 users: 25 + 24 in contiguous blocks, 5 a day. u1 (DK) skips Whit Monday:
    # Wed 5, Thu 6, Fri 7, Tue 11, Wed 12 June. u2 has no holidays: Wed 5 .. Tue 11 (4 that day).
    assert plan["users"] == [
        {
            "id": "u1",
            "name": "Christine Kayser",
            "count": 25,
            "first": "2030-06-05",
            "last": "2030-06-12",
        },
        {"id": "u2", "name": "Bo Berg", "count": 24, "first": "2030-06-05", "last": "2030-06-11"},
    ]
    acts = plan["activities"]
    assert [a["target_id"] for a in acts] == [f"org-{i}" for i in range(49)]
    assert [a["user_id"] for a in acts] == ["u1"] * 25 + ["u2"] * 24
    assert acts[0] == {
        "target_id": "org-0",
        "user_id": "u1",
        "kind": "meeting",
        "start": "2030-06-05T09:00:00+02:00",
        "end": "2030-06-05T10:00:00+02:00",
        "due": None,
        "subject": "Visit Org 0",
        "attendees": [{"contact_id": "p0", "name": "Anne Jensen0", "email": "anne0@example.com"}],
    }
    # Packing: 09:00, 10:15 | 12:30, 13:45, 15:00.
    assert [(a["start"][11:16], a["end"][11:16]) for a in acts[:5]] == [
        ("09:00", "10:00"),
        ("10:15", "11:15"),
        ("12:30", "13:30"),
        ("13:45", "14:45"),
        ("15:00", "16:00"),
    ]
    assert acts[15]["start"] == "2030-06-11T09:00:00+02:00"  # Monday 10th was Whit Monday
    assert acts[24]["start"] == "2030-06-12T15:00:00+02:00"
    assert acts[25]["start"] == "2030-06-05T09:00:00+02:00"  # u2 starts in parallel
    assert acts[48]["start"] == "2030-06-11T13:45:00+02:00"
    assert all(set(w) == {"code", "message", "suggestion"} for w in plan["warnings"])
    assert "window_slack" in {w["code"] for w in plan["warnings"]}


async def test_preview_writes_nothing_and_merges_both_kinds_of_days_off(
    client: Client, tenants: Tenants, db: Database
) -> None:
    await put_users(client, tenants.a)
    before = await row_counts(db)
    # u1: a day off read from the calendar; u2: a day off sent by the CRM.
    async with db.session() as session, session.begin():
        await session.execute(
            update(User).where(User.id == "u1").values(provider_days_off=["2030-06-06"])
        )
    u2 = {
        "name": "Bo Berg",
        "timezone": "Europe/Copenhagen",
        "days_off": ["2030-06-07"],
        "calendar": {"provider": "caldav", "url": CALDAV_URL, "username": "u2", "password": "pw"},
    }
    assert (await client.put("/v1/users/u2", json=u2, headers=tenants.a.headers)).status == 200
    response = await client.post("/v1/plans", json=plan_body(), headers=tenants.a.headers)
    assert response.status == 200, await response.text()
    users = (await response.json())["users"]
    # u1: Wed 5, (Thu 6 off), Fri 7, (Mon 10 holiday), Tue 11, Wed 12, Thu 13.
    # u2: Wed 5, Thu 6, (Fri 7 off), Mon 10, Tue 11, Wed 12 (4).
    assert [(u["first"], u["last"]) for u in users] == [
        ("2030-06-05", "2030-06-13"),
        ("2030-06-05", "2030-06-12"),
    ]
    assert (
        await row_counts(db)
        == before
        == {"batches": 0, "activities": 0, "external_events": 0, "operations": 0}
    )


def _with(body: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


async def test_bad_plans_are_422_naming_the_field(
    client: Client, tenants: Tenants, db: Database
) -> None:
    await put_users(client, tenants.a)
    base = plan_body(targets=3)
    owner_mode = _with(base, ("assignment",), {"mode": "owner"})
    owner_mode["targets"][1]["owner_id"] = "ghost"
    owner_mode["targets"][0]["owner_id"] = "u1"
    owner_mode["targets"][2]["owner_id"] = "u1"
    cases: list[tuple[dict[str, Any], list[Any]]] = [
        (_with(base, ("assignment", "users"), ["u1", "ghost"]), ["body", "assignment", "users", 1]),
        (owner_mode, ["body", "targets", 1, "owner_id"]),
        (_with(base, ("template", "kind"), "lunch"), ["body", "template", "kind"]),
        (
            _with(base, ("schedule", "week"), {"mon": [["12:00", "09:00"]]}),
            ["body", "schedule", "week", "mon", 0],
        ),
        (
            _with(base, ("schedule", "week"), {"wensday": [["09:00", "12:00"]]}),
            ["body", "schedule", "week", "wensday"],
        ),
        (
            _with(base, ("schedule", "week"), {"tue": [["9:00", "12:00"]]}),
            ["body", "schedule", "week", "tue", 0, 0],
        ),
        (_with(base, ("schedule", "duration"), "09:00"), ["body", "schedule", "duration"]),
        (_with(base, ("schedule", "duration"), "00:00"), ["body", "schedule", "duration"]),
        (_with(base, ("schedule", "max_per_dya"), 3), ["body", "schedule", "max_per_dya"]),
        (_with(base, ("template", "subject"), "Hi $acount-name$"), ["body", "template", "subject"]),
        ({k: v for k, v in base.items() if k != "template"}, ["body", "template"]),
    ]
    for body, loc in cases:
        for path in ("/v1/plans", "/v1/batches"):
            response = await client.post(path, json=body, headers=tenants.a.headers)
            assert response.status == 422, (loc, await response.text())
            error = (await response.json())["error"]
            assert error["code"] == "validation_error"
            assert loc in [d["loc"] for d in error["details"]], (loc, error)
    # A refused commit leaves no batch, activity, ledger row or operation behind.
    assert await row_counts(db) == {
        "batches": 0,
        "activities": 0,
        "external_events": 0,
        "operations": 0,
    }


async def test_another_tenants_users_are_unknown(client: Client, tenants: Tenants) -> None:
    await put_users(client, tenants.a)
    response = await client.post("/v1/plans", json=plan_body(), headers=tenants.b.headers)
    assert response.status == 422
    details = (await response.json())["error"]["details"]
    assert [d["loc"] for d in details] == [
        ["body", "assignment", "users", 0],
        ["body", "assignment", "users", 1],
    ]
