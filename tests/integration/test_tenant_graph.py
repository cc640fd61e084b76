"""Two syncsvc tenants on two Microsoft 365 organisations at once (issue 10).

Each tenant's administrator consents to the one multi-tenant app in their own Entra tenant
(the fake's admin-consent page, driven over HTTP and clicked through in Chromium); each batch
then lands in its own tenant's mailboxes with app tokens of its own directory (the fake
answers 403 to a token of another directory), and no tenant can register a mailbox outside
its verified domains.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import async_playwright, expect
from standardwebhooks import Webhook

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.runtime import run_workers
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from tests.fakes.graph import FakeGraph, running_fake_graph
from tests.servers.chromium import ARGS as CHROMIUM_ARGS
from tests.servers.chromium import EXECUTABLE as CHROMIUM
from tests.servers.postgres import free_port

ALPHA = "aaaaaaaa-0000-4000-8000-00000000000a"
BETA = "bbbbbbbb-0000-4000-8000-00000000000b"
WAIT_S = 60.0
OPERATOR_KEY = "op-" + "t" * 40


@dataclass
class Stack:
    http: aiohttp.ClientSession
    base: str
    fake: FakeGraph
    db: Database
    keys: dict[str, str]

    async def call(self, tenant: str, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        async with self.http.request(
            method, self.base + path, json=body, headers=headers
        ) as answer:
            return answer.status, await answer.json(content_type=None)

    async def consent(self, tenant: str, account: str, action: str = "accept") -> tuple[int, str]:
        """The administrator's browser: our link, Microsoft's page, its form, our page."""
        status, link = await self.call(tenant, "POST", "/v1/tenant/connections/graph")
        assert status == 200, link
        async with self.http.get(link["consent_url"]) as page:
            assert page.status == 200, await page.text()
            html = await page.text()
        assert account in html and "Accept" in html and "Cancel" in html
        form = dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', html))
        form.update(account=account, action=action)
        async with self.http.post(
            link["consent_url"].split("?")[0], data=form, allow_redirects=False
        ) as decided:
            assert decided.status == 302
            back = decided.headers["Location"]
        assert back.startswith(self.base + "/oauth/graph/admin-consent?")
        async with self.http.get(back) as ours:
            return ours.status, await ours.text()


@pytest_asyncio.fixture
async def stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> AsyncIterator[Stack]:
    async with running_fake_graph() as fake:
        assert fake.ca_bundle is not None
        monkeypatch.setenv("SSL_CERT_FILE", str(fake.ca_bundle))
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(fake.ca_bundle))
        fake.add_directory(ALPHA, "Alpha A/S", ["alpha.example"])
        fake.add_directory(BETA, "Beta AB", ["beta.example", "beta-sales.example"])
        for address, directory in (
            ("anna@alpha.example", ALPHA),
            ("bo@beta.example", BETA),
            ("md@beta-sales.example", BETA),
        ):
            fake.add_mailbox(address, "Europe/Copenhagen", directory=directory)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        fake.redirect_uris.add(base + "/oauth/graph/admin-consent")
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'sync.db'}",
            secret_key="k" * 40,
            public_base_url=base,
            graph_api_url=fake.graph_url,
            graph_authority_url=fake.authority_url,
            graph_client_id=fake.client_id,
            graph_client_secret=fake.client_secret,
            operator_key=OPERATOR_KEY,
        )
        db = Database(settings.database_url)
        await db.migrate()
        keys = {name: (await create_tenant(db, name))[1] for name in ("alpha", "beta")}
        stop = asyncio.Event()
        async with (
            TestServer(build_app(settings, db), host="127.0.0.1", port=port),
            aiohttp.ClientSession(  # the administrator's browser trusts the fake's certificate
                connector=aiohttp.TCPConnector(
                    ssl=ssl.create_default_context(cafile=fake.ca_bundle)
                )
            ) as http,
        ):
            workers = asyncio.create_task(run_workers(settings, db, stop))
            try:
                yield Stack(http, base, fake, db, keys)
            finally:
                stop.set()
                await workers
        await db.aclose()


def _user(mailbox: str) -> dict[str, Any]:
    return {
        "name": mailbox,
        "timezone": "Europe/Copenhagen",
        "country": "DK",
        "calendar": {"provider": "graph", "mailbox": mailbox},
    }


def _batch(user: str, subject: str) -> dict[str, Any]:
    return {
        "targetgroup_name": "Customers",
        "targets": [{"id": f"t{i}", "name": f"Customer {i}"} for i in range(3)],
        "template": {"kind": "meeting", "subject": subject},
        "schedule": {"start_date": "2027-06-07", "duration": "01:00", "interval": "00:15"},
        "assignment": {"mode": "users", "users": [user]},
    }


async def _synced(stack: Stack, tenant: str, batch: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        status, body = await stack.call(tenant, "GET", f"/v1/batches/{batch}")
        assert status == 200, body
        if body["state"] == "synced" or body["sync"]["failed"]:
            return dict(body)
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)


@pytest.mark.timeout(120)
async def test_two_tenants_on_two_organisations_each_reach_only_their_own_mailboxes(
    stack: Stack,
) -> None:
    status, page = await stack.consent("alpha", "admin@alpha.example")
    assert status == 200 and 'data-state="connected"' in page, page
    status, page = await stack.consent("beta", "admin@beta.example")
    assert status == 200 and 'data-state="connected"' in page, page
    status, listed = await stack.call("beta", "GET", "/v1/tenant/connections")
    assert status == 200
    assert [(c["provider"], c["state"], c["directory"], c["domains"]) for c in listed["items"]] == [
        ("graph", "connected", BETA, ["beta-sales.example", "beta.example"])
    ]

    # Mailboxes outside a tenant's verified domains are refused, whoever owns them.
    status, body = await stack.call("beta", "PUT", "/v1/users/x", _user("anna@alpha.example"))
    assert status == 422 and "anna@alpha.example" in body["error"]["message"], body
    status, body = await stack.call("alpha", "PUT", "/v1/users/x", _user("md@beta-sales.example"))
    assert status == 422, body
    for tenant, user, mailbox in (
        ("alpha", "anna", "anna@alpha.example"),
        ("beta", "bo", "bo@beta.example"),
    ):
        status, body = await stack.call(tenant, "PUT", f"/v1/users/{user}", _user(mailbox))
        assert status == 200, body

    batches = {}
    for tenant, user in (("alpha", "anna"), ("beta", "bo")):
        status, body = await stack.call(tenant, "POST", "/v1/batches", _batch(user, tenant))
        assert status == 201, body
        batches[tenant] = body["id"]
    for tenant, batch in batches.items():
        synced = await _synced(stack, tenant, batch)
        assert synced["state"] == "synced" and synced["sync"]["synced"] == 3, synced
    # Each mailbox has its own tenant's three events and nothing else; the fake answers 403
    # to a token of another directory, so a crossed token could not have written them.
    assert (
        sorted(e.subject for e in stack.fake.mailbox_events("anna@alpha.example")) == ["alpha"] * 3
    )
    assert sorted(e.subject for e in stack.fake.mailbox_events("bo@beta.example")) == ["beta"] * 3
    assert stack.fake.mailbox_events("md@beta-sales.example") == []


async def test_cancel_a_replayed_state_and_a_taken_directory_leave_clear_states(
    stack: Stack,
) -> None:
    status, page = await stack.consent("alpha", "admin@alpha.example", action="cancel")
    assert status == 200 and 'data-state="refused"' in page, page
    status, listed = await stack.call("alpha", "GET", "/v1/tenant/connections")
    (graph,) = listed["items"]
    assert graph["state"] == "refused" and graph["directory"] is None
    assert "declined" in graph["error"]

    # A state used once, or never made, changes nothing.
    status, link = await stack.call("alpha", "POST", "/v1/tenant/connections/graph")
    state = parse_qs(urlsplit(link["consent_url"]).query)["state"][0]
    back = f"{stack.base}/oauth/graph/admin-consent?admin_consent=True&tenant={ALPHA}&state="
    async with stack.http.get(back + state) as first:
        assert first.status == 200  # the fake's directory is not consented: token refused
        assert 'data-state="refused"' in await first.text()
    for forged in (state, "made-up-state"):
        async with stack.http.get(back + forged) as again:
            assert again.status == 403
            assert "unknown, already used or expired" in (await again.json())["error"]["message"]

    # One organisation serves one tenant: beta cannot take alpha's directory.
    status, page = await stack.consent("alpha", "admin@alpha.example")
    assert 'data-state="connected"' in page, page
    status, page = await stack.consent("beta", "admin@alpha.example")
    assert 'data-state="refused"' in page and "another tenant" in page, page
    status, listed = await stack.call("beta", "GET", "/v1/tenant/connections")
    assert [(c["state"], c["directory"]) for c in listed["items"]] == [("refused", None)]


@pytest.mark.timeout(120)
async def test_administrators_click_through_the_consent_page_in_chromium(stack: Stack) -> None:
    """Accept connects beta; Cancel leaves alpha refused, with Microsoft's reason shown."""
    links = {}
    for tenant in ("alpha", "beta"):
        status, link = await stack.call(tenant, "POST", "/v1/tenant/connections/graph")
        assert status == 200, link
        links[tenant] = link["consent_url"]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # The fake's certificate is self-signed; the real page is on login.microsoftonline.com.
            context = await browser.new_context(ignore_https_errors=True)
            page = await context.new_page()
            await page.goto(links["beta"])
            await expect(page.get_by_role("heading", name="Permissions requested")).to_be_visible()
            await page.get_by_label("admin@beta.example").check()
            await page.get_by_role("button", name="Accept").click()
            outcome = page.locator("#outcome")
            await expect(outcome).to_have_attribute("data-state", "connected")
            await expect(outcome).to_contain_text("beta-sales.example, beta.example")

            await page.goto(links["alpha"])
            await page.get_by_label("admin@alpha.example").check()
            await page.get_by_role("button", name="Cancel").click()
            await expect(outcome).to_have_attribute("data-state", "refused")
            await expect(outcome).to_contain_text("declined to consent")
        finally:
            await browser.close()
    states = {}
    for tenant in ("alpha", "beta"):
        _, listed = await stack.call(tenant, "GET", "/v1/tenant/connections")
        states[tenant] = [(c["state"], c["directory"]) for c in listed["items"]]
    assert states == {"alpha": [("refused", None)], "beta": [("connected", BETA)]}


