"""Hostile stored data costs a feed only the activities it is in, never the whole feed.

The API refuses CR/LF in addresses and absurd instants, but the store may still hold them
(rows from before that check, a CRM writing to the database): the unauthenticated feed GET
must serve everything else, inject nothing, and say once what it left out.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from icalendar import Calendar
from sqlalchemy import update

from syncsvc.store.db import Database
from syncsvc.store.models import Activity
from tests.api.conftest import Tenants
from tests.api.test_feeds import _by_uid, _commit, _new_feed, _put_user, _uid

Client = TestClient[web.Request, web.Application]
INJECTED = "X-INJECTED:1"
#: The last instant ``datetime`` holds: in Copenhagen (UTC+1) it is past year 9999.
END_OF_TIME = datetime(9999, 12, 31, 23, 30, tzinfo=UTC)


async def test_unrenderable_activities_are_left_out_and_logged_once(
    client: Client, tenants: Tenants, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    await _put_user(client, tenants.a)
    crlf, absurd, fine = await _commit(client, tenants.a)
    async with db.session() as session, session.begin():
        await session.execute(
            update(Activity)
            .where(Activity.id == crlf["id"])
            .values(attendees=[{"name": "Eve", "email": f"eve@example.com\r\n{INJECTED}"}])
        )
        await session.execute(
            update(Activity).where(Activity.id == absurd["id"]).values(end=END_OF_TIME)
        )
    path = await _new_feed(client, tenants.a)

    with caplog.at_level(logging.WARNING, logger="syncsvc.feeds"):
        response = await client.get(path)
        again = await client.get(path)  # the cached body: nothing rendered, nothing logged
    assert response.status == again.status == 200, await response.text()
    body = await response.read()
    assert await again.read() == body
    assert INJECTED.encode() not in body
    assert set(_by_uid(Calendar.from_ical(body))) == {_uid(fine)}

    (record,) = [r for r in caplog.records if "event=feed.skipped" in r.getMessage()]
    message = record.getMessage()
    assert "count=2" in message
    assert crlf["id"] in message and absurd["id"] in message
    assert "\r" not in message and "\n" not in message
