"""Two syncsvc tenants on two Google Workspace domains (issue 10): one on the install's service
account, one with its own key; each reaches only calendars in its own domains, with its own
service account, and a domain serves one tenant."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.runtime import run_workers
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from syncsvc.store.models import TenantConnection
from tests.fakes.google import FakeGoogle, running_fake

INSTALL_SA = "syncsvc@install.iam.gserviceaccount.com"
BETA_SA = "calendar-sync@beta-project.iam.gserviceaccount.com"
WAIT_S = 60.0


@dataclass
class Stack:
    http: aiohttp.ClientSession
    fake: FakeGoogle
    db: Database
    keys: dict[str, str]
    beta_key: dict[str, str]

    async def call(self, tenant: str, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        async with self.http.request(method, path, json=body, headers=headers) as answer:
            return answer.status, await answer.json(content_type=None)


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_fake() as fake:
        install_key = fake.new_service_account(
            INSTALL_SA, delegated_domains=frozenset({"alpha.example", "beta.example"})
        )
        beta_key = fake.new_service_account(BETA_SA, delegated_domains=frozenset({"beta.example"}))
        key_file = tmp_path / "sa.json"
        key_file.write_text(json.dumps(install_key), encoding="utf-8")
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'sync.db'}",
            secret_key="k" * 40,
            google_api_url=fake.api_url,
            google_token_url=fake.token_url,
            google_service_account_file=str(key_file),
        )
        db = Database(settings.database_url)
        await db.migrate()
        keys = {name: (await create_tenant(db, name))[1] for name in ("alpha", "beta")}
        stop = asyncio.Event()
        server = TestServer(build_app(settings, db), host="127.0.0.1")
        async with server, aiohttp.ClientSession(base_url=str(server.make_url(""))) as http:
            workers = asyncio.create_task(run_workers(settings, db, stop))
            try:
                yield Stack(http, fake, db, keys, beta_key)
            finally:
                stop.set()
                await workers
        await db.aclose()


def _user(calendar: str) -> dict[str, Any]:
    return {
        "name": calendar,
        "timezone": "Europe/Copenhagen",
        "country": "DK",
        "calendar": {"provider": "google", "calendar_id": calendar},
    }


def _batch(user: str, subject: str) -> dict[str, Any]:
    return {
        "targetgroup_name": "Customers",
        "targets": [{"id": f"t{i}", "name": f"Customer {i}"} for i in range(3)],
        "template": {"kind": "meeting", "subject": subject},
        "schedule": {"start_date": "2027-06-07", "duration": "01:00", "interval": "00:15"},
        "assignment": {"mode": "users", "users": [user]},
    }


@pytest.mark.timeout(120)
async def test_each_tenant_reaches_its_own_domain_with_its_own_service_account(
    stack: Stack,
) -> None:
    status, alpha = await stack.call(
        "alpha", "PUT", "/v1/tenant/connections/google", {"domains": ["@Alpha.Example"]}
    )
    assert status == 200, alpha
    assert (alpha["state"], alpha["domains"], alpha["service_account"]) == (
        "connected",
        ["alpha.example"],
        None,
    )
    body = {"domains": ["beta.example"], "service_account": stack.beta_key}
    status, beta = await stack.call("beta", "PUT", "/v1/tenant/connections/google", body)
    assert status == 200, beta
    assert beta["service_account"] == BETA_SA and "private_key" not in json.dumps(beta)
    async with stack.db.session() as s:
        stored = await s.get(TenantConnection, (await _tenant_id(stack, "beta"), "google"))
    assert stored is not None and stored.secret and b"PRIVATE KEY" not in stored.secret

    # A domain serves one tenant; a key must be a service-account key.
    status, body = await stack.call(
        "beta", "PUT", "/v1/tenant/connections/google", {"domains": ["alpha.example"]}
    )
    assert status == 409 and "alpha.example" in body["error"]["message"], body
    status, body = await stack.call(
        "beta",
        "PUT",
        "/v1/tenant/connections/google",
        {"domains": ["beta.example"], "service_account": {"type": "authorized_user"}},
    )
    assert status == 422 and body["error"]["details"][0]["loc"] == ["body", "service_account"]
    _, listed = await stack.call("beta", "GET", "/v1/tenant/connections")
    assert [(c["domains"], c["service_account"]) for c in listed["items"]] == [
        (["beta.example"], BETA_SA)
    ]  # the refused changes changed nothing

    status, body = await stack.call("beta", "PUT", "/v1/users/x", _user("anna@alpha.example"))
    assert status == 422 and "anna@alpha.example" in body["error"]["message"], body
    for tenant, user, calendar in (
        ("alpha", "anna", "anna@alpha.example"),
        ("beta", "bo", "bo@beta.example"),
    ):
        status, body = await stack.call(tenant, "PUT", f"/v1/users/{user}", _user(calendar))
        assert status == 200, body
        status, body = await stack.call(tenant, "POST", "/v1/batches", _batch(user, tenant))
        assert status == 201, body
        await _synced(stack, tenant, body["id"])

    assert sorted(e["summary"] for e in stack.fake.events("anna@alpha.example")) == ["alpha"] * 3
    assert sorted(e["summary"] for e in stack.fake.events("bo@beta.example")) == ["beta"] * 3
    clients = {(g.subject, g.client) for g in stack.fake.token_grants}
    assert clients == {("anna@alpha.example", INSTALL_SA), ("bo@beta.example", BETA_SA)}


async def _tenant_id(stack: Stack, tenant: str) -> str:
    _, body = await stack.call(tenant, "GET", "/v1/tenant")
    return str(body["id"])


async def _synced(stack: Stack, tenant: str, batch: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        status, body = await stack.call(tenant, "GET", f"/v1/batches/{batch}")
        assert status == 200, body
        if body["state"] == "synced":
            assert body["sync"]["synced"] == 3, body
            return
        assert not body["sync"]["failed"] and time.monotonic() < deadline, body
        await asyncio.sleep(0.1)
