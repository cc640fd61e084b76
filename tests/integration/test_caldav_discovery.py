"""Finding the calendar: same-origin redirects, and discovery from the server's root URL.

Runs against the session's real Radicale and Xandikos; redirects come from a small local proxy
in front of Radicale (``tests/servers/proxy.py``), since neither server moves a collection.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import icalendar
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.errors import Permanent
from syncsvc.providers.base import EventSpec
from syncsvc.providers.caldav import CalDAVProvider, NoCalendarFound
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from tests.servers.proxy import caldav_proxy
from tests.servers.radicale import RADICALE_PASSWORD, RADICALE_USER, new_calendar
from tests.servers.xandikos import new_xandikos_calendar

START = datetime(2027, 6, 14, 9, 30, tzinfo=UTC)


def _spec(key: str, subject: str) -> EventSpec:
    return EventSpec(
        key=key,
        activity_id=f"activity-{key}",
        batch_id="b1",
        subject=subject,
        start=START,
        end=START + timedelta(hours=1),
        timezone="UTC",
    )


def _auth(user: str = RADICALE_USER) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, RADICALE_PASSWORD)}


async def _summaries(http: aiohttp.ClientSession, calendar: str, names: list[str]) -> list[str]:
    found = []
    for name in names:
        async with http.get(calendar + name, headers=_auth()) as answer:
            if answer.status == 200:
                ics = icalendar.Calendar.from_ical(await answer.read())
                found += [str(event["SUMMARY"]) for event in ics.events]
    return found


# --- Redirects ---


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_same_origin_redirects_are_followed_with_method_and_body(
    radicale_url: str, status: int
) -> None:
    """A server that moved its collections (``/old/…`` → ``/…``) redirects every verb: PUT
    and DELETE land as sent, with their conditions and bodies, at the new place."""
    redirected: list[str] = []

    async def moved(request: web.Request, _: bytes) -> web.StreamResponse | None:
        if not request.path.startswith("/old/"):
            return None
        redirected.append(request.method)
        return web.Response(status=status, headers={"Location": request.path_qs[len("/old") :]})

    async with aiohttp.ClientSession() as http, caldav_proxy(radicale_url, moved) as proxy:
        calendar = await new_calendar(http, radicale_url)
        path = calendar[len(radicale_url) - 1 :]
        provider = CalDAVProvider(f"{proxy}/old{path}", RADICALE_USER, RADICALE_PASSWORD, http)
        ref = await provider.create(_spec("a1", "Visit"))
        again = await provider.create(_spec("a1", "Visit"))  # If-None-Match: * is kept
        assert again.event_id == ref.event_id
        ref = await provider.update(again, _spec("a1", "Tour"))
        assert await _summaries(http, calendar, [ref.event_id]) == ["Tour"]
        assert await provider.find("a1") == ref
        await provider.delete(ref)
        assert await _summaries(http, calendar, [ref.event_id]) == []
    assert {"PUT", "GET", "DELETE"} <= set(redirected)


async def test_a_redirect_to_another_origin_is_refused_and_nothing_reaches_it(
    radicale_url: str,
) -> None:
    elsewhere: list[str] = []

    async def count(request: web.Request, _: bytes) -> web.StreamResponse | None:
        elsewhere.append(request.method)
        return None

    async with (
        aiohttp.ClientSession() as http,
        caldav_proxy(radicale_url, count) as other,
    ):

        async def away(request: web.Request, _: bytes) -> web.StreamResponse:
            return web.Response(status=307, headers={"Location": other + request.path_qs})

        async with caldav_proxy(radicale_url, away) as proxy:
            provider = CalDAVProvider(f"{proxy}/alice/cal/", RADICALE_USER, "pw", http)
            with pytest.raises(Permanent, match="another origin") as raised:
                await provider.create(_spec("a1", "Visit"))
    assert other in str(raised.value) and elsewhere == []


async def test_a_redirect_loop_ends_in_a_clear_error(radicale_url: str) -> None:
    async def loop(request: web.Request, _: bytes) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": request.path + "x/"})

    async with aiohttp.ClientSession() as http, caldav_proxy(radicale_url, loop) as proxy:
        provider = CalDAVProvider(f"{proxy}/cal/", RADICALE_USER, "pw", http)
        with pytest.raises(Permanent, match="more than 5 redirects"):
            await provider.find("a1")


# --- Discovery ---

_MKCALENDAR = """<?xml version="1.0" encoding="utf-8"?>
<C:mkcalendar xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:set><D:prop><D:displayname>{name}</D:displayname>
  <C:supported-calendar-component-set>{comps}</C:supported-calendar-component-set>
  </D:prop></D:set>
