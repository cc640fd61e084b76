"""Every client that calls a tenant-supplied URL goes through the egress policy.

With the allow-list off (an empty ``EgressPolicy``), a loopback listener standing in for the
operator's network is offered as a CalDAV server, a callback URL and a targets URL: the API
refuses to store them, and a URL stored anyway (an older row, a changed allow-list) is never
connected to; the tenant sees a generic reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.errors import Permanent
from syncsvc.providers.base import EventSpec
from syncsvc.providers.egress import REFUSED_FOR_TENANT, EgressPolicy, GuardedConnector
from syncsvc.providers.registry import Connection, ProviderRegistry
from syncsvc.scheduler import TargetsError, fetch_targets
from tests.api.conftest import Tenants
from tests.security.test_egress import Listener, _serve

OFF = EgressPolicy()


@pytest.fixture
async def listener() -> AsyncIterator[tuple[Listener, int]]:
    target = Listener()
    server = await _serve(target)
    yield target, server.port or 0
    await server.close()


@pytest.fixture
async def closed_client(
    settings: Settings, db: object
) -> AsyncIterator[TestClient[aiohttp.web.Request, aiohttp.web.Application]]:
    app = build_app(dataclasses.replace(settings, egress=OFF), db)  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_the_api_refuses_to_store_urls_into_the_operators_network(
    closed_client: TestClient[aiohttp.web.Request, aiohttp.web.Application],
    tenants: Tenants,
    listener: tuple[Listener, int],
) -> None:
    target, port = listener
    headers = tenants.a.headers
    for url in (f"http://127.0.0.1:{port}/u/cal/", f"https://[::1]:{port}/", "https://10.0.0.7/"):
        answer = await closed_client.put(
            "/v1/users/u1",
            headers=headers,
            json={
                "name": "U",
                "timezone": "Europe/Copenhagen",
                "country": "DK",
                "calendar": {"provider": "caldav", "url": url, "username": "u", "password": "p"},
            },
        )
        assert answer.status == 422, await answer.text()
        assert "calendar" in await answer.text()
    answer = await closed_client.patch(
        "/v1/tenant", headers=headers, json={"callback_url": f"http://localhost:{port}/cb"}
    )
    assert answer.status == 422, await answer.text()
    answer = await closed_client.put(
        "/v1/users/u2",
        headers=headers,
        json={
            "name": "U",
            "timezone": "Europe/Copenhagen",
            "country": "DK",
            "calendar": {
                "provider": "caldav",
                "url": "https://u:pw@dav.example.com/u/",
                "username": "u",
                "password": "p",
            },
        },
    )
    assert answer.status == 422  # no credentials in URLs: they would be stored and shown
    assert target.hits == 0


async def test_a_stored_caldav_url_into_loopback_is_never_connected_to(
    listener: tuple[Listener, int],
) -> None:
    target, port = listener
    registry = ProviderRegistry(Settings(egress=OFF))
    provider = registry(
        Connection(
            tenant_id="t1",
            provider="caldav",
            account=f"http://127.0.0.1:{port}/u/cal/",
            timezone="UTC",
            settings={"username": "u"},
            credentials={"password": "secret"},
        )
    )
    start = datetime(2027, 6, 7, 9, tzinfo=UTC)
    spec = EventSpec("k1", "a1", "b1", "Visit", start, start + timedelta(hours=1), "UTC")
    try:
        with pytest.raises(Permanent) as caught:
            await provider.create(spec)
    finally:
        await registry.aclose()
    assert REFUSED_FOR_TENANT in str(caught.value)
    assert "127.0.0.1" not in str(caught.value)  # the tenant is not told what is there
    assert target.hits == 0  # and the Basic credentials went nowhere


async def test_a_targets_url_into_loopback_is_not_fetched(listener: tuple[Listener, int]) -> None:
    target, port = listener
    async with aiohttp.ClientSession(connector=GuardedConnector(OFF)) as http:
        with pytest.raises(TargetsError) as caught:
            await fetch_targets(http, {}, f"http://127.0.0.1:{port}/targets", max_bytes=1000)
    assert REFUSED_FOR_TENANT in str(caught.value)
    assert target.hits == 0