@pytest.mark.timeout(120)
async def test_a_withdrawn_consent_waits_and_a_new_one_finishes_the_batch_once(
    stack: Stack,
) -> None:
    """The administrator removes the app mid-flight: nothing is given up, the connection, the
    dashboard and one signed CRM callback say so, and consenting again finishes the work."""
    received: list[tuple[dict[str, str], bytes]] = []

    async def crm(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    crm_app = web.Application()
    crm_app.router.add_post("/hook", crm)
    async with TestServer(crm_app, host="127.0.0.1") as crm_server:
        _, secret = await stack.call("alpha", "POST", "/v1/tenant/signing-secret/rotate")
        hook = {"callback_url": str(crm_server.make_url("/hook"))}
        assert (await stack.call("alpha", "PATCH", "/v1/tenant", hook))[0] == 200
        status, page = await stack.consent("alpha", "admin@alpha.example")
        assert 'data-state="connected"' in page, page
        status, body = await stack.call(
            "alpha", "PUT", "/v1/users/anna", _user("anna@alpha.example")
        )
        assert status == 200, body
        _, first = await stack.call("alpha", "POST", "/v1/batches", _batch("anna", "first"))
        assert (await _synced(stack, "alpha", first["id"]))["state"] == "synced"

        stack.fake.revoke_consent(ALPHA)
        _, second = await stack.call("alpha", "POST", "/v1/batches", _batch("anna", "second"))
        deadline = time.monotonic() + WAIT_S
        while True:
            _, listed = await stack.call("alpha", "GET", "/v1/tenant/connections")
            if listed["items"][0]["state"] == "reconnect_needed" and received:
                break
            assert time.monotonic() < deadline, listed
            await asyncio.sleep(0.1)
        assert "AADSTS700016" in listed["items"][0]["error"]
        _, waiting = await stack.call("alpha", "GET", f"/v1/batches/{second['id']}")
        assert waiting["sync"]["failed"] == 0 and waiting["sync"]["pending"] == 3, waiting
        async with stack.http.get(
            stack.base + "/dashboard/data.json", headers={"Authorization": f"Bearer {OPERATOR_KEY}"}
        ) as answer:
            health = {h["mailbox"]: h["status"] for h in (await answer.json())["health"]}
        assert health["graph:anna@alpha.example"] == "reconnect_needed"

        status, page = await stack.consent("alpha", "admin@alpha.example")
        assert 'data-state="connected"' in page, page
        synced = await _synced(stack, "alpha", second["id"])
        assert synced["state"] == "synced" and synced["sync"]["synced"] == 3, synced
        subjects = sorted(e.subject for e in stack.fake.mailbox_events("anna@alpha.example"))
        assert subjects == ["first"] * 3 + ["second"] * 3
        callbacks = [
            Webhook(secret["signing_secret"]).verify(body, headers) for headers, body in received
        ]
        assert [c["type"] for c in callbacks] == ["connection.reconnect_needed"]
        assert callbacks[0]["tenant_id"] == await _tenant_id(stack, "alpha")


async def _tenant_id(stack: Stack, tenant: str) -> str:
    _, body = await stack.call(tenant, "GET", "/v1/tenant")
    return str(body["id"])