</C:mkcalendar>"""


async def _mkcalendar(
    http: aiohttp.ClientSession,
    url: str,
    user: str,
    name: str,
    comps: str = "VEVENT",
    *,
    exist_ok: bool = False,
) -> str:
    body = _MKCALENDAR.format(
        name=name, comps="".join(f'<C:comp name="{c}"/>' for c in comps.split())
    )
    headers = {"Content-Type": "application/xml; charset=utf-8", **_auth(user)}
    async with http.request("MKCALENDAR", url, data=body, headers=headers) as answer:
        # It exists (Xandikos' server lives for the session, and tests share it): Radicale
        # answers 405, Xandikos 403 resource-must-be-null (RFC 4791 §5.3.1.1).
        exists = answer.status in (403, 405)
        assert answer.status == 201 or (exist_ok and exists), await answer.text()
    return url


async def _radicale_user(http: aiohttp.ClientSession, radicale_url: str) -> str:
    """A user of their own (Radicale lets any user in), so their calendars are only ours."""
    user = f"u{uuid.uuid4().hex[:12]}"
    async with http.request("PROPFIND", f"{radicale_url}{user}/", headers=_auth(user)) as answer:
        await answer.read()
    return user


async def _discover(http: aiohttp.ClientSession, url: str, user: str) -> str:
    return await CalDAVProvider(url, user, RADICALE_PASSWORD, http).discover()


async def test_radicale_from_its_root_finds_the_first_calendar_for_events(
    radicale_url: str,
) -> None:
    async with aiohttp.ClientSession() as http:
        user = await _radicale_user(http, radicale_url)
        await _mkcalendar(http, f"{radicale_url}{user}/a-tasks/", user, "Tasks", "VTODO")
        work = await _mkcalendar(http, f"{radicale_url}{user}/b-work/", user, "Work")
        await _mkcalendar(http, f"{radicale_url}{user}/c-home/", user, "Home")
        assert await _discover(http, radicale_url, user) == work
        # The principal or the calendar itself lead to the same place.
        assert await _discover(http, f"{radicale_url}{user}/", user) == work
        home = await _mkcalendar(http, f"{radicale_url}{user}/c-home2/", user, "Home 2")
        assert await _discover(http, home, user) == home


async def test_xandikos_from_its_root_finds_its_calendar(xandikos_url: str) -> None:
    """The home's calendar named ``default``, whatever else it holds (other tests add
    calendars to this session's server, named by uuid, which sort before it by href)."""
    async with aiohttp.ClientSession() as http:
        default = f"{xandikos_url}user/calendars/default/"
        await _mkcalendar(http, default, "anyone", "Default", exist_ok=True)
        await new_xandikos_calendar(http, xandikos_url)  # another one, first by href or not
        found = await _discover(http, xandikos_url, "anyone")
        assert found == default
        assert await _discover(http, found, "anyone") == found


async def test_a_server_with_no_calendar_names_what_was_tried(radicale_url: str) -> None:
    async with aiohttp.ClientSession() as http:
        user = await _radicale_user(http, radicale_url)
        await _mkcalendar(http, f"{radicale_url}{user}/tasks/", user, "Tasks", "VTODO")
        with pytest.raises(NoCalendarFound) as raised:
            await _discover(http, radicale_url, user)
    first, well_known = raised.value.tried
    assert first.startswith(f"from {radicale_url}: ")
    assert f"{radicale_url}{user}/ holds no calendar for events" in first
    assert well_known.startswith(f"from {radicale_url}.well-known/caldav: ")


# --- Discovery when the CRM stores a user ---


@pytest_asyncio.fixture
async def api(
    tmp_path: Path,
) -> AsyncIterator[tuple[TestClient[Any, Any], Database, dict[str, str]]]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'sync.db'}", secret_key="k" * 40)
    db = Database(settings.database_url)
    await db.migrate()
    _, key = await create_tenant(db, "acme")
    async with TestClient(TestServer(build_app(settings, db))) as client:
        yield client, db, {"Authorization": f"Bearer {key}"}
    await db.aclose()


def _user(calendar: dict[str, str]) -> dict[str, Any]:
    return {"name": "U", "timezone": "Europe/Copenhagen", "calendar": calendar}


