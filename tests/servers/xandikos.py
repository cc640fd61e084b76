"""Session fixture: a real Xandikos CalDAV server on 127.0.0.1, started by the tests.

Xandikos is the second, independent CalDAV server every CalDAV test runs against next to
Radicale. It has no authentication (the Basic credentials tests send are ignored) and, unlike
Radicale, answers ``423 Locked`` to overlapping writes in one collection. ``--defaults``
makes the principal ``/user/`` with its calendar home ``/user/calendars/`` and a ``calendar``
collection in it, so discovery from the root finds a calendar as on a fresh install.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import aiohttp
import pytest

XANDIKOS_START_TIMEOUT_S = 20.0
XANDIKOS_STOP_TIMEOUT_S = 5.0

_MKCALENDAR_BODY = b"""<?xml version="1.0" encoding="utf-8"?>
<C:mkcalendar xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:set><D:prop><D:displayname>syncsvc test</D:displayname></D:prop></D:set>
</C:mkcalendar>"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def xandikos_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (ending in ``/``) of a Xandikos server that lives for the whole session."""
    folder = tmp_path_factory.mktemp("xandikos")
    port = free_port()
    log = folder / "xandikos.log"
    with log.open("ab") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xandikos",
                "serve",
                "-d",
                str(folder / "data"),
                "--defaults",
                "-l",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + XANDIKOS_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"xandikos exited: {log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=1):
                    break
            except urllib.error.HTTPError:
                break  # it answers HTTP: it is up
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=XANDIKOS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def new_xandikos_calendar(session: aiohttp.ClientSession, base_url: str) -> str:
    """MKCALENDAR a fresh, empty collection in the calendar home; returns its URL (ending ``/``)."""
    url = f"{base_url}user/calendars/{uuid.uuid4().hex}/"
    async with session.request(
        "MKCALENDAR",
        url,
        data=_MKCALENDAR_BODY,
        headers={"Content-Type": "application/xml; charset=utf-8"},
    ) as response:
        if response.status != 201:
            raise RuntimeError(
                f"MKCALENDAR {url} answered {response.status}: {await response.text()}"
            )
    return url
