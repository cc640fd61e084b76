"""Contract backend: ``CalDAVProvider`` against a real Xandikos, the CalDAV harness of
``backend_caldav.py`` on a second, independent server (which locks collections on writes)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.contract.backend_caldav import CalDAVHarness, open_caldav_harness
from tests.servers.xandikos import new_xandikos_calendar

__all__ = ["harness_xandikos"]


@pytest.fixture
async def harness_xandikos(xandikos_url: str) -> AsyncIterator[CalDAVHarness]:
    async with open_caldav_harness(xandikos_url, new_xandikos_calendar) as harness:
        yield harness
