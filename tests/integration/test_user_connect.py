"""A user connects their own calendar (issue 10), on Microsoft 365 and on Google: our link, the
provider's account picker and consent page (the fakes'), the code + PKCE exchange by the real
client libraries (MSAL; google-auth-oauthlib), the grant stored encrypted, and the user's
batch landing in the account they signed in with. Then the grant is revoked mid-batch: only
that user's operations wait, the API, the dashboard and one signed CRM callback say so, and
connecting again finishes the batch exactly once.

The Microsoft user's organisation never gave the app admin consent: every event there is
written with the user's own delegated token.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
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
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import User
from tests.fakes.google import FakeGoogle, running_fake
from tests.fakes.graph import FakeGraph, running_fake_graph
from tests.servers.chromium import ARGS as CHROMIUM_ARGS
from tests.servers.chromium import EXECUTABLE as CHROMIUM
from tests.servers.postgres import free_port

CLIENT_ID, CLIENT_SECRET = "web-client.apps.googleusercontent.example", "web-secret"
#: An organisation whose administrator granted the app nothing (no admin consent).
KIMS_ORG = "cccccccc-0000-4000-8000-00000000000c"
WAIT_S = 60.0
OPERATOR_KEY = "op-" + "u" * 40
SECRET_KEY = "k" * 40


@dataclass(frozen=True)
class Provider:
    name: str
    accounts: tuple[str, str]
    accept: str  # the consent page's button
    heading: str  # the account picker's heading
    #: How a plain-text refresh token of this provider starts (it must never be stored so).
    token_prefix: bytes


PROVIDERS = {
    "google": Provider(
        "google", ("kim@gmail.example", "bo@gmail.example"), "Allow", "Choose an account", b"1//"
    ),
    "graph": Provider(
        "graph", ("kim@kimsorg.example", "bo@kimsorg.example"), "Accept", "Pick an account", b"0.A"
    ),
}


@dataclass
class Stack:
    http: aiohttp.ClientSession
    base: str
    crm: str  # the CRM's page the browser returns to
    google: FakeGoogle
    graph: FakeGraph
    db: Database
    key: str

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {self.key}"}
        async with self.http.request(
            method, self.base + path, json=body, headers=headers
        ) as answer:
            return answer.status, await answer.json(content_type=None)

    async def connect(
        self, provider: Provider, user: str, account: str, accept: bool = True
    ) -> dict[str, str]:
        """The user's browser through the whole flow; the query the CRM's page gets back."""
        body = {"provider": provider.name, "return_url": self.crm + "/connected?from=crm"}
        status, link = await self.call("POST", f"/v1/users/{user}/connect", body)
        assert status == 200, link
        async with self.http.get(link["url"]) as page:
            html = await page.text()
            assert page.status == 200, html
        assert account in html and provider.accept in html and "Cancel" in html
        form = dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', html))
        form.update(account=account, action=provider.accept.lower() if accept else "cancel")
        async with self.http.post(
            link["url"].split("?")[0], data=form, allow_redirects=False
        ) as decided:
            callback = decided.headers["Location"]
        assert callback.startswith(f"{self.base}/oauth/{provider.name}/callback?")
        async with self.http.get(callback, allow_redirects=False) as ours:
            assert ours.status == 302, await ours.text()
            back = ours.headers["Location"]
        assert back.startswith(self.crm + "/connected?from=crm&")
        return {k: v[0] for k, v in parse_qs(urlsplit(back).query).items()}

    def events(self, provider: Provider, account: str) -> list[str]:
        """The subjects in the account's calendar (cancelled Google events left out)."""
        if provider.name == "google":
            return sorted(
                str(e["summary"]) for e in self.google.events(account, include_cancelled=False)
            )
        return sorted(e.subject for e in self.graph.mailbox_events(account))

    def revoke(self, provider: Provider, account: str) -> None:
        fake: FakeGoogle | FakeGraph = self.google if provider.name == "google" else self.graph
        fake.revoke_user_grants(account)


