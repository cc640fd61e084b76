"""Keys and tenants: 401 without a good key, 403 for a tenant on operator paths, another
tenant's ids answer 404, and ``Idempotency-Key`` replays per tenant."""

from __future__ import annotations

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
from syncsvc.store.db import Database
from syncsvc.store.models import IdempotencyKey
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
