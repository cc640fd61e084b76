"""``caldav_server``: every CalDAV test that takes it runs once per real server, Radicale and
Xandikos (``tests/servers/radicale.py``, ``tests/servers/xandikos.py``), on a fresh calendar."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.servers.radicale import new_calendar
from tests.servers.xandikos import new_xandikos_calendar

#: Makes a fresh, empty calendar collection on the server and returns its URL (ending ``/``).
NewCalendar = Callable[[aiohttp.ClientSession], Awaitable[str]]
CALDAV_SERVERS = ("radicale", "xandikos")


@pytest.fixture(params=CALDAV_SERVERS)
def caldav_server(request: pytest.FixtureRequest) -> NewCalendar:
    """A factory of fresh calendars on each real CalDAV server in turn."""
    if request.param == "radicale":
        radicale: str = request.getfixturevalue("radicale_url")
        return lambda session: new_calendar(session, radicale)
    xandikos: str = request.getfixturevalue("xandikos_url")
    return lambda session: new_xandikos_calendar(session, xandikos)
