"""Bad input answers a 4xx envelope naming the problem, writes nothing, logs no traceback."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import func, select

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.store.db import Database
from syncsvc.store.models import IdempotencyKey, User
from tests.api.conftest import Tenants
from tests.api.test_users import user_body

Client = TestClient[web.Request, web.Application]
TWELVE_MB = 12 * 1024 * 1024


async def _rows(db: Database) -> tuple[int, int]:
    async with db.session() as session:
        users = await session.scalar(select(func.count()).select_from(User))
        keys = await session.scalar(select(func.count()).select_from(IdempotencyKey))
    return users or 0, keys or 0


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert [
        r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR
    ] == []


async def _put(client: Client, tenants: Tenants, **kw: Any) -> tuple[int, dict[str, Any]]:
    headers = {**tenants.a.headers, **kw.pop("headers", {})}
    got = await client.put("/v1/users/u1", headers=headers, **kw)
    assert got.content_type == "application/json"
    return got.status, await got.json()


def _locs(body: dict[str, Any]) -> list[list[Any]]:
    return [d["loc"] for d in body["error"]["details"]]


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    "raw",
    [b"{", b"", b'{"timezone": "UTC",}', b"\xff\xfe", b'{"timezone": NaN}'],
    ids=["truncated", "empty", "trailing-comma", "not-utf8", "nan"],
)
async def test_unparseable_json_is_400(
    client: Client, tenants: Tenants, db: Database, caplog: pytest.LogCaptureFixture, raw: bytes
) -> None:
    status, body = await _put(client, tenants, data=raw, headers=JSON)
    assert status == 400
    assert body["error"]["code"] == "bad_request"
    assert await _rows(db) == (0, 0)
    _no_traceback(caplog)


async def test_wrong_content_type_is_400(
    client: Client, tenants: Tenants, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    status, body = await _put(
        client, tenants, data=b"timezone=UTC", headers={"Content-Type": "text/plain"}
    )
    assert status == 400
    assert _locs(body) == [["header", "Content-Type"]]
    assert await _rows(db) == (0, 0)
    _no_traceback(caplog)


async def test_a_body_over_the_limit_is_413(
    client: Client, tenants: Tenants, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    status, body = await _put(client, tenants, data=b" " * TWELVE_MB, headers=JSON)
    assert status == 413
    assert body["error"]["code"] == "too_large"
    assert await _rows(db) == (0, 0)
    _no_traceback(caplog)


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"timezone": 5}, ["body", "timezone"]),
        ({"timezone": "Mars/Olympus_Mons"}, ["body", "timezone"]),
        ({"timezone": "../../etc/passwd"}, ["body", "timezone"]),
        ({"country": "XX"}, ["body", "country"]),
        ({"country": "DK", "subdivision": "BY"}, ["body", "subdivision"]),
        ({"country": None, "subdivision": "BY"}, ["body", "subdivision"]),
        ({"days_off": "2017-06-19"}, ["body", "days_off"]),
        ({"days_off": ["2017-02-30"]}, ["body", "days_off", 0]),
        ({"name": 42}, ["body", "name"]),
        ({"name": "x" * 201}, ["body", "name"]),
        ({"name": "nul\x00byte"}, ["body", "name"]),
        ({"calendar": {"provider": "exchange"}}, ["body", "calendar"]),
        ({"calendar": {"provider": "graph"}}, ["body", "calendar", "graph", "mailbox"]),
        (
            {
                "calendar": {
                    "provider": "caldav",
                    "url": "ftp://x/",
                    "username": "u",
                    "password": "p",
                }
            },
            ["body", "calendar", "caldav", "url"],
        ),
        ({"calendar": None}, ["body", "calendar"]),
    ],
)
async def test_invalid_fields_are_422_naming_the_field(
    client: Client,
    tenants: Tenants,
    db: Database,
    caplog: pytest.LogCaptureFixture,
    change: dict[str, Any],
    loc: list[Any],
) -> None:
    status, body = await _put(client, tenants, json=user_body(**change))
    assert status == 422
    assert body["error"]["code"] == "validation_error"
    assert _locs(body) == [loc]
    assert all(d["msg"] for d in body["error"]["details"])
    assert await _rows(db) == (0, 0)
    _no_traceback(caplog)


async def test_missing_required_fields_are_each_named(client: Client, tenants: Tenants) -> None:
    status, body = await _put(client, tenants, json={"name": "x"})
    assert status == 422
    assert sorted(_locs(body)) == [["body", "calendar"], ["body", "timezone"]]


async def test_a_json_array_is_not_a_user(client: Client, tenants: Tenants) -> None:
    status, body = await _put(client, tenants, json=[user_body()])
    assert status == 422
    assert _locs(body) == [["body"]]


async def test_a_bad_user_id_is_422(client: Client, tenants: Tenants) -> None:
    got = await client.get("/v1/users/" + "x" * 201, headers=tenants.a.headers)
    assert got.status == 422
    assert _locs(await got.json()) == [["path", "user_id"]]


async def test_unknown_query_parameters_are_422(client: Client, tenants: Tenants) -> None:
    got = await client.get("/v1/users?limt=10&limit=5", headers=tenants.a.headers)
    assert got.status == 422
    assert _locs(await got.json()) == [["query", "limt"]]


async def test_unknown_route_and_method_answer_the_envelope(
    client: Client, tenants: Tenants
) -> None:
    missing = await client.get("/v1/nothing-here", headers=tenants.a.headers)
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"
    wrong = await client.post("/healthz")
    assert wrong.status == 405
    assert (await wrong.json())["error"]["code"] == "method_not_allowed"
    unknown_user = await client.get("/v1/users/nobody", headers=tenants.a.headers)
    assert unknown_user.status == 404
    assert _locs(await unknown_user.json()) == [["path", "user_id"]]


async def test_an_unexpected_error_is_a_500_with_a_logged_traceback(
    settings: Settings, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("a bug, not bad input")

    app = build_app(settings, db)
    app.router.add_get("/feeds/boom", boom)  # a public path: no key needed
    async with TestClient(TestServer(app)) as client:
        got = await client.get("/feeds/boom")
        assert got.status == 500
        body = await got.json()
    assert body == {
        "error": {
            "code": "internal_error",
            "message": "an unexpected error occurred",
            "details": [],
        }
    }
    assert "a bug" not in str(body)
    errors = [r for r in caplog.records if r.exc_info]
    assert len(errors) == 1 and "RuntimeError" in caplog.text


async def test_readyz_is_503_when_the_database_does_not_answer() -> None:
    dead = Database("postgresql://postgres@127.0.0.1:9/nowhere")  # port 9: nothing listens
    app = build_app(Settings(), dead)
    try:
        async with TestClient(TestServer(app)) as client:
            ready = await client.get("/readyz")
            assert ready.status == 503
            assert (await ready.json())["error"]["code"] == "not_ready"
            assert int(ready.headers["Retry-After"]) > 0
            assert (await client.get("/healthz")).status == 200
    finally:
        await dead.aclose()


async def test_health_and_ready_when_fine(client: Client) -> None:
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    assert await (await client.get("/readyz")).json() == {"status": "ready"}


async def test_metrics_count_requests_by_route_and_status(client: Client, tenants: Tenants) -> None:
    await client.get("/v1/users/nobody", headers=tenants.a.headers)
    await client.get("/v1/users/nobody", headers=tenants.a.headers)
    got = await client.get("/metrics")
    assert got.status == 200 and got.content_type == "text/plain"
    exposition = await got.text()
    assert (
        'syncsvc_http_requests_total{method="GET",route="/v1/users/{user_id}",status="404"} 2.0'
        in exposition
    )
    assert "syncsvc_http_request_duration_seconds_bucket" in exposition
    assert "nobody" not in exposition


async def test_request_log_is_key_value_without_ids_or_keys(
    client: Client, tenants: Tenants, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="syncsvc.http")
    await client.put("/v1/users/u-secretive", json=user_body(), headers=tenants.a.headers)
    lines = [r.getMessage() for r in caplog.records if r.name == "syncsvc.http"]
    assert lines == [lines[0]] and lines[0].startswith(
        "event=http.request method=PUT route=/v1/users/{user_id} status=200"
    )
    assert f"tenant={tenants.a.id}" in lines[0]
    assert "u-secretive" not in caplog.text and tenants.a.key not in caplog.text
