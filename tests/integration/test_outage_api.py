"""While PostgreSQL is down, every route that needs the database answers ``503`` with
``Retry-After`` and ``database_unavailable`` (webhooks included: Graph and Google retry on
5xx), logs one line for the outage instead of a traceback per request, and the API serves
again as soon as the server is back, on the same pool.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from tests.servers.postgres import PostgresServer

OPERATOR_KEY = "op-" + "k" * 40
SECRET_KEY = "outage-secret-key-" + "s" * 32
#: Routes that never touch the database: they answer as usual during an outage.
NO_DATABASE = {
    ("GET", "/healthz"),
    ("GET", "/openapi.json"),
    ("GET", "/metrics"),  # says the queue figures are unavailable, serves the rest
    ("GET", "/dashboard/login"),
    ("GET", "/dashboard/app.js"),
    ("GET", "/dashboard/login.js"),
    ("GET", "/dashboard/style.css"),
    ("POST", "/dashboard/login"),  # checks the operator key, which lives in the settings
    ("POST", "/dashboard/logout"),
}
#: Bodies that get past validation to the database, for the routes whose handler validates
#: before it looks anything up (tenant routes reach the database in the auth step already).
GRAPH_NOTIFICATION = {"value": [{"subscriptionId": "sub-1", "clientState": "c", "changeType": "x"}]}
GOOGLE_HEADERS = {
    "X-Goog-Channel-ID": "ch-1",
    "X-Goog-Channel-Token": "t",
    "X-Goog-Resource-ID": "r-1",
    "X-Goog-Resource-State": "exists",
    "X-Goog-Message-Number": "2",
}


@pytest.fixture
async def served(own_postgres: PostgresServer) -> AsyncIterator[tuple[TestClient[Any, Any], str]]:
    url = await own_postgres.create_database()
    settings = Settings(database_url=url, secret_key=SECRET_KEY, operator_key=OPERATOR_KEY)
    db = Database(url)
    await db.migrate()
    _, key = await create_tenant(db, "acme")
    client: TestClient[Any, Any] = TestClient(TestServer(build_app(settings, db)))
    await client.start_server()
    try:
        yield client, key
    finally:
        await client.close()
        await db.aclose()


def routes_of(client: TestClient[Any, Any]) -> list[tuple[str, str]]:
    found = set()
    for route in client.app.router.routes():
        resource = route.resource
        if resource is None or route.method == "HEAD":
            continue
        found.add((route.method, resource.canonical))
    return sorted(found)


def request_for(method: str, template: str, key: str) -> dict[str, Any]:
    """A request to ``template`` (path parameters filled in) that reaches the database."""
    path = re.sub(r"\{[^}]+\}", "x1", template.replace("{provider}", "google"))
    if path.startswith("/oauth/"):
        path += "?state=x1"
    operator = path.startswith(("/v1/ops", "/dashboard"))
    headers = {"Authorization": f"Bearer {OPERATOR_KEY if operator else key}"}
    body: Any = {}
    if template.endswith("/retry"):
        body = {"all": True}
    elif template == "/dashboard/login":
        body = {"key": OPERATOR_KEY}
    elif template.endswith("/connect"):
        body = {"provider": "google", "return_url": "https://crm.example/back"}
    elif template.startswith("/webhooks/graph"):
        body = GRAPH_NOTIFICATION
    elif template.startswith("/webhooks/google"):
        headers.update(GOOGLE_HEADERS)
        body = None
    if method in ("GET", "DELETE"):
        body = None
    return {"method": method, "path": path, "headers": headers, "json": body}


async def test_every_route_answers_503_with_retry_after_during_an_outage(
    own_postgres: PostgresServer,
    served: tuple[TestClient[Any, Any], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, key = served
    routes = routes_of(client)
    assert ("POST", "/v1/batches") in routes and ("POST", "/webhooks/graph") in routes
    async with client.get("/v1/users/u1", headers={"Authorization": f"Bearer {key}"}) as ok:
        assert ok.status == 404  # the pool holds live connections before the crash

    own_postgres.crash()
    caplog.clear()
    answers: dict[tuple[str, str], tuple[int, str | None, Any]] = {}
    try:
        for _ in range(2):  # the pool's dead connections first, then refused connections
            for method, template in routes:
                req = request_for(method, template, key)
                async with client.request(
                    req["method"], req["path"], headers=req["headers"], json=req["json"]
                ) as answer:
                    body = await answer.json(content_type=None) if answer.status >= 400 else None
                    answers[(method, template)] = (
                        answer.status,
                        answer.headers.get("Retry-After"),
                        body,
                    )
    finally:
        own_postgres.start()

    wrong = {}
    for route, (status, retry_after, body) in answers.items():
        if route in NO_DATABASE:
            if status >= 500:
                wrong[route] = status
        elif route == ("GET", "/readyz"):
            if status != 503 or retry_after is None:
                wrong[route] = (status, retry_after)
        elif not (
            status == 503
            and retry_after is not None
            and int(retry_after) > 0
            and body["error"]["code"] == "database_unavailable"
        ):
            wrong[route] = (status, retry_after, body)
    assert not wrong, "\n".join(f"{k}: {v}" for k, v in wrong.items())
    async with client.get("/openapi.json") as answer:
        paths = (await answer.json())["paths"]
    undocumented = [
        (method, path)
        for method, path in routes
        if (method, path) not in NO_DATABASE
        and method.lower() in paths.get(path, {})  # the dashboard's pages are not in it
        and "503" not in paths[path][method.lower()]["responses"]
    ]
    assert undocumented == [], "the contract lists 503 for every route that can answer it"
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in records if r.exc_info], "no traceback for an outage"
    assert [r.getMessage().split()[0] for r in records if "db." in r.getMessage()] == [
        "event=db.unavailable"
    ]

    # Back: the same app and pool serve again without a restart.
    async with client.get("/v1/users/u1", headers={"Authorization": f"Bearer {key}"}) as again:
        assert again.status == 404
    async with client.post(
        "/webhooks/graph", json=GRAPH_NOTIFICATION, headers={"Content-Type": "application/json"}
    ) as hook:
        assert hook.status == 403  # an unknown subscription: refused as before the outage
