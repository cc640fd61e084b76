"""The queue against the Graph fake over https: several worker processes share one mailbox's
limit through Redis, survive a Redis restart, and ride out throttling and faults, with every
event created exactly once.

The limit is Graph's shape scaled down in time (100 requests per 4 s, 4 at once, instead of
10,000 per 600 s), so a few hundred operations show whether the limit ever gives way. At that
limit the bucket holds 4 tokens, so creates go out as ``$batch`` calls of 4.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import random
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import func, select

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.limits import RateLimit
from syncsvc.runtime import run_workers
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from syncsvc.store.models import ExternalEvent, Operation, SyncCycle
from tests.fakes.graph import FakeGraph, Fault, MailboxStats, ThrottleLimits
from tests.servers.postgres import PostgresServer
from tests.servers.redis import RedisServer

SYNCSVC = str(Path(sys.executable).with_name("syncsvc"))
SECRET_KEY = "queue-test-secret-key-" + "q" * 20
LIMIT_REQUESTS = 100
LIMIT_WINDOW_S = 4.0
LIMIT_CONCURRENCY = 4
#: Every accepted Graph call takes this long, so concurrent calls really overlap at the fake.
FAKE_LATENCY_S = 0.05
WORKER_PROCESSES = 3
DRAIN_TIMEOUT_S = 60.0
_TRANSACTION_RE = re.compile(r"^syncsvc-[0-9a-f-]{36}$")


class CountingGraph(FakeGraph):
    """The fake, also counting creates that reached its store logic, per ``transactionId``,
    and able to mix several kinds of injected faults."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.creates: Counter[str] = Counter()
        self.fault_mix: tuple[Fault, ...] = ()
        self.fault_share = 0.0
        self._mix_rng = random.Random(7)

    async def _create_event(self, req: Any, box: Any, match: Any) -> Any:
        if isinstance(req.body, dict):
            self.creates[str(req.body.get("transactionId"))] += 1
        return await super()._create_event(req, box, match)

    def _next_fault(self, box: Any) -> Fault | None:
        if self.fault_mix and self._mix_rng.random() < self.fault_share:
            return self._mix_rng.choice(self.fault_mix)
        return super()._next_fault(box)


@asynccontextmanager
async def counting_graph(directory: Path) -> AsyncIterator[CountingGraph]:
    fake = CountingGraph(
        limits=ThrottleLimits(
            requests=LIMIT_REQUESTS,
            window_s=LIMIT_WINDOW_S,
            concurrency=LIMIT_CONCURRENCY,
            latency_s=FAKE_LATENCY_S,
        )
    )
    await fake.start(directory)
    try:
        yield fake
    finally:
        await fake.stop()


def graph_env(fake: FakeGraph) -> dict[str, str]:
    """What an operator sets to point syncsvc at a Graph endpoint with its own CA."""
    assert fake.ca_bundle is not None
    return {
        "SYNCSVC_GRAPH_API_URL": fake.graph_url,
        "SYNCSVC_GRAPH_AUTHORITY_URL": fake.authority_url,
        "SYNCSVC_GRAPH_CLIENT_ID": fake.client_id,
        "SYNCSVC_GRAPH_CLIENT_SECRET": fake.client_secret,
        "SYNCSVC_GRAPH_TENANT_ID": fake.tenant_id,
        "SYNCSVC_GRAPH_RATE": f"{LIMIT_REQUESTS}/{LIMIT_WINDOW_S:g}",
        "SYNCSVC_GRAPH_CONCURRENCY": str(LIMIT_CONCURRENCY),
        "SSL_CERT_FILE": str(fake.ca_bundle),
        "REQUESTS_CA_BUNDLE": str(fake.ca_bundle),
    }


