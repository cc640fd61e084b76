"""The ``syncsvc`` command as an operator runs it (real processes on a SQLite file), and the
tenant functions behind it on both backends."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import select

from syncsvc.errors import Conflict, SyncSvcError
from syncsvc.service.tenants import create_tenant, ensure_dev_tenant, tenant_for_key
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import Tenant, User
from tests.servers.postgres import free_port

SYNCSVC = str(Path(sys.executable).with_name("syncsvc"))
KEY_RE = re.compile(r"sk_[A-Za-z0-9_-]{43}")
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean SYNCSVC_* environment around an empty SQLite file."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SYNCSVC_")}
    return {
        **base,
        "SYNCSVC_DATABASE_URL": f"sqlite:///{tmp_path / 'data' / 'syncsvc.db'}",
        "SYNCSVC_EGRESS_ALLOW": os.environ["SYNCSVC_EGRESS_ALLOW"],
    }


async def run(env: Mapping[str, str], *args: str) -> Result:
    process = await asyncio.create_subprocess_exec(
        SYNCSVC,
        *args,
        env=dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


async def tenant_name_for(url: str, key: str) -> str | None:
    db = Database(url)
    try:
        async with db.session() as session:
            tenant = await tenant_for_key(session, key)
            return None if tenant is None else tenant.name
    finally:
        await db.aclose()


async def test_tenant_keys_on_both_backends(database_url: str) -> None:
    db = Database(database_url)
    try:
        await db.migrate()
        dev_key = await ensure_dev_tenant(db)
        assert dev_key is not None and KEY_RE.fullmatch(dev_key)
        assert await ensure_dev_tenant(db) is None  # only on an empty database
        tenant, key = await create_tenant(db, "acme")
        assert KEY_RE.fullmatch(key) and key != dev_key
        assert tenant.api_key_hash != key  # only the hash is stored
        with pytest.raises(Conflict):
            await create_tenant(db, "acme")
        async with db.session() as session:
            found = await tenant_for_key(session, key)
            assert found is not None and found.id == tenant.id
            dev = await tenant_for_key(session, dev_key)
            assert dev is not None and dev.name == "dev"
            assert await tenant_for_key(session, "sk_" + "x" * 43) is None
            assert await tenant_for_key(session, "") is None
    finally:
        await db.aclose()


async def test_tenants_create_prints_a_key_that_authenticates(env: dict[str, str]) -> None:
    created = await run(env, "tenants", "create", "acme")
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[-1]
    assert KEY_RE.fullmatch(key)
    url = env["SYNCSVC_DATABASE_URL"]
    assert await tenant_name_for(url, key) == "acme"
    assert await tenant_name_for(url, key[:-1] + ("A" if key[-1] != "A" else "B")) is None

    again = await run(env, "tenants", "create", "acme")
    assert again.returncode == 1
    assert "exists already" in again.stderr
    assert "Traceback" not in again.stderr


async def test_migrate_twice_is_fine(env: dict[str, str]) -> None:
    for _ in range(2):
        result = await run(env, "migrate")
        assert result.returncode == 0, result.stderr
        assert "up to date" in result.stdout


async def test_short_secret_key_exits_2_with_a_clear_message(env: dict[str, str]) -> None:
    result = await run({**env, "SYNCSVC_SECRET_KEY": "too-short"}, "migrate")
    assert result.returncode == 2
    assert "SYNCSVC_SECRET_KEY" in result.stderr
    assert "at least 32 characters" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args", [("api", "--host", "127.0.0.1"), ("worker",), ("serve", "--host", "0.0.0.0")]
)
async def test_the_public_development_key_is_refused_outside_a_local_trial(
    env: dict[str, str], args: tuple[str, ...]
) -> None:
    result = await run(env, *args)
    assert result.returncode == 2, result.stderr
    assert "SYNCSVC_SECRET_KEY is not set" in result.stderr and "loopback" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_short_operator_key_exits_2(env: dict[str, str]) -> None:
    result = await run({**env, "SYNCSVC_OPERATOR_KEY": "letmein"}, "migrate")
    assert result.returncode == 2
    assert "SYNCSVC_OPERATOR_KEY" in result.stderr and "at least 32" in result.stderr


async def test_rotate_keys_re_encrypts_every_stored_secret(env: dict[str, str]) -> None:
    old, new = "old-secret-key-" + "o" * 30, "new-secret-key-" + "n" * 30
    created = await run({**env, "SYNCSVC_SECRET_KEY": old}, "tenants", "create", "acme")
    assert created.returncode == 0, created.stderr
    url = env["SYNCSVC_DATABASE_URL"]
    db = Database(url)
    try:
        async with db.session() as s, s.begin():
            tenant = await s.scalar(select(Tenant))
            assert tenant is not None and tenant.signing_secret
            s.add(
                User(
                    tenant_id=tenant.id,
                    id="u1",
                    timezone="UTC",
                    calendar_provider="caldav",
                    calendar_config={"url": "https://dav.example/u1/", "username": "u1"},
                    calendar_secret=SecretBox(old).encrypt({"password": "hunter2"}),
                )
            )
    finally:
        await db.aclose()

    refused = await run({**env, "SYNCSVC_SECRET_KEY": new}, "rotate-keys")
    assert refused.returncode == 2 and "SYNCSVC_SECRET_KEY_PREVIOUS" in refused.stderr
    keys = {"SYNCSVC_SECRET_KEY": new, "SYNCSVC_SECRET_KEY_PREVIOUS": old}
    for _ in range(2):  # a second run is harmless
        rotated = await run({**env, **keys}, "rotate-keys")
        assert rotated.returncode == 0, rotated.stderr
        assert "re-encrypted 2 stored secrets" in rotated.stdout

    db = Database(url)
    try:
        async with db.session() as s:
            tenant = await s.scalar(select(Tenant))
            user = await s.scalar(select(User))
        assert tenant is not None and tenant.signing_secret
        assert user is not None and user.calendar_secret
        only_new = SecretBox(new)
        assert only_new.decrypt(user.calendar_secret) == {"password": "hunter2"}
        assert str(only_new.decrypt(tenant.signing_secret)["secret"]).startswith("whsec_")
        with pytest.raises(SyncSvcError):
            SecretBox(old).decrypt(user.calendar_secret)
    finally:
        await db.aclose()


@dataclass(slots=True)
class Served:
    process: asyncio.subprocess.Process
    base_url: str
    #: stdout up to and including the ``listening on`` line.
    banner: list[str]


class Launcher:
    """Starts ``syncsvc serve`` (or ``api``, ``worker``) as a user would and stops it with
    SIGTERM. With ``log_dir``, each process's stderr (its log) goes to a file there."""

    def __init__(self, env: Mapping[str, str], log_dir: Path | None = None) -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        self.started: list[asyncio.subprocess.Process] = []

    async def spawn(self, *args: str, stdout: int | None = None) -> asyncio.subprocess.Process:
        """``syncsvc <args>``; its stderr goes to ``<log_dir>/<command>-<n>.log``."""
        if self.log_dir is None:
            process = await asyncio.create_subprocess_exec(
                SYNCSVC, *args, env=self.env, stdout=stdout, stderr=asyncio.subprocess.DEVNULL
            )
        else:
            name = self.log_dir / f"{args[0]}-{len(self.started)}.log"
            with name.open("ab") as log:
                process = await asyncio.create_subprocess_exec(
                    SYNCSVC, *args, env=self.env, stdout=stdout, stderr=log
                )
        self.started.append(process)
        return process

    async def start(self, command: str = "serve") -> Served:
        port = free_port()
        process = await self.spawn(
            command, "--host", "127.0.0.1", "--port", str(port), stdout=asyncio.subprocess.PIPE
        )
        assert process.stdout is not None
        banner: list[str] = []
        expected = f"listening on http://127.0.0.1:{port}"
        async with asyncio.timeout(START_TIMEOUT_S):
            while not banner or banner[-1] != expected:
                line = await process.stdout.readline()
                assert line, f"serve exited before listening; stdout: {banner}"
                banner.append(line.decode().rstrip("\n"))
        return Served(process, f"http://127.0.0.1:{port}", banner)

    async def stop(self, served: Served) -> int:
        served.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(STOP_TIMEOUT_S):
            return await served.process.wait()

    async def kill_all(self) -> None:
        for process in self.started:
            if process.returncode is None:
                process.kill()
                await process.wait()