@pytest_asyncio.fixture
async def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    # The Google fake speaks plain http on 127.0.0.1; oauthlib insists on https unless told.
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    async with running_fake() as google, running_fake_graph() as graph:
        assert graph.ca_bundle is not None
        monkeypatch.setenv("SSL_CERT_FILE", str(graph.ca_bundle))
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(graph.ca_bundle))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        google.register_oauth_client(CLIENT_ID, CLIENT_SECRET, (base + "/oauth/google/callback",))
        google.accounts = list(PROVIDERS["google"].accounts)
        graph.add_directory(KIMS_ORG, "Kim's Org", ["kimsorg.example"])
        for account in PROVIDERS["graph"].accounts:
            graph.add_mailbox(account, "Europe/Copenhagen", directory=KIMS_ORG)
        graph.accounts = list(PROVIDERS["graph"].accounts)
        graph.redirect_uris.add(base + "/oauth/graph/callback")
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'sync.db'}",
            secret_key=SECRET_KEY,
            public_base_url=base,
            operator_key=OPERATOR_KEY,
            google_api_url=google.api_url,
            google_token_url=google.token_url,
            google_auth_url=google.auth_url,
            google_client_id=CLIENT_ID,
            google_client_secret=CLIENT_SECRET,
            graph_api_url=graph.graph_url,
            graph_authority_url=graph.authority_url,
            graph_client_id=graph.client_id,
            graph_client_secret=graph.client_secret,
        )
        db = Database(settings.database_url)
        await db.migrate()
        _, key = await create_tenant(db, "alpha")
        stop = asyncio.Event()
        async with (
            TestServer(build_app(settings, db), host="127.0.0.1", port=port),
            aiohttp.ClientSession(  # the user's browser trusts the Microsoft fake's certificate
                connector=aiohttp.TCPConnector(
                    ssl=ssl.create_default_context(cafile=graph.ca_bundle)
                )
            ) as http,
        ):
            workers = asyncio.create_task(run_workers(settings, db, stop))
            crm = f"http://127.0.0.1:{free_port()}"
            stack = Stack(http, base, crm, google, graph, db, key)
            try:
                status, body = await stack.call("PATCH", "/v1/tenant", {"return_origins": [crm]})
                assert status == 200 and body["return_origins"] == [crm], body
                for user in ("kim", "bo", "eva"):
                    status, body = await stack.call("PUT", f"/v1/users/{user}", _user())
                    assert status == 200, body
                yield stack
            finally:
                stop.set()
                await workers
        await db.aclose()


def _user() -> dict[str, Any]:
    return {"name": "K", "timezone": "Europe/Copenhagen", "calendar": {"provider": "none"}}


def _batch(user: str, subject: str) -> dict[str, Any]:
    return {
        "targetgroup_name": "Customers",
        "targets": [{"id": f"t{i}", "name": f"Customer {i}"} for i in range(3)],
        "template": {"kind": "meeting", "subject": subject},
        "schedule": {"start_date": "2027-06-07", "duration": "00:30"},
        "assignment": {"mode": "users", "users": [user]},
    }


