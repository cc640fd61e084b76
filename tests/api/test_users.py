"""Users: create/replace/read, secrets never leave encrypted, days off, lists and CSV."""

from __future__ import annotations

import csv
import io
import json
import logging
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import text, update
from sqlalchemy.engine import make_url

from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import User
from tests.api.conftest import SECRET_KEY, Tenants

Client = TestClient[web.Request, web.Application]


def user_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "Christine Kayser",
        "email": "ck@example.com",
        "mobile": "+45 12 34 56 78",
        "timezone": "Europe/Copenhagen",
        "country": "DK",
        "subdivision": None,
        "days_off": ["2017-06-19"],
        "calendar": {"provider": "graph", "mailbox": "ck@example.com"},
    }
    body.update(overrides)
    return body


async def test_put_creates_then_get_returns_the_same_user(client: Client, tenants: Tenants) -> None:
    put = await client.put("/v1/users/u1", json=user_body(), headers=tenants.a.headers)
    assert put.status == 200
    got = await client.get("/v1/users/u1", headers=tenants.a.headers)
    assert got.status == 200
    body = await got.json()
    assert body == await put.json()
    assert {k: body[k] for k in ("id", "name", "email", "mobile", "timezone", "country")} == {
        "id": "u1",
        "name": "Christine Kayser",
        "email": "ck@example.com",
        "mobile": "+45 12 34 56 78",
        "timezone": "Europe/Copenhagen",
        "country": "DK",
    }
    assert body["subdivision"] is None
    assert body["days_off"] == ["2017-06-19"]
    assert body["calendar"] == {"provider": "graph", "mailbox": "ck@example.com"}
    assert datetime.fromisoformat(body["created_at"]).utcoffset() == timedelta(0)


async def test_put_replaces_every_field(client: Client, tenants: Tenants) -> None:
    await client.put("/v1/users/u1", json=user_body(), headers=tenants.a.headers)
    first = await (await client.get("/v1/users/u1", headers=tenants.a.headers)).json()
    replaced = {
        "timezone": "America/New_York",
        "country": "DE",
        "subdivision": "BY",
        "calendar": {"provider": "google", "calendar_id": "ck@example.org"},
    }
    put = await client.put("/v1/users/u1", json=replaced, headers=tenants.a.headers)
    assert put.status == 200
    body = await (await client.get("/v1/users/u1", headers=tenants.a.headers)).json()
    assert body["name"] == "" and body["email"] == "" and body["days_off"] == []
    assert (body["timezone"], body["country"], body["subdivision"]) == (
        "America/New_York",
        "DE",
        "BY",
    )
    assert body["calendar"] == {
        "provider": "google",
        "calendar_id": "ck@example.org",
        "oauth_configured": False,
    }
    assert body["created_at"] == first["created_at"]


async def test_minimal_user_needs_only_timezone_and_calendar(
    client: Client, tenants: Tenants
) -> None:
    put = await client.put(
        "/v1/users/min",
        json={"timezone": "UTC", "calendar": {"provider": "none"}},
        headers=tenants.a.headers,
    )
    assert put.status == 200
    body = await put.json()
    assert body["calendar"] == {"provider": "none"}
    assert body["country"] is None and body["days_off"] == []


async def _everything_stored(db: Database, database_url: str) -> bytes:
    """Every row of the tables a user touches, as text; for SQLite also the raw files."""
    dumped = io.StringIO()
    async with db.session() as session:
        for table in ("users", "tenants", "idempotency_keys"):
            for row in (await session.execute(text(f"SELECT * FROM {table}"))).all():
                dumped.write(repr(tuple(row)))
    raw = dumped.getvalue().encode()
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        await db.engine.dispose()  # checkpoint and close: the file is complete
        base = Path(str(url.database))
        for path in (base, Path(f"{base}-wal"), Path(f"{base}-shm")):
            if path.exists():
                raw += path.read_bytes()
    return raw


