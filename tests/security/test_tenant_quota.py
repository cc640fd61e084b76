"""One tenant's requests cannot take the API from another (issue 11): a per-tenant request
quota and a cap on heavy requests at once, with 429, Retry-After and the IETF RateLimit
fields; shared by two API apps through a real Redis."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.store.db import Database
from tests.api.conftest import Tenants
from tests.api.test_plans import plan_body, put_users

Client = TestClient[web.Request, web.Application]


@pytest.fixture(params=["memory", "redis"])
def quota_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    redis = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return replace(settings, api_rate=(5, 60), api_heavy_concurrency=1, redis_url=redis)


async def test_a_tenant_over_its_quota_gets_429_and_the_other_tenant_does_not(
    quota_settings: Settings, db: Database, tenants: Tenants
) -> None:
    async with TestClient(TestServer(build_app(quota_settings, db))) as client:
        seen = []
        for _ in range(5):
            answer = await client.get("/v1/users", headers=tenants.a.headers)
            assert answer.status == 200, await answer.text()
            assert answer.headers["RateLimit-Policy"] == '"tenant";q=5;w=60'
            seen.append(answer.headers["RateLimit"])
        assert seen[0].startswith('"tenant";r=4;t=') and seen[-1].startswith('"tenant";r=0;')
        refused = await client.get("/v1/users", headers=tenants.a.headers)
        assert refused.status == 429
        body = await refused.json()
        assert (
            body["error"]["code"] == "rate_limited"
            and "5 requests in 60 s" in (body["error"]["message"])
        )
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.headers["RateLimit"].startswith('"tenant";r=0;')
        # Tenant B has its own quota; unauthenticated edges (health, webhooks) have none.
        assert (await client.get("/v1/users", headers=tenants.b.headers)).status == 200
        assert (await client.get("/healthz")).status == 200


async def test_heavy_requests_beyond_the_tenants_cap_wait_their_turn(
    settings: Settings, db: Database, tenants: Tenants, redis_url: str
) -> None:
    """Two API apps on one Redis: while one commit of tenant A runs, A's second heavy request
    (on the other app) is a 429; B's is not; after the first ends, A may go again."""
    shared = replace(settings, api_heavy_concurrency=1, redis_url=redis_url)
    running, release = asyncio.Event(), asyncio.Event()
    async with (
        TestClient(TestServer(_slow_app(shared, db, running, release))) as one,
        TestClient(TestServer(build_app(shared, db))) as two,
    ):
        await put_users(two, tenants.a)
        await put_users(two, tenants.b)
        body = plan_body(targets=3)
        slow = asyncio.create_task(one.post("/v1/plans", json=body, headers=tenants.a.headers))
        await running.wait()
        refused = await two.post("/v1/plans", json=body, headers=tenants.a.headers)
        assert refused.status == 429, await refused.text()
        assert "1 plans or commits at once" in (await refused.json())["error"]["message"]
        assert refused.headers["Retry-After"] == "5"
        other = await two.post("/v1/plans", json=body, headers=tenants.b.headers)
        assert other.status == 200, await other.text()
        release.set()
        assert (await slow).status == 200
        again = await two.post("/v1/plans", json=body, headers=tenants.a.headers)
        assert again.status == 200, await again.text()


def _slow_app(
    settings: Settings, db: Database, running: asyncio.Event, release: asyncio.Event
) -> web.Application:
    """The real app, whose first plan preview holds until the test lets it go."""
    app = build_app(settings, db)

    @web.middleware
    async def hold(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/v1/plans" and not release.is_set():
            running.set()
            await release.wait()
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(hold)  # innermost: runs inside the quota's heavy lease
    return app
