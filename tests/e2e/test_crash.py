"""``kill -9`` of ``syncsvc serve`` mid-sync loses nothing and duplicates nothing.

The service runs as an operator runs it (one process on a SQLite file) against real CalDAV
calendars in Radicale and in Xandikos. A 150-activity batch is committed over HTTP; the process
is killed at seeded random moments while the events are being created, restarted each time,
and then left to finish: each calendar holds exactly its share of the batch, once (by UID and
by summary), next to the user's own event. Deleting the batch and killing the process
mid-delete still ends with none of our events and every one of the user's own.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.fleet import own_event
from tests.integration.test_cli import KEY_RE, Launcher, Served
from tests.integration.test_sync_caldav import _events as calendar_events
from tests.servers.caldav import NewCalendar
from tests.servers.radicale import RADICALE_PASSWORD, RADICALE_USER

EVENTS = 150
USERS = 3
KILLS_DURING_CREATE = 3
SYNC_TIMEOUT_S = 60.0
#: 8 requests/s per calendar, 24/s over the three users: 150 creates take over 6 s of work
#: besides the restarts, so the kills below (each within 1.2 s of a start) land mid-create
#: even on a fast machine (at the 20/s default a quiet machine finished before the third).
CALDAV_RATE = "8/1"
#: (server, seed): each seed on one server, both servers covered, half the minutes of all six.
RUNS = [("radicale", 11), ("xandikos", 23), ("radicale", 37)]


class Service:
    """One ``syncsvc serve`` at a time on the same database; killed and restarted at will."""

    def __init__(self, env: dict[str, str], http: aiohttp.ClientSession) -> None:
        self.launcher = Launcher(env)
        self.http = http
        self.served: Served | None = None
        self.headers: dict[str, str] = {}

    async def start(self) -> None:
        self.served = await self.launcher.start()
        keys = [line for line in self.served.banner if KEY_RE.fullmatch(line)]
        if keys:  # only the first start on an empty database creates the dev tenant
            self.headers = {"Authorization": f"Bearer {keys[-1]}"}

    async def kill9(self) -> None:
        assert self.served is not None
        self.served.process.kill()  # SIGKILL: no clean-up of any kind
        await self.served.process.wait()
        self.served = None

    def url(self, path: str) -> str:
        assert self.served is not None
        return self.served.base_url + path

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(
            method, self.url(path), json=body, headers=self.headers
        ) as answer:
            return answer.status, await answer.json(content_type=None)

    async def batch(self, batch_id: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/v1/batches/{batch_id}")
        assert status == 200, body
        return dict(body)

    async def wait_state(self, batch_id: str, state: str) -> dict[str, Any]:
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while True:
            got = await self.batch(batch_id)
            if got["state"] == state:
                return got
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.2)

    async def aclose(self) -> None:
        await self.launcher.kill_all()


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("caldav_server", "seed"), RUNS, indirect=["caldav_server"])
async def test_kill_9_mid_create_and_mid_delete_leaves_exactly_the_batch(
    seed: int, caldav_server: NewCalendar, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCSVC_")}
    env.update(
        SYNCSVC_DATABASE_URL=f"sqlite:///{tmp_path / 'syncsvc.db'}",
        SYNCSVC_SECRET_KEY="crash-test-secret-key-" + "c" * 20,
        SYNCSVC_CALDAV_RATE=CALDAV_RATE,
        SYNCSVC_EGRESS_ALLOW=os.environ["SYNCSVC_EGRESS_ALLOW"],
    )
    auth = {"Authorization": aiohttp.encode_basic_auth(RADICALE_USER, RADICALE_PASSWORD)}
    async with aiohttp.ClientSession() as http:
        service = Service(env, http)
        try:
            await service.start()
            assert service.headers, "the first start prints the dev tenant's key"
            calendars = [await caldav_server(http) for _ in range(USERS)]
            for n, url in enumerate(calendars):
                async with http.put(
                    f"{url}own-{n}.ics", data=own_event(f"own-{n}"), headers=auth
                ) as answer:
                    assert answer.status == 201
                status, body = await service.call(
                    "PUT",
                    f"/v1/users/u{n}",
                    {
                        "name": f"User {n}",
                        "timezone": "Europe/Copenhagen",
                        "country": "DK",
                        "calendar": {
                            "provider": "caldav",
                            "url": url,
                            "username": RADICALE_USER,
                            "password": RADICALE_PASSWORD,
                        },
                    },
                )
                assert status == 200, body
            status, body = await service.call(
                "POST",
                "/v1/batches",
                {
                    "targetgroup_name": "Breweries",
                    "targets": [{"id": f"t{i}", "name": f"Brewery {i}"} for i in range(EVENTS)],
                    "template": {"kind": "meeting", "subject": "Visit $account-name$"},
                    "schedule": {
                        "start_date": "2027-06-07",
                        "duration": "00:30",
                        "interval": "00:15",
                    },
                    "assignment": {"mode": "users", "users": [f"u{n}" for n in range(USERS)]},
                },
            )
            assert status == 201, body
            batch = str(body["id"])

            # kill -9 at random moments while the events are being created.
            synced_at_kill = []
            for _ in range(KILLS_DURING_CREATE):
                await asyncio.sleep(rng.uniform(0.3, 1.2))
                synced_at_kill.append((await service.batch(batch))["sync"]["synced"])
                await service.kill9()
                await service.start()
            assert synced_at_kill[-1] < EVENTS, f"the kills came after the create: {synced_at_kill}"
            done = await service.wait_state(batch, "synced")
            assert done["sync"] == {
                "pending": 0,
                "synced": EVENTS,
                "failed": 0,
                "deleting": 0,
                "deleted": 0,
            }

            found = [await calendar_events(http, url) for url in calendars]
            ours = [e for events in found for e in events if e.batch_id == batch]
            assert len(ours) == EVENTS
            assert max(Counter(e.uid for e in ours).values()) == 1
            assert sorted(e.summary for e in ours) == sorted(
                f"Visit Brewery {i}" for i in range(EVENTS)
            )
            assert [len(events) for events in found] == [EVENTS // USERS + 1] * USERS
            for n, events in enumerate(found):
                assert [e.uid for e in events if e.batch_id != batch] == [f"own-{n}"]

            # Delete the batch, kill -9 mid-delete, restart: none of ours is left.
            status, body = await service.call("DELETE", f"/v1/batches/{batch}")
            assert status == 202, body
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            deleted_at_kill = (await service.batch(batch))["sync"]["deleted"]
            await service.kill9()
            await service.start()
            gone = await service.wait_state(batch, "deleted")
            assert gone["sync"]["deleted"] == EVENTS
            assert deleted_at_kill < EVENTS, "the kill came after the delete"
            left = [await calendar_events(http, url) for url in calendars]
            assert [[e.uid for e in events] for events in left] == [
                [f"own-{n}"] for n in range(USERS)
            ]
            assert all(e.summary == "Dentist" for events in left for e in events)
        finally:
            await service.aclose()