async def test_secrets_are_stored_encrypted_and_never_shown(
    client: Client,
    tenants: Tenants,
    db: Database,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    password = "pw-" + secrets.token_hex(16)
    refresh = "rt-" + secrets.token_hex(16)
    caldav = {
        "provider": "caldav",
        "url": "https://dav.example.com/ck/cal/",
        "username": "ck",
        "password": password,
    }
    put = await client.put(
        "/v1/users/u1", json=user_body(calendar=caldav), headers=tenants.a.headers
    )
    google = {
        "provider": "google",
        "calendar_id": "g@example.com",
        "oauth": {"refresh_token": refresh, "client_id": "cid", "client_secret": "csec"},
    }
    put_g = await client.put(
        "/v1/users/u2", json=user_body(calendar=google), headers=tenants.a.headers
    )
    answers = [await put.text(), await put_g.text()]
    for path in ("/v1/users/u1", "/v1/users/u2", "/v1/users", "/v1/users?format=csv"):
        answers.append(await (await client.get(path, headers=tenants.a.headers)).text())
    assert json.loads(answers[0])["calendar"] == {
        "provider": "caldav",
        "url": "https://dav.example.com/ck/cal/",
        "server_url": None,
        "username": "ck",
        "password_set": True,
    }
    assert json.loads(answers[1])["calendar"]["oauth_configured"] is True

    async with db.session() as session:
        u1 = await session.get(User, (tenants.a.id, "u1"))
        u2 = await session.get(User, (tenants.a.id, "u2"))
        assert u1 is not None and u2 is not None and u1.calendar_secret and u2.calendar_secret
        box = SecretBox(SECRET_KEY)
        assert box.decrypt(u1.calendar_secret) == {"password": password}
        assert box.decrypt(u2.calendar_secret)["oauth"]["refresh_token"] == refresh
        assert u1.calendar_config == {"url": "https://dav.example.com/ck/cal/", "username": "ck"}

    stored = await _everything_stored(db, database_url)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert caplog.records, "the request log is captured"
    for secret in (password, refresh):
        assert secret.encode() not in stored
        assert all(secret not in answer for answer in answers)
        assert secret not in logged


async def test_days_off_merge_crm_holidays_and_calendar(
    client: Client, tenants: Tenants, db: Database
) -> None:
    await client.put("/v1/users/u1", json=user_body(), headers=tenants.a.headers)
    async with db.session() as session, session.begin():
        await session.execute(
            update(User)
            .where(User.tenant_id == tenants.a.id, User.id == "u1")
            .values(provider_days_off=["2017-06-20", "2017-06-19", "2017-07-03"])
        )
    got = await client.get(
        "/v1/users/u1/days-off?from=2017-06-01&to=2017-06-30", headers=tenants.a.headers
    )
    assert got.status == 200
    body = await got.json()
    # Easter 2017 is 16 April: Whit Sunday 4 June, Whit Monday 5 June (DK public holidays).
    assert [(d["date"], d["source"]) for d in body["items"]] == [
        ("2017-06-04", "holiday"),
        ("2017-06-05", "holiday"),
        ("2017-06-19", "crm"),
        ("2017-06-19", "graph"),
        ("2017-06-20", "graph"),
    ]
    assert body["items"][0]["name"] and body["items"][2]["name"] == ""
    assert (body["from"], body["to"], body["next_cursor"]) == ("2017-06-01", "2017-06-30", None)


async def test_days_off_follow_the_subdivision(client: Client, tenants: Tenants) -> None:
    # Corpus Christi (Easter + 60 days: 15 June 2017) is a holiday in Bavaria, not in Berlin.
    window = "?from=2017-06-15&to=2017-06-15"
    for sub, expected in (("BY", ["2017-06-15"]), ("BE", [])):
        body = user_body(country="DE", subdivision=sub, days_off=[])
        assert (
            await client.put("/v1/users/u1", json=body, headers=tenants.a.headers)
        ).status == 200
        got = await (
            await client.get("/v1/users/u1/days-off" + window, headers=tenants.a.headers)
        ).json()
        assert [d["date"] for d in got["items"]] == expected, sub


async def test_days_off_default_window_is_a_year_from_today_in_the_users_zone(
    client: Client, tenants: Tenants
) -> None:
    body = user_body(timezone="Pacific/Kiritimati", country=None, days_off=[])
    await client.put("/v1/users/u1", json=body, headers=tenants.a.headers)
    got = await (await client.get("/v1/users/u1/days-off", headers=tenants.a.headers)).json()
    today = datetime.now(UTC).astimezone(ZoneInfo("Pacific/Kiritimati")).date()
    assert got["from"] == today.isoformat()
    assert got["to"] == (today + timedelta(days=365)).isoformat()
    assert got["items"] == []


async def test_days_off_window_must_not_run_backwards(client: Client, tenants: Tenants) -> None:
    await client.put("/v1/users/u1", json=user_body(), headers=tenants.a.headers)
    got = await client.get(
        "/v1/users/u1/days-off?from=2017-06-30&to=2017-06-01", headers=tenants.a.headers
    )
    assert got.status == 422
    assert [d["loc"] for d in (await got.json())["error"]["details"]] == [["query", "to"]]


async def _insert_users(db: Database, tenant_id: str, count: int) -> list[str]:
    ids = [f"user-{i:04d}" for i in range(count)]
    async with db.session() as session, session.begin():
        session.add_all(User(tenant_id=tenant_id, id=i, timezone="UTC") for i in ids)
    return ids


async def test_list_pages_through_every_user_once(
    client: Client, tenants: Tenants, db: Database
) -> None:
    ids = await _insert_users(db, tenants.a.id, 5)
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        body = await (await client.get("/v1/users" + query, headers=tenants.a.headers)).json()
        seen += [u["id"] for u in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ids and pages == 3


async def test_list_limit_is_clamped_and_csv_has_every_row(
    client: Client, tenants: Tenants, db: Database
) -> None:
    ids = await _insert_users(db, tenants.a.id, 501)
    big = await (await client.get("/v1/users?limit=100000", headers=tenants.a.headers)).json()
    assert len(big["items"]) == 500 and big["next_cursor"] is not None
    default = await (await client.get("/v1/users", headers=tenants.a.headers)).json()
    assert len(default["items"]) == 50
    got = await client.get("/v1/users?format=csv&limit=3", headers=tenants.a.headers)
    assert got.status == 200 and got.content_type == "text/csv"
    rows = list(csv.reader(io.StringIO(await got.text())))
    assert rows[0] == [
        "id",
        "name",
        "email",
        "mobile",
        "timezone",
        "country",
        "subdivision",
        "provider",
    ]
    assert [r[0] for r in rows[1:]] == ids


@pytest.mark.parametrize("query", ["limit=0", "limit=-3", "limit=ten", "cursor=%21%21not-ours"])
async def test_list_refuses_a_bad_limit_or_cursor(
    client: Client, tenants: Tenants, query: str
) -> None:
    got = await client.get("/v1/users?" + query, headers=tenants.a.headers)
    assert got.status == 422
    name = query.split("=")[0]
    assert [d["loc"] for d in (await got.json())["error"]["details"]] == [["query", name]]
