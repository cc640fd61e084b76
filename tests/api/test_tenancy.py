"""Keys and tenants: 401 without a good key, 403 for a tenant on operator paths, another
tenant's ids answer 404, and ``Idempotency-Key`` replays per tenant."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import BaseModel, Field
from sqlalchemy import select

from syncsvc.api._framework import Ctx, Routes
from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.errors import ErrorDetail, ValidationError
from syncsvc.service.idempotency import ANSWER_MAX_CHARS, ANSWER_TTL
from syncsvc.store.db import Database
from syncsvc.store.models import IdempotencyKey
from syncsvc.store.types import utcnow
from tests.api.conftest import OPERATOR_KEY, Tenants
from tests.api.test_users import user_body

Client = TestClient[web.Request, web.Application]


async def test_another_tenants_user_is_404_and_stays_untouched(
    client: Client, tenants: Tenants
) -> None:
    await client.put("/v1/users/u1", json=user_body(name="A's user"), headers=tenants.a.headers)
    for path in ("/v1/users/u1", "/v1/users/u1/days-off"):
        got = await client.get(path, headers=tenants.b.headers)
        assert got.status == 404, path
        assert (await got.json())["error"]["code"] == "not_found"
    listed = await (await client.get("/v1/users", headers=tenants.b.headers)).json()
    assert listed == {"items": [], "next_cursor": None}

    # B's PUT of the same id makes B's own user (on B's own mailbox: A's is A's); A's is
    # unchanged.
    b_calendar = {"provider": "graph", "mailbox": "ck@b.example"}
    put = await client.put(
        "/v1/users/u1",
        json=user_body(name="B's user", calendar=b_calendar),
        headers=tenants.b.headers,
    )
    assert put.status == 200
    a_user = await (await client.get("/v1/users/u1", headers=tenants.a.headers)).json()
    b_user = await (await client.get("/v1/users/u1", headers=tenants.b.headers)).json()
    assert (a_user["name"], b_user["name"]) == ("A's user", "B's user")


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer sk_not-a-real-key", "Bearer ", "Basic dXNlcjpwYXNz", "sk_no-scheme"],
)
async def test_no_or_a_wrong_key_is_401(
    client: Client, tenants: Tenants, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("GET", "/v1/users/u1"), ("PUT", "/v1/users/u1"), ("GET", "/v1/nope")):
        got = await client.request(method, path, headers=headers, json=user_body())
        assert got.status == 401, (method, path)
        assert (await got.json())["error"]["code"] == "unauthorized"


async def test_public_paths_need_no_key(client: Client) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):
        assert (await client.get(path)).status == 200, path


async def test_operator_paths_want_the_operator_key(client: Client, tenants: Tenants) -> None:
    path = "/v1/ops/queue"
    assert (await client.get(path)).status == 401
    assert (await client.get(path, headers={"Authorization": "Bearer wrong"})).status == 401
    as_tenant = await client.get(path, headers=tenants.a.headers)
    assert as_tenant.status == 403
    assert (await as_tenant.json())["error"]["code"] == "forbidden"
    as_operator = await client.get(path, headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
    assert as_operator.status not in (401, 403)
    # The operator key is not a tenant key.
    users = await client.get("/v1/users", headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
    assert users.status == 401


# --- Idempotency-Key, on a POST endpoint made for this test. ---


class CountIn(BaseModel):
    label: str = Field(max_length=50)


class CountOut(BaseModel):
    label: str
    call: int


def counting_app(settings: Settings, db: Database, calls: list[str]) -> web.Application:
    routes = Routes(tag="test")

    @routes.endpoint(
        "POST",
        "/v1/counts",
        body=CountIn,
        response=CountOut,
        status=201,
        summary="Counts its calls",
    )
    async def post_count(ctx: Ctx, body: CountIn) -> CountOut:
        if body.label == "refuse":
            raise ValidationError("refused", [ErrorDetail(("body", "label"), "refused")])
        calls.append(body.label)
        if body.label == "big":  # an answer too large to keep for replays
            return CountOut(label="b" * (ANSWER_MAX_CHARS + 1), call=len(calls))
        return CountOut(label=body.label, call=len(calls))

    app = build_app(settings, db)
    for ep in routes.endpoints:
        app.router.add_route(ep.method, ep.path, ep.handle)
    return app


async def _post(
    client: Client, headers: dict[str, str], key: str | None, body: Any
) -> tuple[int, Any]:
    extra = {} if key is None else {"Idempotency-Key": key}
    got = await client.post("/v1/counts", json=body, headers={**headers, **extra})
    return got.status, await got.json()


async def test_idempotency_key_replays_the_first_answer(
    settings: Settings, db: Database, tenants: Tenants
) -> None:
    calls: list[str] = []
    async with TestClient(TestServer(counting_app(settings, db, calls))) as client:
        a = tenants.a.headers
        first = await _post(client, a, "k1", {"label": "x"})
        assert first == (201, {"label": "x", "call": 1})
        assert await _post(client, a, "k1", {"label": "x"}) == first
        assert calls == ["x"]

        conflict = await _post(client, a, "k1", {"label": "y"})
        assert conflict[0] == 409 and conflict[1]["error"]["code"] == "conflict"
        assert calls == ["x"]

        # Without a key, or with another key, the request runs again.
        assert await _post(client, a, None, {"label": "x"}) == (201, {"label": "x", "call": 2})
        assert await _post(client, a, "k2", {"label": "x"}) == (201, {"label": "x", "call": 3})

        # Keys are per tenant: B's "k1" is B's own.
        assert await _post(client, tenants.b.headers, "k1", {"label": "z"}) == (
            201,
            {"label": "z", "call": 4},
        )


async def test_failed_answers_are_not_kept(
    settings: Settings, db: Database, tenants: Tenants
) -> None:
    calls: list[str] = []
    async with TestClient(TestServer(counting_app(settings, db, calls))) as client:
        a = tenants.a.headers
        assert (await _post(client, a, "k", {"label": "refuse"}))[0] == 422
        assert (await _post(client, a, "k", {"label": 7}))[0] == 422
        # The same key may be used again once the request is fixed.
        assert await _post(client, a, "k", {"label": "ok"}) == (201, {"label": "ok", "call": 1})
        assert await _post(client, a, "k", {"label": "ok"}) == (201, {"label": "ok", "call": 1})
        bad_key = await _post(client, a, "x" * 256, {"label": "ok"})
        assert bad_key[0] == 422
        assert bad_key[1]["error"]["details"][0]["loc"] == ["header", "Idempotency-Key"]
    async with db.session() as session:
        stored = (await session.scalars(select(IdempotencyKey))).all()
    assert [(r.tenant_id, r.key, r.status) for r in stored] == [(tenants.a.id, "k", 201)]


async def test_kept_answers_expire_after_a_day_and_large_ones_keep_only_their_status(
    settings: Settings, db: Database, tenants: Tenants
) -> None:
    calls: list[str] = []
    async with TestClient(TestServer(counting_app(settings, db, calls))) as client:
        a = tenants.a.headers
        assert await _post(client, a, "day", {"label": "x"}) == (201, {"label": "x", "call": 1})
        async with db.session() as session, session.begin():
            row = await session.get(IdempotencyKey, (tenants.a.id, "day"))
            assert row is not None
            row.created_at = utcnow() - ANSWER_TTL - timedelta(minutes=1)
        # A day on, the key is forgotten: the same request runs afresh, and is kept again.
        assert await _post(client, a, "day", {"label": "x"}) == (201, {"label": "x", "call": 2})
        assert await _post(client, a, "day", {"label": "x"}) == (201, {"label": "x", "call": 2})

        status, first = await _post(client, a, "big", {"label": "big"})
        assert status == 201 and len(first["label"]) > ANSWER_MAX_CHARS
        status, replay = await _post(client, a, "big", {"label": "big"})
        assert status == 201 and replay["replayed"] is True, replay
        assert calls == ["x", "x", "big"]  # done once
    async with db.session() as session:
        sizes = [
            len(r.response.get("body") or "") for r in await session.scalars(select(IdempotencyKey))
        ]
    assert max(sizes) < 1000


async def test_a_plan_preview_keeps_no_idempotency_record(
    client: Client, db: Database, tenants: Tenants
) -> None:
    body = {
        "targetgroup_name": "Customers",
        "targets": [{"id": f"t{i}", "name": f"Customer {i}"} for i in range(50)],
        "template": {"kind": "call", "subject": "Call"},
        "schedule": {"start_date": "2027-06-07", "duration": "00:30"},
        "assignment": {"mode": "users", "users": ["u1"]},
    }
    headers = {**tenants.a.headers, "Idempotency-Key": "preview"}
    assert (
        await client.put("/v1/users/u1", json=user_body(), headers=tenants.a.headers)
    ).status == 200
    for _ in range(3):
        answer = await client.post("/v1/plans", json=body, headers=headers)
        assert answer.status == 200, await answer.text()
    async with db.session() as session:
        assert (await session.scalars(select(IdempotencyKey))).all() == []
