"""Hostile request bodies get a clear 4xx, never a 500 with a traceback."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.providers._http import RETRY_AFTER_MAX_S, parse_retry_after
from syncsvc.store.db import Database
from tests.api.conftest import OPERATOR_KEY, Tenants
from tests.api.test_activities import batch_activities
from tests.api.test_plans import plan_body, put_users

Client = TestClient[web.Request, web.Application]
JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("depth", [33, 1_000, 100_000])
async def test_deeply_nested_json_is_400_on_every_json_edge(
    client: Client, tenants: Tenants, caplog: pytest.LogCaptureFixture, depth: int
) -> None:
    body = b'{"targets": ' + b"[" * depth + b"]" * depth + b"}"
    for path, headers in (
        ("/v1/plans", {**JSON, **tenants.a.headers}),
        ("/dashboard/login", JSON),
    ):
        with caplog.at_level(logging.WARNING):
            answer = await client.post(path, data=body, headers=headers)
        assert answer.status == 400, (path, await answer.text())
        error = (await answer.json())["error"]
        assert error["code"] == "bad_request"
        assert "nested" in error["message"]
    assert "Traceback" not in caplog.text
    assert "RecursionError" not in caplog.text


async def test_ordinary_nesting_still_validates(client: Client, tenants: Tenants) -> None:
    answer = await client.post(
        "/dashboard/login", data=b'{"key": "' + OPERATOR_KEY.encode() + b'"}', headers=JSON
    )
    assert answer.status in (200, 204, 303), await answer.text()


@pytest.mark.parametrize(
    "header", ["99999999999999", "1e308", "Fri, 31 Dec 9999 23:59:59 GMT", str(10**400)]
)
def test_a_huge_retry_after_is_capped(header: str) -> None:
    assert parse_retry_after(header, now_s=0.0) == RETRY_AFTER_MAX_S


FAR = ["9999-12-31T23:30:00+00:00", "0001-01-01T00:30:00+14:00", "2999-01-01T10:00:00+01:00"]


@pytest.mark.parametrize("moment", FAR)
async def test_far_off_times_are_422_and_leave_the_activity_readable(
    client: Client, tenants: Tenants, moment: str
) -> None:
    _, items = await batch_activities(client, tenants, plan_body(targets=2))
    url = f"/v1/activities/{items[0]['id']}"
    for method, path, body in (
        ("PATCH", url, {"start": moment}),
        ("PATCH", url, {"end": moment}),
        ("POST", f"{url}/follow-ups", {"start": moment}),
    ):
        answer = await client.request(method, path, json=body, headers=tenants.a.headers)
        assert answer.status == 422, (path, body, await answer.text())
        loc = (await answer.json())["error"]["details"][0]["loc"]
        assert loc[-1] in ("start", "end"), loc
    got = await client.get(url, headers=tenants.a.headers)
    assert got.status == 200 and (await got.json())["start"] == items[0]["start"]


@pytest.mark.parametrize("day", ["9999-12-31", "0001-01-01"])
async def test_far_off_dates_are_422(client: Client, tenants: Tenants, day: str) -> None:
    await put_users(client, tenants.a)
    body = plan_body(targets=2)
    body["schedule"]["start_date"] = day
    for path in ("/v1/plans", "/v1/batches"):
        answer = await client.post(path, json=body, headers=tenants.a.headers)
        assert answer.status == 422, (path, await answer.text())
    user = await client.put(
        "/v1/users/u9",
        json={"name": "U", "timezone": "Europe/Copenhagen", "days_off": [day]},
        headers=tenants.a.headers,
    )
    assert user.status == 422, await user.text()


async def test_a_thousand_forged_notifications_are_refused_in_one_log_line(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    forged = [
        {
            "subscriptionId": f"made-up-{n}",
            "clientState": "guess",
            "changeType": "updated",
            "resource": "Users/x@example.com/Events/AAMk",
            "resourceData": {"id": "AAMk"},
        }
        for n in range(1000)
    ]
    with caplog.at_level(logging.WARNING):
        answer = await client.post("/webhooks/graph", json={"value": forged})
    assert answer.status == 403, await answer.text()
    rejected = [r.getMessage() for r in caplog.records if "webhook.graph.rejected" in r.msg]
    assert len(rejected) == 1, rejected[:3]
    assert "items=1000" in rejected[0] and "unknown_subscription:1000" in rejected[0]


async def test_plans_larger_than_the_configured_limits_are_422_naming_them(
    settings: Settings, db: Database, tenants: Tenants
) -> None:
    small = replace(settings, max_targets=5, max_contacts=1, max_plan_users=1, max_exclude=2)
    async with TestClient(TestServer(build_app(small, db))) as client:
        await put_users(client, tenants.a)
        body = plan_body(targets=6)  # two users, two contacts per target
        body["exclude"] = ["a", "b", "c"]
        for path in ("/v1/plans", "/v1/batches"):
            answer = await client.post(path, json=body, headers=tenants.a.headers)
            assert answer.status == 422, await answer.text()
            details = {tuple(d["loc"]): d["msg"] for d in (await answer.json())["error"]["details"]}
            assert details == {
                ("body", "targets"): "6 given; at most 5 (SYNCSVC_MAX_TARGETS)",
                ("body", "exclude"): "3 given; at most 2 (SYNCSVC_MAX_EXCLUDE)",
                ("body", "assignment", "users"): "2 given; at most 1 (SYNCSVC_MAX_PLAN_USERS)",
                ("body", "targets", 0, "contacts"): "2 given; at most 1 (SYNCSVC_MAX_CONTACTS)",
            }, details
        answer = await client.get("/v1/batches", headers=tenants.a.headers)
        assert (await answer.json())["items"] == []  # nothing half-written
        fits = plan_body(targets=5, users=("u1",))
        for target in fits["targets"]:
            target["contacts"] = target["contacts"][:1]
        answer = await client.post("/v1/plans", json=fits, headers=tenants.a.headers)
        assert answer.status == 200, await answer.text()
