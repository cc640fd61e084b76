"""Session fixture: a real Radicale CalDAV server on 127.0.0.1, started by the tests.

Radicale runs from the venv (``sys.executable -m radicale``) with ``--auth-type none``: any
Basic-auth user logs in and owns ``/<user>/``. Tests get a fresh, empty calendar collection
each from ``new_calendar`` so they never see each other's events.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

RADICALE_USER = "alice"
RADICALE_PASSWORD = "secret"
RADICALE_START_TIMEOUT_S = 15.0
RADICALE_STOP_TIMEOUT_S = 5.0

_MKCALENDAR_BODY = b"""<?xml version="1.0" encoding="utf-8"?>
<C:mkcalendar xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:set><D:prop>
    <D:displayname>syncsvc test</D:displayname>
    <C:supported-calendar-component-set><C:comp name="VEVENT"/></C:supported-calendar-component-set>
  </D:prop></D:set>
</C:mkcalendar>"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + RADICALE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"radicale exited with {process.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(url + ".web/", timeout=1):
                return
        except urllib.error.HTTPError:
            return  # It answers HTTP: it is up.
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(
        f"radicale did not answer within {RADICALE_START_TIMEOUT_S} s: {log.read_text()}"
    )


class RadicaleServer:
    """One Radicale process on a fixed port and folder: killed (``kill9``), frozen
    (``freeze``/``thaw``: SIGSTOP/SIGCONT) and started again at will, its calendars kept."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or _free_port()
        self.log = folder / "radicale.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "radicale",
                    "--config",
                    "",
                    "--server-hosts",
                    f"127.0.0.1:{self.port}",
                    "--auth-type",
                    "none",
                    "--storage-filesystem-folder",
                    str(self.folder / "collections"),
                    "--logging-level",
                    "warning",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        _wait_ready(self.url, self.process, self.log)

    def kill9(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a frozen process dies too
            self.process.kill()
            self.process.wait()

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(timeout=RADICALE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def radicale_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (ending in ``/``) of a Radicale server that lives for the whole session."""
    server = RadicaleServer(tmp_path_factory.mktemp("radicale"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


async def new_calendar(
    session: aiohttp.ClientSession, radicale_url: str, user: str = RADICALE_USER
) -> str:
    """MKCALENDAR a fresh, empty VEVENT collection for ``user``; returns its URL (ending ``/``)."""
    auth = {"Authorization": aiohttp.encode_basic_auth(user, RADICALE_PASSWORD)}
    # Radicale creates the principal collection /<user>/ on the user's first request.
    async with session.request("PROPFIND", f"{radicale_url}{user}/", headers=auth) as response:
        await response.read()
    url = f"{radicale_url}{user}/{uuid.uuid4().hex}/"
    async with session.request(
        "MKCALENDAR",
        url,
        data=_MKCALENDAR_BODY,
        headers={"Content-Type": "application/xml; charset=utf-8", **auth},
    ) as response:
        if response.status != 201:
            raise RuntimeError(
                f"MKCALENDAR {url} answered {response.status}: {await response.text()}"
            )
    return url
