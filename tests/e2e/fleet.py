"""A fleet of real ``syncsvc`` processes on PostgreSQL, as an operator runs it: one ``api`` and
``worker`` processes, each of which may be killed and started again; and the CRM's side of it,
an HTTP client that waits out restarts and outages the way a well-behaved CRM does (it
retries on 503 and on a refused connection). Used by the outage and chaos tests and by
``bench/chaos.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from syncsvc.providers._ical import ParsedEvent
from tests.integration.test_cli import Launcher, Served, run
from tests.integration.test_sync_caldav import _events as calendar_events
from tests.servers.radicale import RADICALE_PASSWORD, RADICALE_USER

SECRET_KEY = "fleet-secret-key-" + "f" * 32
#: How long the CRM keeps retrying one call (the API restarting, the database away).
CALL_PATIENCE_S = 90.0
RETRY_S = 0.25
#: Statuses the CRM retries: the database away (503), and its tenant's quota spent (429,
#: after the Retry-After it names).
RETRIED = frozenset({503, 429})


def fleet_env(env: dict[str, str], database_url: str, **more: str) -> dict[str, str]:
    """The process environment: the caller's minus any ``SYNCSVC_*`` (but its egress
    allow-list), plus the fleet's."""
    clean = {k: v for k, v in env.items() if not k.startswith("SYNCSVC_")}
    clean.update(SYNCSVC_DATABASE_URL=database_url, SYNCSVC_SECRET_KEY=SECRET_KEY)
    clean.update(SYNCSVC_EGRESS_ALLOW=env.get("SYNCSVC_EGRESS_ALLOW", ""))  # loopback servers
    clean.update({f"SYNCSVC_{k.upper()}": v for k, v in more.items()})
    return clean


@dataclass(slots=True)
class Worker:
    process: asyncio.subprocess.Process
    log: Path


class Fleet:
    """One ``syncsvc api`` and any number of ``syncsvc worker`` processes."""

    def __init__(self, env: dict[str, str], log_dir: Path, http: aiohttp.ClientSession) -> None:
        self.launcher = Launcher(env, log_dir)
        self.log_dir = log_dir
        self.http = http
        self.api: Served | None = None
        self.workers: list[Worker] = []
        self.headers: dict[str, str] = {}

    async def create_tenant(self, name: str = "acme") -> None:
        created = await run(self.launcher.env, "tenants", "create", name)
        assert created.returncode == 0, created.stderr
        self.headers = {"Authorization": f"Bearer {created.stdout.splitlines()[-1]}"}

    async def start_api(self) -> None:
        self.api = await self.launcher.start("api")

    async def kill_api(self) -> None:
        """kill -9 of the API, then a fresh one (on another port)."""
        assert self.api is not None
        self.api.process.kill()
        await self.api.process.wait()
        await self.start_api()

    async def start_worker(self) -> Worker:
        process = await self.launcher.spawn("worker")
        worker = Worker(process, self.log_dir / f"worker-{len(self.launcher.started) - 1}.log")
        self.workers.append(worker)
        return worker

    async def kill_worker(self, index: int) -> None:
        """kill -9 of one worker, then a fresh one in its place."""
        old = self.workers.pop(index)
        old.process.kill()
        await old.process.wait()
        await self.start_worker()

    def exited(self) -> list[int | None]:
        """Return codes of processes that ended on their own (none should)."""
        running = [w.process for w in self.workers]
        if self.api is not None:
            running.append(self.api.process)
        return [p.returncode for p in running if p.returncode is not None]

    async def call(
        self, method: str, path: str, body: Any = None, *, patience_s: float = CALL_PATIENCE_S
    ) -> tuple[int, Any]:
        """One CRM call; 503s, 429s and refused connections are retried until ``patience_s``."""
        deadline = time.monotonic() + patience_s
        while True:
            assert self.api is not None
            try:
                async with self.http.request(
                    method, self.api.base_url + path, json=body, headers=self.headers
                ) as answer:
                    data = await answer.json(content_type=None)
                    if answer.status not in RETRIED:
                        return answer.status, data
                    wait_s = answer.headers.get("Retry-After")
                    assert wait_s, f"a {answer.status} says when to come back"
                    if answer.status == 429:
                        left = deadline - time.monotonic()
                        await asyncio.sleep(max(0.0, min(float(wait_s), left)))
                    else:
                        assert data["error"]["code"] == "database_unavailable", data
            except (aiohttp.ClientConnectionError, TimeoutError):
                pass  # the API is being restarted
            assert time.monotonic() < deadline, f"{method} {path} kept failing"
            await asyncio.sleep(RETRY_S)

    async def wait_batch(
        self, batch_id: str, done: Callable[[dict[str, Any]], bool], timeout_s: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            status, body = await self.call("GET", f"/v1/batches/{batch_id}")
            assert status == 200, body
            if done(body):
                return dict(body)
            assert time.monotonic() < deadline, f"batch {batch_id} did not settle: {body}"
            assert not self.exited(), f"a process ended: {self.exited()}"
            await asyncio.sleep(0.3)

    async def aclose(self) -> None:
        await self.launcher.kill_all()


def settled(batch: dict[str, Any]) -> bool:
    sync = batch["sync"]
    return bool(sync["pending"] == 0 and sync["deleting"] == 0)


def user_body(n: int, calendar_url: str) -> dict[str, Any]:
    return {
        "name": f"User {n}",
        "timezone": "Europe/Copenhagen",
        "country": "DK",
        "calendar": {
            "provider": "caldav",
            "url": calendar_url,
            "username": RADICALE_USER,
            "password": RADICALE_PASSWORD,
        },
    }


def batch_body(name: str, users: list[str], events: int, start_date: str) -> dict[str, Any]:
    return {
        "targetgroup_name": name,
        "targets": [{"id": f"{name}-{i}", "name": f"{name} {i}"} for i in range(events)],
        "template": {"kind": "meeting", "subject": f"Visit {name} $account-name$"},
        "schedule": {"start_date": start_date, "duration": "00:30", "interval": "00:15"},
        "assignment": {"mode": "users", "users": users},
    }


def own_event(uid: str) -> str:
    """A user's own event, which syncsvc must never touch."""
    return (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\n"
        f"UID:{uid}\r\nDTSTAMP:20270101T000000Z\r\nDTSTART:20270601T060000Z\r\n"
        "DTEND:20270601T070000Z\r\nSUMMARY:Dentist\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )


async def put_own_event(http: aiohttp.ClientSession, calendar_url: str, uid: str) -> None:
    auth = {"Authorization": aiohttp.encode_basic_auth(RADICALE_USER, RADICALE_PASSWORD)}
    async with http.put(f"{calendar_url}{uid}.ics", data=own_event(uid), headers=auth) as answer:
        assert answer.status == 201


async def read_calendar(http: aiohttp.ClientSession, calendar_url: str) -> list[ParsedEvent]:
    events: list[ParsedEvent] = await calendar_events(http, calendar_url)
    return events


def log_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.exists() else []