@dataclass(slots=True)
class Service:
    client: TestClient[Any, Any]
    db: Database
    headers: dict[str, str]

    async def add_graph_user(self, user_id: str, mailbox: str) -> None:
        answer = await self.client.put(
            f"/v1/users/{user_id}",
            headers=self.headers,
            json={
                "name": user_id,
                "timezone": "Europe/Copenhagen",
                "country": "DK",
                "calendar": {"provider": "graph", "mailbox": mailbox},
            },
        )
        assert answer.status == 200, await answer.text()

    async def commit_batch(self, users: list[str], count: int, name: str) -> str:
        body = {
            "targetgroup_name": name,
            "targets": [{"id": f"{name}-{i}", "name": f"{name} {i}"} for i in range(count)],
            "template": {"kind": "meeting", "subject": "Visit $account-name$"},
            "schedule": {"start_date": "2027-06-07", "duration": "00:30", "interval": "00:15"},
            "assignment": {"mode": "users", "users": users},
        }
        answer = await self.client.post("/v1/batches", headers=self.headers, json=body)
        assert answer.status == 201, await answer.text()
        return str((await answer.json())["id"])

    async def wait_synced(self, batch: str, count: int) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            got = await (await self.client.get(f"/v1/batches/{batch}", headers=self.headers)).json()
            if got["state"] == "synced":
                assert got["sync"]["synced"] == count
                return
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.2)


@asynccontextmanager
async def api(settings: Settings) -> AsyncIterator[Service]:
    db = Database(settings.database_url)
    await db.migrate()
    _, key = await create_tenant(db, "acme")
    try:
        async with TestClient(TestServer(build_app(settings, db))) as client:
            yield Service(client, db, {"Authorization": f"Bearer {key}"})
    finally:
        await db.aclose()


def busiest_window(times: list[float], window_s: float) -> int:
    """The most timestamps in any half-open window ``[t, t + window_s)``."""
    ordered = sorted(times)
    return max(
        (bisect.bisect_left(ordered, t + window_s) - i for i, t in enumerate(ordered)), default=0
    )


def assert_within_limits(stats: MailboxStats) -> None:
    """The mailbox never saw more than the limit in a window nor more than 4 at once, and never
    a request while a Retry-After it had announced was running."""
    assert stats.throttled == 0, stats.throttled_at[:5]
    assert stats.early == 0
    assert stats.max_concurrency <= LIMIT_CONCURRENCY
    assert busiest_window(stats.accepted_at, LIMIT_WINDOW_S) <= LIMIT_REQUESTS


async def assert_exactly_once(fake: CountingGraph, db: Database, mailboxes: list[str]) -> int:
    """Every ledger row synced and every operation done; each event created once at the fake."""
    async with db.session() as s:
        states = dict(
            (await s.execute(select(ExternalEvent.state, func.count()).group_by("state"))).all()
        )
        ops = dict((await s.execute(select(Operation.state, func.count()).group_by("state"))).all())
        event_ids = set((await s.execute(select(ExternalEvent.event_id))).scalars())
    total = sum(states.values())
    assert states == {"synced": total}
    assert ops == {"done": ops.get("done", 0)} and ops["done"] >= total
    events = [e for m in mailboxes for e in fake.mailbox_events(m)]
    assert len(events) == total
    assert {e.id for e in events} == event_ids
    assert len({e.transaction_id for e in events}) == total
    assert all(_TRANSACTION_RE.match(str(e.transaction_id)) for e in events)
    assert set(fake.creates) == {e.transaction_id for e in events}
    assert max(fake.creates.values()) == 1, fake.creates.most_common(3)
    return total


@asynccontextmanager
async def worker_processes(env: dict[str, str], count: int, logs: Path) -> AsyncIterator[list[Any]]:
    """``count`` ``syncsvc worker`` processes; their logs go to ``logs/worker-<n>.log``."""
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    processes = []
    for n in range(count):
        with (logs / f"worker-{n}.log").open("wb") as log:
            processes.append(
                await asyncio.create_subprocess_exec(
                    SYNCSVC, "worker", env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
                )
            )
    try:
        yield processes
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


@pytest.fixture
def base_env() -> Iterator[dict[str, str]]:
    yield {k: v for k, v in os.environ.items() if not k.startswith("SYNCSVC_")}


