"""The operator dashboard in a real browser (Chromium through Playwright) against the real
service: the app and its workers on a 127.0.0.1 port, calendars in Radicale.

An operator is locked out after wrong keys, signs in with the operator key once the wait is
over, watches a throttled batch's progress bar advance, sees a user's refused calendar as a
failure with its error and a Retry button, reconnects the user, retries from the page and sees
the batch finish, then signs out, after which a copy of the session cookie opens nothing. The
page is photographed at 1366×768 into ``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Page, async_playwright, expect

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.dashboard.guard import FAILURE_WINDOW_S, GUARD, MemoryGuard
from syncsvc.limits import RateLimit
from syncsvc.runtime import run_workers
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from tests.security.test_dashboard_sessions import MovableClock
from tests.servers.chromium import ARGS
from tests.servers.chromium import EXECUTABLE as CHROMIUM
from tests.servers.radicale import RADICALE_PASSWORD, RADICALE_USER, new_calendar

OPERATOR_KEY = "op-" + "e" * 40
VIEWPORT = {"width": 1366, "height": 768}
#: 8 creates a second per mailbox: the 48-event batch takes about six seconds.
SLOW_CALDAV = RateLimit(9, 1.0, 1)
BIG_BATCH = 48
FAILING_BATCH = 3
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
WAIT_MS = 30_000
#: Wrong keys one address may try before it waits.
WRONG_KEYS_MAX = 3


@dataclass(frozen=True, slots=True)
class Service:
    url: str
    tenant_headers: dict[str, str]
    clock: MovableClock


@pytest_asyncio.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'dashboard.db'}",
        secret_key="dashboard-test-secret-" + "x" * 20,
        operator_key=OPERATOR_KEY,
        limits={"caldav": SLOW_CALDAV},
    )
    db = Database(settings.database_url)
    await db.migrate()
    _, key = await create_tenant(db, "Nordic Breweries CRM")
    app = build_app(settings, db)
    clock = MovableClock()
    app[GUARD] = MemoryGuard(client_max=WRONG_KEYS_MAX, clock=clock)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    stop = asyncio.Event()
    workers = asyncio.create_task(run_workers(settings, db, stop))
    try:
        yield Service(f"http://{host}:{port}", {"Authorization": f"Bearer {key}"}, clock)
    finally:
        stop.set()
        await workers
        await runner.cleanup()
        await db.aclose()


@pytest_asyncio.fixture
async def refusing_caldav() -> AsyncIterator[str]:
    """A CalDAV address whose server refuses our credentials (401 to everything)."""

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="cal"'})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("/bob/calendar/"))


def _user(name: str, url: str, password: str = RADICALE_PASSWORD) -> dict[str, Any]:
    return {
        "name": name,
        "timezone": "Europe/Copenhagen",
        "calendar": {
            "provider": "caldav",
            "url": url,
            "username": RADICALE_USER,
            "password": password,
        },
    }


def _batch(group: str, user: str, n: int) -> dict[str, Any]:
    return {
        "targetgroup_name": group,
        "targets": [{"id": f"{user}-t{i}", "name": f"Brewery {i}"} for i in range(n)],
        "template": {"kind": "meeting", "subject": "Visit $account-name$"},
        "schedule": {"start_date": "2030-06-03", "duration": "00:30"},
        "assignment": {"mode": "users", "users": [user]},
    }


async def _progress(page: Page, batch_id: str) -> int:
    bar = page.locator(f'[data-batch="{batch_id}"] > [role="progressbar"]')
    return int(await bar.get_attribute("aria-valuenow", timeout=WAIT_MS) or 0)


@pytest.mark.timeout(180)
async def test_operator_watches_a_batch_and_retries_a_failure(
    service: Service, radicale_url: str, refusing_caldav: str
) -> None:
    async with aiohttp.ClientSession(service.url) as http:
        # No open admin page: without the key there is only the sign-in form.
        anonymous = await http.get("/dashboard")
        assert anonymous.status == 200
        text = await anonymous.text()
        assert 'id="login"' in text and "Sync cycles" not in text
        assert (await http.get("/dashboard/data.json")).status == 401
        assert (await http.post("/dashboard/retry", json={"all": True})).status == 401
        tenant = await http.get("/dashboard/data.json", headers=service.tenant_headers)
        assert tenant.status == 401

        async with aiohttp.ClientSession() as radicale:
            calendar_ck = await new_calendar(radicale, radicale_url)
            calendar_bob = await new_calendar(radicale, radicale_url)
        headers = service.tenant_headers
        for user_id, body in (
            ("ck", _user("Christine Kayser", calendar_ck)),
            ("bob", _user("Bob Berg", refusing_caldav, password="wrong")),
        ):
            answer = await http.put(f"/v1/users/{user_id}", json=body, headers=headers)
            assert answer.status == 200, await answer.text()

        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = await browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
            await page.goto(f"{service.url}/dashboard")
            # The tenant's key tried on data.json above was the first wrong operator key.
            for _ in range(WRONG_KEYS_MAX - 1):
                await page.fill("#key", "not-the-key")
                await page.click("button[type=submit]")
                await expect(page.locator("#login-error")).to_have_text(
                    "That is not the operator key."
                )
            await page.fill("#key", OPERATOR_KEY)
            await page.click("button[type=submit]")
            await expect(page.locator("#login-error")).to_have_text(
                f"Too many wrong keys: try again in {int(FAILURE_WINDOW_S)} seconds."
            )
            service.clock.now += FAILURE_WINDOW_S
            await page.click("button[type=submit]")
            await expect(page.locator("h2", has_text="Sync cycles")).to_be_visible()
            cookies = {c["name"]: c for c in await page.context.cookies()}
            session = cookies["syncsvc_dashboard"]
            assert session["httpOnly"] and session["sameSite"] == "Strict"

            answer = await http.post(
                "/v1/batches", json=_batch("Copenhagen breweries", "ck", BIG_BATCH), headers=headers
            )
            big = (await answer.json())["id"]
            answer = await http.post(
                "/v1/batches", json=_batch("Aarhus pubs", "bob", FAILING_BATCH), headers=headers
            )
            failing = (await answer.json())["id"]

            # The progress bar advances while the batch syncs.
            seen: list[int] = []
            deadline = time.monotonic() + WAIT_MS / 1000
            while not seen or seen[-1] < BIG_BATCH:
                assert time.monotonic() < deadline, seen
                value = await _progress(page, big)
                if not seen or value != seen[-1]:
                    seen.append(value)
                if 0 < value < BIG_BATCH and len(seen) >= 2:
                    break
                await asyncio.sleep(0.25)
            assert any(0 < v < BIG_BATCH for v in seen), seen
            # The failure shows with its error, a Retry button, and the mailbox needs care.
            row = page.locator("#failures tr[data-op]").first
            await expect(row).to_contain_text(
                "auth_failed: CalDAV PUT answered 401", timeout=WAIT_MS
            )
            await expect(row.locator("button.retry")).to_be_visible()
            await expect(page.locator("#failures tr[data-op]")).to_have_count(FAILING_BATCH)
            await expect(page.locator(".pill.reconnect_needed")).to_be_visible()
            await expect(page.locator(f'[data-batch="{failing}"] .state')).to_have_text("failed")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"))
            before = await _progress(page, big)
            await expect(
                page.locator(f'[data-batch="{big}"] > [role="progressbar"]')
            ).not_to_have_attribute("aria-valuenow", str(before), timeout=WAIT_MS)
            await expect(page.locator(f'[data-batch="{big}"] .state')).to_have_text(
                "synced", timeout=WAIT_MS
            )

            # Reconnect Bob to a calendar that takes our events, then retry from the page.
            answer = await http.put(
                "/v1/users/bob", json=_user("Bob Berg", calendar_bob), headers=headers
            )
            assert answer.status == 200
            await row.locator("button.retry").click()
            await expect(page.locator("#toast")).to_have_text("1 operation queued again")
            await expect(page.locator("#failures tr[data-op]")).to_have_count(
                FAILING_BATCH - 1, timeout=WAIT_MS
            )
            await page.click("#retry-all")
            await expect(page.locator("#toast")).to_have_text(
                re.compile(rf"{FAILING_BATCH - 1} operations queued again")
            )
            await expect(page.locator(f'[data-batch="{failing}"] .state')).to_have_text(
                "synced", timeout=WAIT_MS
            )
            await expect(page.locator("#failures")).to_contain_text("No failures.")
            await expect(page.locator(f'[data-batch="{failing}"] .batch-count')).to_have_text(
                f"{FAILING_BATCH} / {FAILING_BATCH}"
            )
            await page.screenshot(path=str(ARTIFACTS / "dashboard-after-retry.png"))

            # Signing out ends the session on the server: a copy of the cookie is refused.
            copied = {"Cookie": f"{session['name']}={session['value']}"}
            assert (await http.get("/dashboard/data.json", headers=copied)).status == 200
            await page.click("#logout")
            await expect(page.locator("#login")).to_be_visible()
            assert (await http.get("/dashboard/data.json", headers=copied)).status == 401
            await browser.close()