@pytest.mark.parametrize("server", ["radicale", "xandikos"])
async def test_put_with_the_server_root_answers_the_calendar_it_found(
    api: tuple[TestClient[Any, Any], Database, dict[str, str]],
    request: pytest.FixtureRequest,
    server: str,
) -> None:
    """The default calendar (by name) is found once, at PUT; the same PUT again asks the
    server nothing, and a wrong root is a 422 naming what was tried."""
    client, _, headers = api
    root: str = request.getfixturevalue(f"{server}_url")
    asked: list[str] = []

    async def count(r: web.Request, _: bytes) -> web.StreamResponse | None:
        asked.append(f"{r.method} {r.path}")
        return None

    async with aiohttp.ClientSession() as http, caldav_proxy(root, count) as proxy:
        if server == "radicale":
            user = await _radicale_user(http, root)
            home = f"{user}/"
        else:
            user, home = "anyone", "user/calendars/"
        await _mkcalendar(http, f"{root}{home}a-first/", user, "First")
        await _mkcalendar(http, f"{root}{home}default/", user, "Default", exist_ok=True)
        calendar = {
            "provider": "caldav",
            "server_url": proxy + "/",
            "username": user,
            "password": RADICALE_PASSWORD,
        }
        answer = await client.put("/v1/users/u1", headers=headers, json=_user(calendar))
        assert answer.status == 200, await answer.text()
        got = (await answer.json())["calendar"]
        assert got == {
            "provider": "caldav",
            "url": f"{proxy}/{home}default/",
            "server_url": proxy + "/",
            "username": user,
            "password_set": True,
        }
        assert asked
        asked.clear()
        again = await client.put("/v1/users/u1", headers=headers, json=_user(calendar))
        assert again.status == 200 and (await again.json())["calendar"] == got
        assert asked == []


async def test_put_with_a_server_holding_no_calendar_is_a_422_naming_what_was_tried(
    api: tuple[TestClient[Any, Any], Database, dict[str, str]], radicale_url: str
) -> None:
    client, _, headers = api
    async with aiohttp.ClientSession() as http:
        user = await _radicale_user(http, radicale_url)
    calendar = {
        "provider": "caldav",
        "server_url": radicale_url,
        "username": user,
        "password": RADICALE_PASSWORD,
    }
    answer = await client.put("/v1/users/u1", headers=headers, json=_user(calendar))
    assert answer.status == 422, await answer.text()
    error = (await answer.json())["error"]
    assert error["message"] == f"no calendar for events found on {radicale_url}"
    tried = [d["msg"] for d in error["details"]]
    assert len(tried) == 2, tried
    assert (
        tried[0].startswith(f"from {radicale_url}: ") and f"{user}/ holds no calendar" in tried[0]
    )
    assert tried[1].startswith(f"from {radicale_url}.well-known/caldav: "), tried
    assert (await client.get("/v1/users/u1", headers=headers)).status == 404


async def test_put_with_refused_credentials_or_two_addresses_is_a_422(
    api: tuple[TestClient[Any, Any], Database, dict[str, str]], radicale_url: str
) -> None:
    client, _, headers = api

    async def refuse(_: web.Request, __: bytes) -> web.StreamResponse:
        return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="dav"'})

    async with caldav_proxy(radicale_url, refuse) as proxy:
        calendar = {"provider": "caldav", "server_url": proxy, "username": "u", "password": "x"}
        answer = await client.put("/v1/users/u1", headers=headers, json=_user(calendar))
        assert answer.status == 422, await answer.text()
        error = (await answer.json())["error"]
        assert error["message"] == f"{proxy} refused the username or password"
        assert error["details"][0]["loc"] == ["body", "calendar", "password"]

        both = {**calendar, "url": proxy + "/u/cal/"}
        answer = await client.put("/v1/users/u1", headers=headers, json=_user(both))
        assert answer.status == 422
        assert "exactly one of url" in await answer.text()


async def test_a_calendar_listed_outside_the_egress_policy_is_a_422_not_stored(
    api: tuple[TestClient[Any, Any], Database, dict[str, str]], radicale_url: str
) -> None:
    """A hostile server may list a calendar on the operator's network: it is never stored."""
    client, _, headers = api

    async def hostile(request: web.Request, _: bytes) -> web.StreamResponse:
        inner = (
            "<D:response><D:href>http://10.0.0.1/cal/</D:href><D:propstat><D:prop>"
            "<D:resourcetype><D:collection/><C:calendar/></D:resourcetype></D:prop>"
            "<D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>"
        )
        listing = inner if request.headers.get("Depth") == "1" else ""
        body = (
            '<D:multistatus xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">'
            "<D:response><D:href>/</D:href><D:propstat><D:prop><D:resourcetype>"
            "<D:collection/></D:resourcetype></D:prop><D:status>HTTP/1.1 200 OK</D:status>"
            f"</D:propstat></D:response>{listing}</D:multistatus>"
        )
        return web.Response(status=207, body=body, content_type="application/xml")

    async with caldav_proxy(radicale_url, hostile) as proxy:
        calendar = {"provider": "caldav", "server_url": proxy, "username": "u", "password": "x"}
        answer = await client.put("/v1/users/u1", headers=headers, json=_user(calendar))
    assert answer.status == 422, await answer.text()
    error = (await answer.json())["error"]
    assert error["message"].endswith("is at http://10.0.0.1/cal/")
    assert (await client.get("/v1/users/u1", headers=headers)).status == 404