async def _until(stack: Stack, done: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await done():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


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
@pytest.mark.parametrize("provider", PROVIDERS.values(), ids=PROVIDERS.keys())
async def test_a_user_connects_their_own_calendar_and_their_batch_lands_there(
    stack: Stack, provider: Provider
) -> None:
    account = provider.accounts[0]
    outcome = await stack.connect(provider, "kim", account)
    assert outcome == {"from": "crm", "connect": "connected", "user_id": "kim", "account": account}
    status, user = await stack.call("GET", "/v1/users/kim")
    assert user["connection"] == {"state": "connected", "error": None}, user
    if provider.name == "google":
        assert user["calendar"] == {
            "provider": "google",
            "calendar_id": account,
            "oauth_configured": True,  # the grant itself is never shown
        }, user
    else:
        assert user["calendar"] == {"provider": "graph", "mailbox": account}, user
    async with stack.db.session() as s:
        row = await s.get(User, (await _tenant_id(stack), "kim"))
    assert row is not None and row.calendar_secret
    assert provider.token_prefix not in row.calendar_secret  # stored encrypted

    status, batch = await stack.call("POST", "/v1/batches", _batch("kim", "Call"))
    assert status == 201, batch
    synced = await _synced(stack, batch["id"])
    assert synced["state"] == "synced" and synced["sync"]["synced"] == 3, synced
    assert stack.events(provider, account) == ["Call"] * 3
    if provider.name == "google":
        grants = {(g.grant_type, g.client, g.subject) for g in stack.google.token_grants}
        assert ("refresh_token", CLIENT_ID, account) in grants
    else:  # no admin consent in Kim's organisation: app tokens would have been refused
        assert not stack.graph.directories[KIMS_ORG].consented
        # Entra rotates refresh tokens; the newest is kept, so a restart does not fall back
        # to the one from sign-in (which expires on its own).
        issued = stack.graph.refresh_tokens_of(account)
        async with stack.db.session() as s:
            row = await s.get(User, (await _tenant_id(stack), "kim"))
        assert row is not None and row.calendar_secret
        stored = SecretBox(SECRET_KEY).decrypt(row.calendar_secret)["oauth"]["refresh_token"]
        assert len(issued) >= 2 and stored == issued[-1]


@pytest.mark.parametrize("provider", PROVIDERS.values(), ids=PROVIDERS.keys())
async def test_cancel_a_foreign_return_url_and_a_replayed_state(
    stack: Stack, provider: Provider
) -> None:
    outcome = await stack.connect(provider, "bo", provider.accounts[1], accept=False)
    assert (outcome["connect"], outcome["error"], outcome["user_id"]) == (
        "refused",
        "access_denied",
        "bo",
    )
    _, user = await stack.call("GET", "/v1/users/bo")
    assert user["calendar"] == {"provider": "none"} and user["connection"] is None

    status, body = await stack.call(
        "POST",
        "/v1/users/bo/connect",
        {"provider": provider.name, "return_url": "https://evil.example/steal"},
    )
    assert status == 422 and body["error"]["details"][0]["loc"] == ["body", "return_url"], body
    status, body = await stack.call(
        "POST", "/v1/users/nobody/connect", {"provider": provider.name, "return_url": stack.crm}
    )
    assert status == 404, body

    status, link = await stack.call(
        "POST", "/v1/users/bo/connect", {"provider": provider.name, "return_url": stack.crm}
    )
    state = parse_qs(urlsplit(link["url"]).query)["state"][0]
    callback = f"{stack.base}/oauth/{provider.name}/callback?code=made-up&state={state}"
    async with stack.http.get(callback, allow_redirects=False) as first:
        assert first.status == 302  # the made-up code is refused by the provider: told
        assert "connect=failed" in first.headers["Location"]
    async with stack.http.get(callback, allow_redirects=False) as again:
        assert again.status == 403
    # A state made for one provider is no good at the other's callback.
    _, link = await stack.call(
        "POST", "/v1/users/bo/connect", {"provider": provider.name, "return_url": stack.crm}
    )
    state = parse_qs(urlsplit(link["url"]).query)["state"][0]
    other = "graph" if provider.name == "google" else "google"
    async with stack.http.get(
        f"{stack.base}/oauth/{other}/callback?code=x&state={state}", allow_redirects=False
    ) as crossed:
        assert crossed.status == 403
    _, user = await stack.call("GET", "/v1/users/bo")
    assert user["calendar"] == {"provider": "none"}


@pytest.mark.timeout(120)
async def test_users_click_through_both_consent_pages_in_chromium(stack: Stack) -> None:
    """Bo accepts at Google, Eva at Microsoft; Kim cancels at Microsoft and stays unconnected."""
    plan = [
        ("bo", PROVIDERS["google"], "bo@gmail.example", True),
        ("eva", PROVIDERS["graph"], "bo@kimsorg.example", True),
        ("kim", PROVIDERS["graph"], "kim@kimsorg.example", False),
    ]
    landed: list[str] = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # The Microsoft fake's certificate is self-signed (the real page is on
            # login.microsoftonline.com).
            context = await browser.new_context(ignore_https_errors=True)
            page = await context.new_page()

            async def crm_page(route: Any) -> None:  # the CRM's page is not served here
                landed.append(route.request.url)
                await route.fulfill(status=200, content_type="text/html", body="<h1>CRM</h1>")

            await page.route(stack.crm + "/**", crm_page)
            for user, provider, account, accept in plan:
                body = {"provider": provider.name, "return_url": stack.crm + "/done"}
                status, link = await stack.call("POST", f"/v1/users/{user}/connect", body)
                assert status == 200, link
                await page.goto(link["url"])
                await expect(page.get_by_role("heading", name=provider.heading)).to_be_visible()
                await page.get_by_label(account).check()
                button = provider.accept if accept else "Cancel"
                await page.get_by_role("button", name=button).click()
                await expect(page.get_by_role("heading", name="CRM")).to_be_visible()
        finally:
            await browser.close()
    outcomes = [
        {k: v[0] for k, v in parse_qs(urlsplit(url).query).items() if k != "error"}
        for url in landed
    ]
    assert outcomes == [
        {"connect": "connected", "user_id": "bo", "account": "bo@gmail.example"},
        {"connect": "connected", "user_id": "eva", "account": "bo@kimsorg.example"},
        {"connect": "refused", "user_id": "kim"},
    ]
    calendars = {}
    for user in ("bo", "eva", "kim"):
        _, body = await stack.call("GET", f"/v1/users/{user}")
        calendars[user] = body["calendar"]
    assert calendars == {
        "bo": {"provider": "google", "calendar_id": "bo@gmail.example", "oauth_configured": True},
        "eva": {"provider": "graph", "mailbox": "bo@kimsorg.example"},
        "kim": {"provider": "none"},
    }


@pytest.mark.timeout(180)
@pytest.mark.parametrize("provider", PROVIDERS.values(), ids=PROVIDERS.keys())
async def test_a_revoked_grant_waits_and_connecting_again_finishes_the_batch_once(
    stack: Stack, provider: Provider
) -> None:
    """Kim removes the app from their account mid-flight: nothing is given up, Bo's calendar
    goes on, and Kim connecting again finishes the work exactly once."""
    received: list[tuple[dict[str, str], bytes]] = []

    async def crm(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    crm_app = web.Application()
    crm_app.router.add_post("/hook", crm)
    kim, bo = provider.accounts
    async with TestServer(crm_app, host="127.0.0.1") as crm_server:
        _, secret = await stack.call("POST", "/v1/tenant/signing-secret/rotate")
        hook = {"callback_url": str(crm_server.make_url("/hook"))}
        assert (await stack.call("PATCH", "/v1/tenant", hook))[0] == 200
        for user, account in (("kim", kim), ("bo", bo)):
            assert (await stack.connect(provider, user, account))["connect"] == "connected"
        _, first = await stack.call("POST", "/v1/batches", _batch("kim", "first"))
        assert (await _synced(stack, first["id"]))["state"] == "synced"

        stack.revoke(provider, kim)
        _, second = await stack.call("POST", "/v1/batches", _batch("kim", "second"))
        _, bos = await stack.call("POST", "/v1/batches", _batch("bo", "bo's"))

        async def told() -> bool:
            _, user = await stack.call("GET", "/v1/users/kim")
            return bool(user["connection"]["state"] == "reconnect_needed" and received)

        await _until(stack, told, "kim's connection never said reconnect_needed")
        _, user = await stack.call("GET", "/v1/users/kim")
        assert "invalid_grant" in user["connection"]["error"], user
        _, waiting = await stack.call("GET", f"/v1/batches/{second['id']}")
        assert waiting["sync"]["failed"] == 0 and waiting["sync"]["pending"] == 3, waiting
        assert (await _synced(stack, bos["id"]))["state"] == "synced"  # Bo is not held up
        _, other = await stack.call("GET", "/v1/users/bo")
        assert other["connection"]["state"] == "connected"
        async with stack.http.get(
            stack.base + "/dashboard/data.json", headers={"Authorization": f"Bearer {OPERATOR_KEY}"}
        ) as answer:
            health = {h["mailbox"]: h for h in (await answer.json())["health"]}
        entry = health[f"{provider.name}:{kim}"]
        assert (entry["status"], entry["users"]) == ("reconnect_needed", ["kim"]), health

        assert (await stack.connect(provider, "kim", kim))["connect"] == "connected"
        synced = await _synced(stack, second["id"])
        assert synced["state"] == "synced" and synced["sync"]["synced"] == 3, synced
        assert stack.events(provider, kim) == ["first"] * 3 + ["second"] * 3
        _, user = await stack.call("GET", "/v1/users/kim")
        assert user["connection"] == {"state": "connected", "error": None}
        callbacks = [
            Webhook(secret["signing_secret"]).verify(body, headers) for headers, body in received
        ]
        assert [(c["type"], c["user_id"], c["account"]) for c in callbacks] == [
            ("connection.reconnect_needed", "kim", kim)
        ]
        assert callbacks[0]["tenant_id"] == await _tenant_id(stack)


async def _tenant_id(stack: Stack) -> str:
    _, body = await stack.call("GET", "/v1/tenant")
    return str(body["id"])


@pytest.mark.parametrize("provider", PROVIDERS.values(), ids=PROVIDERS.keys())
async def test_a_code_made_for_another_tenant_stores_nothing(
    stack: Stack, provider: Provider
) -> None:
    """Alpha's user consents; the code is replayed against beta's sign-in (its own state, its
    own PKCE verifier): the provider refuses it, beta's user stays unconnected, and the code
    is spent."""
    _, beta_key = await create_tenant(stack.db, "beta")
    beta = Stack(stack.http, stack.base, stack.crm, stack.google, stack.graph, stack.db, beta_key)
    assert (await beta.call("PATCH", "/v1/tenant", {"return_origins": [stack.crm]}))[0] == 200
    assert (await beta.call("PUT", "/v1/users/mallory", _user()))[0] == 200

    body = {"provider": provider.name, "return_url": stack.crm + "/alpha"}
    _, link = await stack.call("POST", "/v1/users/kim/connect", body)
    async with stack.http.get(link["url"]) as page:
        html = await page.text()
    form = dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', html))
    form.update(account=provider.accounts[0], action=provider.accept.lower())
    async with stack.http.post(
        link["url"].split("?")[0], data=form, allow_redirects=False
    ) as decided:
        code = parse_qs(urlsplit(decided.headers["Location"]).query)["code"][0]

    body = {"provider": provider.name, "return_url": stack.crm + "/beta"}
    _, other = await beta.call("POST", "/v1/users/mallory/connect", body)
    state = parse_qs(urlsplit(other["url"]).query)["state"][0]
    callback = f"{stack.base}/oauth/{provider.name}/callback"
    async with stack.http.get(
        callback, params={"code": code, "state": state}, allow_redirects=False
    ) as crossed:
        assert crossed.status == 302
        back = parse_qs(urlsplit(crossed.headers["Location"]).query)
    assert crossed.headers["Location"].startswith(stack.crm + "/beta?")
    assert back["connect"] == ["failed"] and back["error"][0], back
    _, user = await beta.call("GET", "/v1/users/mallory")
    assert user["calendar"] == {"provider": "none"} and user["connection"] is None
    _, user = await stack.call("GET", "/v1/users/kim")
    assert user["calendar"] == {"provider": "none"}  # alpha's own sign-in did not finish
