"""A user connects their own Google calendar (issue 10): our link, Google's account chooser and
consent screen (the fake's), the code + PKCE exchange by google-auth-oauthlib, the grant stored
encrypted, and the user's batch landing in the account they signed in with."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from playwright.async_api import async_playwright, expect

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.runtime import run_workers
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from syncsvc.store.models import User
from tests.fakes.google import FakeGoogle, running_fake
from tests.servers.chromium import ARGS as CHROMIUM_ARGS
from tests.servers.chromium import EXECUTABLE as CHROMIUM
from tests.servers.postgres import free_port

CLIENT_ID, CLIENT_SECRET = "web-client.apps.googleusercontent.example", "web-secret"
WAIT_S = 60.0


@dataclass
class Stack:
    http: aiohttp.ClientSession
    base: str
    crm: str  # the CRM's page the browser returns to
    fake: FakeGoogle
    db: Database
    key: str

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {self.key}"}
        async with self.http.request(
            method, self.base + path, json=body, headers=headers
        ) as answer:
            return answer.status, await answer.json(content_type=None)

    async def connect(self, user: str, account: str, action: str = "allow") -> dict[str, str]:
        """The user's browser through the whole flow; the query the CRM's page gets back."""
        body = {"provider": "google", "return_url": self.crm + "/calendar-connected?from=crm"}
        status, link = await self.call("POST", f"/v1/users/{user}/connect", body)
        assert status == 200, link
        async with self.http.get(link["url"]) as page:
            html = await page.text()
            assert page.status == 200, html
        assert account in html and "Allow" in html
        form = dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', html))
        form.update(account=account, action=action)
        async with self.http.post(
            link["url"].split("?")[0], data=form, allow_redirects=False
        ) as decided:
            callback = decided.headers["Location"]
        assert callback.startswith(self.base + "/oauth/google/callback?")
        async with self.http.get(callback, allow_redirects=False) as ours:
            assert ours.status == 302, await ours.text()
            back = ours.headers["Location"]
        assert back.startswith(self.crm + "/calendar-connected?from=crm&")
        return {k: v[0] for k, v in parse_qs(urlsplit(back).query).items()}


@pytest_asyncio.fixture
async def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    # The fake speaks plain http on 127.0.0.1; oauthlib insists on https unless told.
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    async with running_fake() as fake:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        fake.register_oauth_client(CLIENT_ID, CLIENT_SECRET, (base + "/oauth/google/callback",))
        fake.accounts = ["kim@gmail.example", "bo@gmail.example"]
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'sync.db'}",
            secret_key="k" * 40,
            public_base_url=base,
            google_api_url=fake.api_url,
            google_token_url=fake.token_url,
            google_auth_url=fake.auth_url,
            google_client_id=CLIENT_ID,
            google_client_secret=CLIENT_SECRET,
        )
        db = Database(settings.database_url)
        await db.migrate()
        _, key = await create_tenant(db, "alpha")
        stop = asyncio.Event()
        async with (
            TestServer(build_app(settings, db), host="127.0.0.1", port=port),
            aiohttp.ClientSession() as http,
        ):
            workers = asyncio.create_task(run_workers(settings, db, stop))
            crm = f"http://127.0.0.1:{free_port()}"
            stack = Stack(http, base, crm, fake, db, key)
            try:
                status, body = await stack.call("PATCH", "/v1/tenant", {"return_origins": [crm]})
                assert status == 200 and body["return_origins"] == [crm], body
                for user in ("kim", "bo"):
                    status, body = await stack.call("PUT", f"/v1/users/{user}", _user())
                    assert status == 200, body
                yield stack
            finally:
                stop.set()
                await workers
        await db.aclose()


def _user() -> dict[str, Any]:
    return {"name": "K", "timezone": "Europe/Copenhagen", "calendar": {"provider": "none"}}


async def _synced(stack: Stack, batch: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        status, body = await stack.call("GET", f"/v1/batches/{batch}")
        assert status == 200, body
        if body["state"] == "synced" or body["sync"]["failed"]:
            return dict(body)
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)


@pytest.mark.timeout(120)
async def test_a_user_connects_their_own_google_calendar_and_their_batch_lands_there(
    stack: Stack,
) -> None:
    outcome = await stack.connect("kim", "kim@gmail.example")
    assert outcome == {
        "from": "crm",
        "connect": "connected",
        "user_id": "kim",
        "account": "kim@gmail.example",
    }
    status, user = await stack.call("GET", "/v1/users/kim")
    assert user["calendar"] == {
        "provider": "google",
        "calendar_id": "kim@gmail.example",
        "oauth_configured": True,  # the grant itself is never shown
    }, user
    async with stack.db.session() as s:
        row = await s.get(User, (await _tenant_id(stack), "kim"))
    assert row is not None and row.calendar_secret and b"1//" not in row.calendar_secret

    body = {
        "targetgroup_name": "Customers",
        "targets": [{"id": f"t{i}", "name": f"Customer {i}"} for i in range(3)],
        "template": {"kind": "call", "subject": "Call $account-name$"},
        "schedule": {"start_date": "2027-06-07", "duration": "00:30"},
        "assignment": {"mode": "users", "users": ["kim"]},
    }
    status, batch = await stack.call("POST", "/v1/batches", body)
    assert status == 201, batch
    synced = await _synced(stack, batch["id"])
    assert synced["state"] == "synced" and synced["sync"]["synced"] == 3, synced
    assert len(stack.fake.events("kim@gmail.example")) == 3
    grants = {(g.grant_type, g.client, g.subject) for g in stack.fake.token_grants}
    assert ("refresh_token", CLIENT_ID, "kim@gmail.example") in grants


async def test_cancel_a_foreign_return_url_and_a_replayed_state(stack: Stack) -> None:
    outcome = await stack.connect("bo", "bo@gmail.example", action="cancel")
    assert (outcome["connect"], outcome["error"], outcome["user_id"]) == (
        "refused",
        "access_denied",
        "bo",
    )
    _, user = await stack.call("GET", "/v1/users/bo")
    assert user["calendar"] == {"provider": "none"}

    status, body = await stack.call(
        "POST",
        "/v1/users/bo/connect",
        {"provider": "google", "return_url": "https://evil.example/steal"},
    )
    assert status == 422 and body["error"]["details"][0]["loc"] == ["body", "return_url"], body
    status, body = await stack.call(
        "POST", "/v1/users/nobody/connect", {"provider": "google", "return_url": stack.crm}
    )
    assert status == 404, body

    status, link = await stack.call(
        "POST", "/v1/users/bo/connect", {"provider": "google", "return_url": stack.crm}
    )
    state = parse_qs(urlsplit(link["url"]).query)["state"][0]
    callback = f"{stack.base}/oauth/google/callback?code=4/0made-up&state={state}"
    async with stack.http.get(callback, allow_redirects=False) as first:
        assert first.status == 302  # the made-up code is refused by Google: told, not stored
        assert "connect=failed" in first.headers["Location"]
    async with stack.http.get(callback, allow_redirects=False) as again:
        assert again.status == 403
    _, user = await stack.call("GET", "/v1/users/bo")
    assert user["calendar"] == {"provider": "none"}


@pytest.mark.timeout(120)
async def test_a_user_clicks_through_googles_consent_screen_in_chromium(stack: Stack) -> None:
    status, link = await stack.call(
        "POST",
        "/v1/users/bo/connect",
        {"provider": "google", "return_url": stack.crm + "/done"},
    )
    assert status == 200, link
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            # The CRM's page is not served here: record where the browser is sent instead.
            landed: list[str] = []

            async def crm_page(route: Any) -> None:
                landed.append(route.request.url)
                await route.fulfill(status=200, content_type="text/html", body="<h1>CRM</h1>")

            await page.route(stack.crm + "/**", crm_page)
            await page.goto(link["url"])
            await expect(page.get_by_role("heading", name="Choose an account")).to_be_visible()
            await page.get_by_label("bo@gmail.example").check()
            await page.get_by_role("button", name="Allow").click()
            await expect(page.get_by_role("heading", name="CRM")).to_be_visible()
        finally:
            await browser.close()
    query = parse_qs(urlsplit(landed[-1]).query)
    assert query["connect"] == ["connected"] and query["account"] == ["bo@gmail.example"]
    _, user = await stack.call("GET", "/v1/users/bo")
    assert user["calendar"]["calendar_id"] == "bo@gmail.example"


async def _tenant_id(stack: Stack) -> str:
    _, body = await stack.call("GET", "/v1/tenant")
    return str(body["id"])
