"""Session fixture: a real redis-server on 127.0.0.1, started by the tests.

``redis_server`` starts one server per session on a free port in a temporary folder, with an
append-only file so that ``restart()`` (stop + start on the same port) keeps the data the way
a production Redis with persistence does; ``restart(wipe=True)`` loses it all instead.
``redis_url`` hands each test a flushed database.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_POLL_S = 0.02


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; start, stop and restart it on the same port and folder."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self._proc = subprocess.Popen(
            [
                REDIS_SERVER_BIN,
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--dir", str(self.folder),
                "--logfile", str(self.folder / "redis.log"),
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "everysec",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _ping(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")
            time.sleep(_POLL_S)

    def stop(self) -> None:
        """SIGTERM: Redis writes its append-only file out and exits."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, *, wipe: bool = False) -> None:
        """Stops and starts on the same port; ``wipe`` drops every key as a crash would."""
        self.stop()
        if wipe:
            shutil.rmtree(self.folder / "appendonlydir", ignore_errors=True)
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with (
        tempfile.TemporaryDirectory(prefix="syncsvc-redis-") as folder,
        RedisServer(Path(folder)) as server,
    ):
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL with an empty database (restarted if a test left it down)."""
    redis_server.start()
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=5) as s:
        s.sendall(b"FLUSHALL\r\n")
        if not s.recv(64).startswith(b"+OK"):
            raise RuntimeError("FLUSHALL failed")
    return redis_server.url