@pytest.fixture
async def launcher(env: dict[str, str]) -> AsyncIterator[Launcher]:
    launcher = Launcher(env)
    try:
        yield launcher
    finally:
        await launcher.kill_all()


async def test_serve_prints_the_dev_key_once_and_accepts_new_keys_at_once(
    launcher: Launcher, env: dict[str, str]
) -> None:
    served = await launcher.start()
    keys = [line for line in served.banner if KEY_RE.fullmatch(line)]
    assert len(keys) == 1
    dev_key = keys[0]
    assert await tenant_name_for(env["SYNCSVC_DATABASE_URL"], dev_key) == "dev"

    async with aiohttp.ClientSession(served.base_url) as http:
        async with http.get("/healthz") as health:
            assert health.status == 200
        async with http.get("/v1/users/x") as anonymous:
            assert anonymous.status == 401

        # A tenant made by another process while serve runs: its key works on the next request.
        created = await run(env, "tenants", "create", "acme")
        assert created.returncode == 0, created.stderr
        acme_key = created.stdout.splitlines()[-1]
        for key in (dev_key, acme_key):
            headers = {"Authorization": f"Bearer {key}"}
            async with http.get("/v1/users/x", headers=headers) as known:
                assert known.status == 404

    assert await launcher.stop(served) == 0
    again = await launcher.start()
    assert not any(KEY_RE.search(line) for line in again.banner)
    assert await launcher.stop(again) == 0


async def test_json_logs_are_one_object_per_line_with_the_records_fields(
    env: dict[str, str], tmp_path: Path
) -> None:
    launcher = Launcher({**env, "SYNCSVC_LOG_FORMAT": "json"}, log_dir=tmp_path)
    try:
        served = await launcher.start()
        async with aiohttp.ClientSession(served.base_url) as http, http.get("/healthz") as health:
            assert health.status == 200
        assert await launcher.stop(served) == 0
    finally:
        await launcher.kill_all()
    lines = (tmp_path / "serve-0.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert records and all({"time", "level", "logger"} <= set(r) for r in records)
    requests = [r for r in records if r.get("event") == "http.request"]
    assert any(r.get("route") == "/healthz" and r.get("status") == "200" for r in requests)


async def test_an_unknown_log_format_exits_2(env: dict[str, str]) -> None:
    result = await run({**env, "SYNCSVC_LOG_FORMAT": "yaml"}, "migrate")
    assert result.returncode == 2
    assert "SYNCSVC_LOG_FORMAT" in result.stderr and "text or json" in result.stderr