@pytest.mark.timeout(120)
async def test_three_worker_processes_share_one_mailbox_limit_through_a_redis_restart(
    postgres_server: PostgresServer,
    redis_server: RedisServer,
    redis_url: str,
    base_env: dict[str, str],
    tmp_path: Path,
) -> None:
    database_url = await postgres_server.create_database()
    mailbox = "sales@example.com"
    count = 300
    async with (
        counting_graph(tmp_path / "graph") as fake,
        api(Settings(database_url=database_url, secret_key=SECRET_KEY)) as service,
    ):
        fake.add_mailbox(mailbox, "Europe/Copenhagen")
        await service.add_graph_user("u0", mailbox)
        batch = await service.commit_batch(["u0"], count, "Brewery")
        env = {
            **base_env,
            **graph_env(fake),
            "SYNCSVC_DATABASE_URL": database_url,
            "SYNCSVC_REDIS_URL": redis_url,
            "SYNCSVC_SECRET_KEY": SECRET_KEY,
        }
        async with worker_processes(env, WORKER_PROCESSES, tmp_path / "logs") as processes:
            # Let the workers get going, then take Redis away for a moment mid-run.
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while len(fake.mailbox_events(mailbox)) < count // 3:
                assert time.monotonic() < deadline
                assert all(p.returncode is None for p in processes)
                await asyncio.sleep(0.1)
            done_before_restart = len(fake.mailbox_events(mailbox))
            await asyncio.to_thread(redis_server.restart)
            await service.wait_synced(batch, count)
            assert all(p.returncode is None for p in processes)
        assert done_before_restart < count
        assert await assert_exactly_once(fake, service.db, [mailbox]) == count
        stats = fake.stats(mailbox)
        assert_within_limits(stats)
        # Creates went out as $batch calls: far fewer round trips than events.
        batches = sum(1 for method, path in fake.round_trips if path == "/$batch")
        assert batches >= count // LIMIT_CONCURRENCY - 5
        assert len(fake.round_trips) < count // 2
        # How close the three processes together come to the limit's rate is a figure for
        # bench/queue.py, not an assertion a busy machine could fail.


@pytest.mark.timeout(120)
async def test_throttling_and_faults_on_a_fifth_of_calls_still_create_each_event_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mailboxes = ["a@example.com", "b@example.com"]
    count = 120
    async with counting_graph(tmp_path / "graph") as fake:
        for mailbox in mailboxes:
            fake.add_mailbox(mailbox, "Europe/Copenhagen")
        fake.fault_share = 0.2
        fake.fault_mix = (
            Fault(status=429, retry_after_s=1),  # throttled with Retry-After
            Fault(status=503, retry_after_s=1),  # unavailable, with Retry-After
            Fault(status=504, retry_after_s=None, hang_s=0.5),  # a gateway timeout
        )
        monkeypatch.setenv("SSL_CERT_FILE", str(fake.ca_bundle))
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(fake.ca_bundle))
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'faults.db'}",
            secret_key=SECRET_KEY,
            graph_api_url=fake.graph_url,
            graph_authority_url=fake.authority_url,
            graph_client_id=fake.client_id,
            graph_client_secret=fake.client_secret,
            graph_tenant_id=fake.tenant_id,
            limits={"graph": RateLimit(LIMIT_REQUESTS, LIMIT_WINDOW_S, LIMIT_CONCURRENCY)},
        )
        async with api(settings) as service:
            await service.add_graph_user("u0", mailboxes[0])
            await service.add_graph_user("u1", mailboxes[1])
            batch = await service.commit_batch(["u0", "u1"], count, "Bakery")
            stop = asyncio.Event()
            workers = asyncio.create_task(run_workers(settings, service.db, stop))
            try:
                await service.wait_synced(batch, count)
            finally:
                stop.set()
                await workers
            assert await assert_exactly_once(fake, service.db, mailboxes) == count
            async with service.db.session() as s:
                throttled, failed = (
                    await s.execute(
                        select(func.sum(SyncCycle.throttled), func.sum(SyncCycle.failed))
                    )
                ).one()
                dead = await s.scalar(
                    select(func.count()).select_from(Operation).where(Operation.state == "dead")
                )
        faults = 0
        for mailbox in mailboxes:
            stats = fake.stats(mailbox)
            assert_within_limits(stats)
            faults += stats.faults
        assert faults >= count * 0.1  # the faults really happened, about 1 call in 5
        assert throttled > 0
        assert failed == 0 and dead == 0
