"""Session fixture: a real PostgreSQL 15 on 127.0.0.1, started by the tests.

The cluster lives in a temporary folder with ``fsync=off`` (nothing here needs to survive a
crash of the machine). PostgreSQL refuses to run as root, so as root it runs as ``postgres``.
Each test gets its own fresh database (``CREATE DATABASE`` takes a few ms), never a shared one.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
import pytest_asyncio

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
#: API tests open a pool per test; leave room for engines that are disposed late.
MAX_CONNECTIONS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _as_postgres() -> list[str]:
    """PostgreSQL will not run as root; switch to its own account when we are root."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups"]


@dataclass(slots=True)
class PostgresServer:
    port: int
    directory: Path
    process: subprocess.Popen[bytes]
    #: Commits survive a crash of the server (``synchronous_commit=on``); see ``start_postgres``.
    durable: bool = False
    _names: Iterator[int] = field(default_factory=itertools.count)

    def dsn(self, dbname: str = "postgres") -> str:
        """A plain SQLAlchemy/libpq URL, as a user would put in ``SYNCSVC_DATABASE_URL``."""
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    async def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        conn = await asyncpg.connect(self.dsn("postgres"))
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 STRATEGY FILE_COPY')
        finally:
            await conn.close()
        return self.dsn(name)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            ready = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                check=False,
            )
            if ready.returncode == 0:
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                output = (self.directory / "log").read_text(errors="replace")
                raise RuntimeError(f"PostgreSQL did not start on port {self.port}:\n{output}")
            time.sleep(0.05)

    def crash(self) -> None:
        """What ``pg_ctl stop -m immediate`` does: SIGQUIT to the postmaster, which ends every
        backend at once without a checkpoint (the next start replays the WAL)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            self.process.wait(STOP_TIMEOUT_S)

    def start(self) -> None:
        """Starts the stopped server again on the same port and data folder."""
        if self.process.poll() is None:
            return
        self.process = _launch(self.directory, self.port, durable=self.durable)
        self.wait_ready()

    def restart_immediate(self) -> None:
        """``pg_ctl restart -m immediate``: every connection is cut mid-whatever."""
        self.crash()
        self.start()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: ends open sessions
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_postgres(*, durable: bool = False) -> PostgresServer:
    """``durable=False`` acknowledges commits before their WAL is written (fast, and fine
    while the server is never crashed); tests that crash it want ``durable`` so that what
    was committed is still there after the restart (``fsync`` stays off either way: the OS
    keeps the written WAL when only the server dies)."""
    directory = Path(tempfile.mkdtemp(prefix="syncsvc-pg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, PG_USER, PG_USER)
    subprocess.run(
        [
            *_as_postgres(),
            str(PG_BIN / "initdb"),
            "-D",
            str(directory / "data"),
            "-U",
            PG_USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    process = _launch(directory, port, durable=durable)
    server = PostgresServer(port=port, directory=directory, process=process, durable=durable)
    try:
        server.wait_ready()
    except RuntimeError:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return server


def _launch(directory: Path, port: int, *, durable: bool) -> subprocess.Popen[bytes]:
    log = (directory / "log").open("ab")
    process = subprocess.Popen(
        [
            *_as_postgres(),
            str(PG_BIN / "postgres"),
            "-D",
            str(directory / "data"),
            "-p",
            str(port),
            "-k",
            str(directory),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            f"synchronous_commit={'on' if durable else 'off'}",
            "-c",
            "full_page_writes=off",
            "-c",
            f"max_connections={MAX_CONNECTIONS}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return process


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A server of the test's own, for tests that crash, stop and restart it."""
    server = start_postgres(durable=True)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


@pytest_asyncio.fixture(params=["sqlite", "postgres"], ids=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty (not yet migrated) database URL of each kind; the PostgreSQL server is
    only started when a ``postgres`` case runs."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'syncsvc.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    yield await server.create_database()
