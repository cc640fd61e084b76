"""The scheduler against a local CRM targets endpoint (which checks the signature) and real
databases, with an injected clock: one batch per occurrence, exactly once across two
schedulers on PostgreSQL, one run after downtime, retries, DST in Europe/Helsinki, and a
slow tenant held to its share while another tenant's runs go on."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from sqlalchemy import func, select
from standardwebhooks import Webhook, WebhookVerificationError

from syncsvc.config import Settings
from syncsvc.errors import ValidationError
from syncsvc.scheduler import Scheduler, run_scheduler
from syncsvc.service import schedules as service
from syncsvc.service.tenants import create_tenant_with_secret
from syncsvc.service.users import UserSpec, put_user
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, Batch, Schedule, ScheduleRun
from tests.servers.postgres import PostgresServer

SECRET_KEY = "scheduler-test-secret-" + "k" * 32
HELSINKI = "Europe/Helsinki"
#: A Wednesday; Finland moves to summer time on Sunday 2027-03-28 at 01:00 UTC.
WEDNESDAY = datetime(2027, 3, 24, 10, 0, tzinfo=UTC)
MIN_INTERVAL = timedelta(minutes=Settings().schedule_min_interval_minutes)


# --- The CRM's targets endpoint ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    status: int = 200
    body: bytes = b""
    delay_s: float = 0.0
    #: Answer only once the test sets ``FakeCrm.release``: a slow CRM without a clock.
    held: bool = False


def targets_reply(*names: str) -> Reply:
    targets = [{"id": f"org-{i}", "name": name} for i, name in enumerate(names, 1)]
    return Reply(body=json.dumps({"targets": targets}).encode())


@dataclass(frozen=True, slots=True)
class Seen:
    path: str
    signed: bool
    timestamp: int


@dataclass(slots=True)
class FakeCrm:
    """Answers ``GET /targets/<name>`` from a script per name (the last reply repeats) and
    refuses, with 401, a request whose Standard Webhooks signature (over the URL) does not
    verify with a tenant's signing secret. Counts the held requests waiting at once."""

    signing_secrets: list[str] = field(default_factory=list)
    base_url: str = ""
    scripts: dict[str, list[Reply]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    held_now: int = 0
    held_most: int = 0

    def url(self, name: str) -> str:
        return f"{self.base_url}/targets/{name}"

    def script(self, name: str, *replies: Reply) -> str:
        self.scripts[name] = list(replies)
        return self.url(name)

    async def handle(self, request: web.Request) -> web.Response:
        timestamp = request.headers.get("webhook-timestamp", "")
        signed = any(self._verifies(secret, request) for secret in self.signing_secrets)
        self.seen.append(Seen(request.path, signed, int(timestamp or 0)))
        if not signed:
            return web.Response(status=401)
        script = self.scripts[request.match_info["name"]]
        reply = script.pop(0) if len(script) > 1 else script[0]
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.held:
            self.held_now += 1
            self.held_most = max(self.held_most, self.held_now)
            try:
                await self.release.wait()
            finally:
                self.held_now -= 1
        return web.Response(status=reply.status, body=reply.body, content_type="application/json")

    @staticmethod
    def _verifies(secret: str, request: web.Request) -> bool:
        try:
            Webhook(secret).verify(str(request.url), dict(request.headers), json_parse=False)
        except WebhookVerificationError:
            return False
        return True


@pytest_asyncio.fixture
async def crm() -> AsyncIterator[FakeCrm]:
    fake = FakeCrm()
    app = web.Application()
    app.router.add_get("/targets/{name}", fake.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        fake.base_url = str(server.make_url("")).rstrip("/")
        try:
            yield fake
        finally:
            fake.release.set()  # a failed test must not leave requests waiting


# --- The service side ---------------------------------------------------------------------


@dataclass(slots=True)
class FakeClock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


async def make_tenant(db: Database, crm: FakeCrm, name: str = "Helsinki office") -> str:
    """The tenant, whose signing secret the CRM learns as it would: shown at creation."""
    tenant, _, secret = await create_tenant_with_secret(db, name, SecretBox(SECRET_KEY))
    crm.signing_secrets.append(secret)
    async with db.session() as session, session.begin():
        await put_user(
            session,
            SecretBox(SECRET_KEY),
            tenant.id,
            "u1",
            UserSpec(
                name="Aino Virtanen",
                email="aino@example.fi",
                mobile="",
                timezone=HELSINKI,
                country=None,
                subdivision=None,
                days_off=[],
                calendar={"provider": "none"},
            ),
        )
    return tenant.id


MEETINGS = {
    "targetgroup_name": "Not contacted for 90 days",
    "template": {"kind": "meeting", "subject": "Visit $account-name$"},
    "schedule": {"duration": "01:00", "interval": "00:15"},
    "assignment": {"mode": "users", "users": ["u1"]},
}
TASKS = {
    "template": {"kind": "task", "subject": "Call $account-name$", "due_days": 0},
    "schedule": {"duration": "00:30"},
    "assignment": {"mode": "users", "users": ["u1"]},
}


async def make_schedule(
    db: Database,
    tenant_id: str,
    targets_url: str,
    now: datetime,
    cron: str = "0 6 * * *",
    plan: dict[str, Any] | None = None,
) -> str:
    spec = service.ScheduleSpec("weekly", cron, HELSINKI, targets_url, plan or TASKS)
    async with db.session() as session, session.begin():
        row = await service.create(session, tenant_id, spec, now, min_interval=MIN_INTERVAL)
    return row.id


@asynccontextmanager
async def scheduler(
    db: Database, clock: FakeClock, *, max_body_bytes: int = 1 << 20, timeout_s: float = 5.0
) -> AsyncIterator[Scheduler]:
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        s = Scheduler(db, SecretBox(SECRET_KEY), http, clock, max_body_bytes, 16, 2)
        try:
            yield s
        finally:
            await s.aclose()


async def tick(s: Scheduler) -> int:
    """One tick, then its runs to the end: how many it started."""
    started = await s.tick()
    await s.drain()
    return started


async def runs_of(db: Database, schedule_id: str) -> list[ScheduleRun]:
    async with db.session() as session:
        query = select(ScheduleRun).where(ScheduleRun.schedule_id == schedule_id)
        return list(await session.scalars(query.order_by(ScheduleRun.occurrence)))


async def next_run_at(db: Database, schedule_id: str) -> datetime:
    async with db.session() as session:
        row = await session.get(Schedule, schedule_id)
        assert row is not None
        return row.next_run_at


async def activities_of(db: Database, batch_id: str | None) -> list[Activity]:
    async with db.session() as session:
        query = select(Activity).where(Activity.batch_id == batch_id).order_by(Activity.seq)
        return list(await session.scalars(query))


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- Tests --------------------------------------------------------------------------------


async def test_a_due_occurrence_commits_one_batch_with_the_fetched_targets(
    db: Database, crm: FakeCrm
) -> None:
    tenant_id = await make_tenant(db, crm)
    url = crm.script("monday", targets_reply("Alko Oy", "Fazer Oy", "Iittala Oy"))
    schedule_id = await make_schedule(db, tenant_id, url, WEDNESDAY, "0 6 * * mon", MEETINGS)
    # Monday 06:00 in Helsinki, summer time since Sunday: 03:00 UTC.
    monday = utc(2027, 3, 29, 3, 0)
    assert await next_run_at(db, schedule_id) == monday

    clock = FakeClock(monday - timedelta(seconds=1))
    async with scheduler(db, clock) as s:
        assert await tick(s) == 0
        assert crm.seen == []
        clock.now = monday + timedelta(seconds=30)
        sent_at = time.time()
        assert await tick(s) == 1
        assert await tick(s) == 0  # claimed and done: not again

    [run] = await runs_of(db, schedule_id)
    assert (run.occurrence, run.state, run.attempts, run.error) == (monday, "ok", 1, None)
    assert run.finished_at == clock.now and run.batch_id is not None
    assert await next_run_at(db, schedule_id) == monday + timedelta(days=7)
    [request] = crm.seen
    assert request.signed and request.path == "/targets/monday"
    assert abs(request.timestamp - sent_at) < 60

    async with db.session() as session:
        batch = await session.get(Batch, run.batch_id)
    assert batch is not None
    assert (batch.schedule_id, batch.tenant_id, batch.total) == (schedule_id, tenant_id, 3)
    assert batch.targetgroup_name == "Not contacted for 90 days"
    acts = await activities_of(db, run.batch_id)
    # Planned from the run's own day: 09:00, 10:15, then 12:30 after lunch (10:15 + 1:00 +
    # 0:15 = 11:30 would end at 12:30, past the morning window), in UTC+3.
    assert [(a.target_id, a.subject, a.start) for a in acts] == [
        ("org-1", "Visit Alko Oy", utc(2027, 3, 29, 6, 0)),
        ("org-2", "Visit Fazer Oy", utc(2027, 3, 29, 7, 15)),
        ("org-3", "Visit Iittala Oy", utc(2027, 3, 29, 9, 30)),
    ]


async def test_two_schedulers_on_postgres_commit_each_occurrence_once(
    postgres_server: PostgresServer, crm: FakeCrm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="syncsvc.scheduler")
    url = await postgres_server.create_database()
    first, second = Database(url), Database(url)
    await first.migrate()
    occurrences = 4
    try:
        tenant_id = await make_tenant(first, crm)
        schedule_ids = [
            await make_schedule(
                first,
                tenant_id,
                crm.script(f"s{i}", targets_reply("Alko Oy", "Fazer Oy")),
                WEDNESDAY,
                "*/15 * * * *",
            )
            for i in range(3)
        ]
        clock = FakeClock(WEDNESDAY)
        stop = asyncio.Event()
        settings = Settings(database_url=url, secret_key=SECRET_KEY)
        loops = [
            asyncio.create_task(run_scheduler(settings, db, stop, clock=clock, tick_s=0.005))
            for db in (first, second)
        ]
        try:
            for step in range(1, occurrences + 1):
                clock.now = WEDNESDAY + timedelta(minutes=15 * step, seconds=1)
                await _until(lambda n=3 * step: _count_ok(first, n))
        finally:
            stop.set()
            await asyncio.gather(*loops)

        expected = [WEDNESDAY + timedelta(minutes=15 * k) for k in range(1, occurrences + 1)]
        for schedule_id in schedule_ids:
            runs = await runs_of(first, schedule_id)
            assert [r.occurrence for r in runs] == expected
            assert {(r.state, r.attempts) for r in runs} == {("ok", 1)}
        async with first.session() as session:
            batches = list(await session.scalars(select(Batch)))
        assert len(batches) == 3 * occurrences
        assert sorted(b.schedule_id or "" for b in batches) == sorted(schedule_ids * occurrences)
        # Fetched once per occurrence too: the loser of a claim never calls the CRM.
        assert len(crm.seen) == 3 * occurrences and all(s.signed for s in crm.seen)
        # The race really happened: the second claimer hit the unique (schedule, occurrence).
        lost = [r.getMessage() for r in caplog.records if "schedule.claim.lost" in r.getMessage()]
        assert lost and all("why=IntegrityError" in m for m in lost)
    finally:
        await first.aclose()
        await second.aclose()


async def _count_ok(db: Database, wanted: int) -> bool:
    async with db.session() as session:
        query = select(func.count()).select_from(ScheduleRun).where(ScheduleRun.state == "ok")
        return (await session.scalar(query) or 0) >= wanted


async def _until(check: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_after_downtime_a_missed_occurrence_runs_once(db: Database, crm: FakeCrm) -> None:
    tenant_id = await make_tenant(db, crm)
    url = crm.script("daily", targets_reply("Alko Oy"))
    schedule_id = await make_schedule(db, tenant_id, url, WEDNESDAY)
    # Due daily at 04:00 UTC (06:00 EET); down from Thursday until Saturday noon, so the
    # occurrences of Thursday, Friday and Saturday were all missed.
    clock = FakeClock(utc(2027, 3, 27, 12, 0))
    async with scheduler(db, clock) as s:
        assert await tick(s) == 1
        assert await tick(s) == 0
        [run] = await runs_of(db, schedule_id)
        assert (run.occurrence, run.state) == (utc(2027, 3, 27, 4, 0), "ok")
        assert len(crm.seen) == 1
        # Next: Sunday 06:00, already summer time.
        assert await next_run_at(db, schedule_id) == utc(2027, 3, 28, 3, 0)
        clock.now = utc(2027, 3, 28, 3, 0)
        assert await tick(s) == 1
    assert [r.occurrence for r in await runs_of(db, schedule_id)] == [
        utc(2027, 3, 27, 4, 0),
        utc(2027, 3, 28, 3, 0),
    ]
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Batch)) == 2


async def test_a_failing_targets_url_is_recorded_retried_with_backoff_then_succeeds(
    db: Database, crm: FakeCrm
) -> None:
    tenant_id = await make_tenant(db, crm)
    max_bytes = 4096
    url = crm.script(
        "flaky",
        Reply(status=503),
        Reply(body=b"<html>maintenance</html>"),
        Reply(body=json.dumps({"targets": [{"id": "x" * 100, "name": "n"}] * 50}).encode()),
        Reply(
            body=json.dumps(
                {"targets": [{"id": "org-1", "name": "Alko"}, {"id": "org-2"}]}
            ).encode()
        ),
        Reply(delay_s=1.0),
        targets_reply("Alko Oy", "Fazer Oy"),
    )
    schedule_id = await make_schedule(db, tenant_id, url, WEDNESDAY)
    occurrence = utc(2027, 3, 25, 4, 0)
    clock = FakeClock(occurrence)
    expected_errors = [
        "targets_url answered HTTP 503",
        "targets_url answer is not JSON",
        f"targets_url answer is larger than {max_bytes} bytes",
        "the request is not valid (targets.1.name: Field required)",
        "targets_url did not answer in time",
    ]
    async with scheduler(db, clock, max_body_bytes=max_bytes, timeout_s=0.3) as s:
        for attempt, error in enumerate(expected_errors, 1):
            assert await tick(s) == 1
            [run] = await runs_of(db, schedule_id)
            assert (run.state, run.attempts, run.batch_id) == ("retrying", attempt, None)
            assert run.error is not None and run.error.startswith(error), run.error
            # Backoff doubles from a minute: 60, 120, 240, 480, 960 s.
            wait = timedelta(seconds=60 * 2 ** (attempt - 1))
            assert run.next_attempt_at == clock.now + wait
            clock.now += wait - timedelta(seconds=1)
            assert await tick(s) == 0  # not before its time
            clock.now += timedelta(seconds=1)
        assert await tick(s) == 1
    [run] = await runs_of(db, schedule_id)
    assert (run.occurrence, run.state, run.attempts, run.error) == (occurrence, "ok", 6, None)
    assert run.finished_at == clock.now and run.next_attempt_at is None
    assert [a.target_id for a in await activities_of(db, run.batch_id)] == ["org-1", "org-2"]
    assert len(crm.seen) == 6 and all(s.signed for s in crm.seen)


async def test_a_run_fails_after_the_last_attempt_and_the_loop_goes_on(
    db: Database, crm: FakeCrm
) -> None:
    tenant_id = await make_tenant(db, crm)
    broken = await make_schedule(db, tenant_id, crm.script("down", Reply(status=500)), WEDNESDAY)
    empty = await make_schedule(db, tenant_id, crm.script("none", targets_reply()), WEDNESDAY)
    clock = FakeClock(utc(2027, 3, 25, 4, 0))
    async with scheduler(db, clock) as s:
        assert await tick(s) == 2
        for _ in range(service.RUN_MAX_ATTEMPTS - 1):
            clock.now += timedelta(hours=1)  # past every backoff
            assert await tick(s) == 1
        clock.now += timedelta(hours=1)
        assert await tick(s) == 0
    [run] = await runs_of(db, broken)
    assert (run.state, run.attempts, run.next_attempt_at) == ("failed", 6, None)
    assert run.error == "targets_url answered HTTP 500" and run.finished_at is not None
    # No targets this time is a successful run without a batch.
    [quiet] = await runs_of(db, empty)
    assert (quiet.state, quiet.batch_id, quiet.error) == ("ok", None, None)
    assert len(crm.seen) == service.RUN_MAX_ATTEMPTS + 1


async def test_a_dst_week_in_helsinki_runs_at_six_local_every_day(
    db: Database, crm: FakeCrm
) -> None:
    tenant_id = await make_tenant(db, crm)
    url = crm.script("daily", targets_reply("Alko Oy"))
    created = utc(2027, 3, 25, 10, 0)
    schedule_id = await make_schedule(db, tenant_id, url, created)
    clock = FakeClock(created)
    async with scheduler(db, clock) as s:
        for _ in range(7):
            clock.now = await next_run_at(db, schedule_id)
            assert await tick(s) == 1
    runs = await runs_of(db, schedule_id)
    # 06:00 EET is 04:00 UTC; from Sunday 28 March, 06:00 EEST is 03:00 UTC.
    assert [r.occurrence for r in runs] == [
        utc(2027, 3, 26, 4, 0),
        utc(2027, 3, 27, 4, 0),
        *(utc(2027, 3, day, 3, 0) for day in (28, 29, 30, 31)),
        utc(2027, 4, 1, 3, 0),
    ]
    # Each run's task is due on its own local day (due_days 0).
    dues: list[date | None] = []
    for run in runs:
        dues.extend(a.due for a in await activities_of(db, run.batch_id))
    assert dues == [date(2027, 3, d) for d in range(26, 32)] + [date(2027, 4, 1)]


@pytest.mark.parametrize(
    ("cron", "after", "expected"),
    [
        # 03:30 does not exist on 28 March (03:00 → 04:00): it runs at the change, 04:00 EEST.
        ("30 3 * * *", utc(2027, 3, 27, 2, 0), [utc(2027, 3, 28, 1, 0), utc(2027, 3, 29, 0, 30)]),
        # A skipped 03:45 and a real 04:00 on the same day: both at 04:00 EEST, as one run.
        (
            "0,45 3,4 * * *",
            utc(2027, 3, 28, 0, 30),
            [utc(2027, 3, 28, 1, 0), utc(2027, 3, 28, 1, 45)],
        ),
        # 03:30 happens twice on 31 October (04:00 → 03:00): it runs the first time only.
        (
            "30 3 * * *",
            utc(2027, 10, 30, 12, 0),
            [utc(2027, 10, 31, 0, 30), utc(2027, 11, 1, 1, 30)],
        ),
        # Hourly through the gap: the missing 03:00 and 04:00 are one run at 04:00 EEST.
        (
            "0 * * * *",
            utc(2027, 3, 28, 0, 30),
            [utc(2027, 3, 28, 1, 0), utc(2027, 3, 28, 2, 0)],
        ),
    ],
    ids=["spring-gap", "gap-and-after", "autumn-fold", "hourly-gap"],
)
def test_cron_on_helsinki_wall_clock_across_dst(
    cron: str, after: datetime, expected: Sequence[datetime]
) -> None:
    schedule = service.Cron.of(cron, HELSINKI)
    found = [schedule.next_after(after)]
    found.append(schedule.next_after(found[0]))
    assert found == list(expected)
    assert schedule.latest_at_or_before(found[0]) == found[0]
    assert schedule.latest_at_or_before(found[1] - timedelta(seconds=1)) == found[0]


def test_the_latest_occurrence_in_the_repeated_hour_is_the_first_pass() -> None:
    """At 03:29 EET (second pass), 03:30 EEST of the first pass is the latest occurrence."""
    schedule = service.Cron.of("30 3 * * *", HELSINKI)
    assert schedule.latest_at_or_before(utc(2027, 10, 31, 1, 29)) == utc(2027, 10, 31, 0, 30)


async def test_a_crashed_runners_attempt_is_retried_after_its_lease_and_it_writes_nothing(
    db: Database, crm: FakeCrm
) -> None:
    tenant_id = await make_tenant(db, crm)
    url = crm.script("daily", targets_reply("Alko Oy"))
    schedule_id = await make_schedule(db, tenant_id, url, WEDNESDAY)
    occurrence = utc(2027, 3, 25, 4, 0)
    # A runner claims the occurrence and dies before finishing it.
    async with db.session() as session:
        [due] = await service.due_schedules(session, occurrence, 10, 1)
    stale = await service.claim_occurrence(db, due, occurrence)
    assert stale is not None and stale.attempt == 1
    clock = FakeClock(occurrence + timedelta(seconds=service.RUN_LEASE_S - 1))
    async with scheduler(db, clock) as s:
        assert await tick(s) == 0  # still leased
        clock.now += timedelta(seconds=1)
        assert await tick(s) == 1
    [run] = await runs_of(db, schedule_id)
    assert (run.occurrence, run.state, run.attempts) == (occurrence, "ok", 2)
    # The dead runner coming back cannot commit a second batch or overwrite the run.
    assert await service.finish(db, stale, None, clock.now) is None
    assert await service.record_failure(db, stale, "late", clock.now) is None
    [after] = await runs_of(db, schedule_id)
    assert (after.state, after.batch_id, after.error) == ("ok", run.batch_id, None)
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Batch)) == 1


# --- A share per tenant -------------------------------------------------------------------

#: Long enough that only a run ending (not the clock) can wake the loop during a test.
NEVER_S = 3600.0


def runner(
    settings: Settings,
    db: Database,
    clock: FakeClock,
    stop: asyncio.Event,
    tick_s: float = NEVER_S,
) -> asyncio.Task[None]:
    return asyncio.create_task(
        run_scheduler(settings, db, stop, clock=clock, tick_s=tick_s, targets_timeout_s=60)
    )


async def ended(loop: asyncio.Task[None]) -> None:
    """The scheduler loop ends promptly once stopped (never waits for the held CRM)."""
    await asyncio.wait_for(loop, 15)


async def test_a_slow_tenant_runs_within_its_cap_while_another_tenant_runs_at_once(
    db: Database, crm: FakeCrm
) -> None:
    slow = await make_tenant(db, crm, "Slow CRM")
    fast = await make_tenant(db, crm, "Fast CRM")
    # Ten of A's schedules due at 04:00 UTC, B's at 04:05.
    held = Reply(body=targets_reply("Alko Oy").body, held=True)
    slow_ids = [
        await make_schedule(db, slow, crm.script(f"a{i}", held), WEDNESDAY) for i in range(10)
    ]
    fast_id = await make_schedule(
        db, fast, crm.script("b", targets_reply("Fazer Oy")), WEDNESDAY, "5 6 * * *"
    )
    clock = FakeClock(utc(2027, 3, 25, 4, 1))
    settings = Settings(
        secret_key=SECRET_KEY, scheduler_concurrency=16, scheduler_tenant_concurrency=2
    )
    stop = asyncio.Event()
    loop = runner(settings, db, clock, stop, tick_s=0.05)
    try:
        await _until(lambda: _held(crm, 2))
        clock.now = utc(2027, 3, 25, 4, 6)
        await _until(lambda: _states(db, fast_id, ["ok"]))
        # B's run, due after A's started, is done while A's first two still wait at the CRM
        # and the rest wait unclaimed.
        assert crm.held_now == 2
        assert sum([len(await runs_of(db, i)) for i in slow_ids]) == 2
        crm.release.set()
        for schedule_id in slow_ids:
            await _until(lambda i=schedule_id: _states(db, i, ["ok"]))
    finally:
        stop.set()
        await ended(loop)
    # Each due occurrence ran once, with one batch, and A never had more than 2 at once.
    assert crm.held_most == 2
    for schedule_id in [*slow_ids, fast_id]:
        [run] = await runs_of(db, schedule_id)
        assert (run.state, run.attempts, run.batch_id is not None) == ("ok", 1, True)
    assert [r.occurrence for i in slow_ids for r in await runs_of(db, i)] == [
        utc(2027, 3, 25, 4, 0)
    ] * 10
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Batch)) == 11
    assert len(crm.seen) == 11 and all(s.signed for s in crm.seen)


async def _states(db: Database, schedule_id: str, wanted: list[str]) -> bool:
    return [r.state for r in await runs_of(db, schedule_id)] == wanted


async def test_stopping_hands_running_attempts_back_and_the_next_scheduler_runs_them_once(
    db: Database, crm: FakeCrm
) -> None:
    """At most ``concurrency`` at once over every tenant; a stop does not wait for the CRM."""
    first = await make_tenant(db, crm, "First CRM")
    second = await make_tenant(db, crm, "Second CRM")
    held = Reply(body=targets_reply("Alko Oy").body, held=True)
    ids = [
        await make_schedule(db, tenant, crm.script(f"{tenant}-{i}", held), WEDNESDAY)
        for tenant in (first, second)
        for i in range(2)
    ]
    clock = FakeClock(utc(2027, 3, 25, 4, 0))
    settings = Settings(
        secret_key=SECRET_KEY, scheduler_concurrency=3, scheduler_tenant_concurrency=2
    )
    stop = asyncio.Event()
    loop = runner(settings, db, clock, stop)
    await _until(lambda: _held(crm, 3))
    stop.set()
    await ended(loop)
    runs = [run for i in ids for run in await runs_of(db, i)]
    # Handed back unspent and due now; the fourth was never claimed.
    assert [(r.state, r.attempts, r.next_attempt_at) for r in runs] == [
        ("retrying", 0, clock.now)
    ] * 3
    assert crm.held_most == 3

    crm.release.set()
    clock.now += timedelta(seconds=1)
    stop = asyncio.Event()
    loop = runner(settings, db, clock, stop)
    try:
        for schedule_id in ids:
            await _until(lambda i=schedule_id: _states(db, i, ["ok"]))
    finally:
        stop.set()
        await ended(loop)
    for schedule_id in ids:
        [run] = await runs_of(db, schedule_id)
        assert (run.occurrence, run.attempts) == (utc(2027, 3, 25, 4, 0), 1)
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Batch)) == 4
    assert len(crm.seen) == 3 + 4


async def _held(crm: FakeCrm, wanted: int) -> bool:
    return crm.held_now == wanted


@pytest.mark.parametrize(
    ("cron", "minutes"),
    [
        ("*/5 * * * *", 5),
        ("0,1 * * * *", 1),
        ("*/15 * * * *", 15),
        ("0,1 6 1 * *", 1),  # twice on the first of each month, a minute apart
        ("59 23 * * *", 24 * 60),
        ("0,59 0,23 * * *", 1),  # 23:59, then 00:00 the next day
        ("0 6,18 * * mon-fri", 12 * 60),
        ("@hourly", 60),
        ("@weekly", 24 * 60),  # at most a day
    ],
)
def test_the_shortest_gap_of_a_cron_on_the_wall_clock(cron: str, minutes: int) -> None:
    assert service.shortest_gap(cron) == timedelta(minutes=minutes)


async def test_a_cron_more_frequent_than_the_minimum_is_refused(db: Database, crm: FakeCrm) -> None:
    tenant_id = await make_tenant(db, crm)
    with pytest.raises(ValidationError) as refused:
        # Every 14 minutes from :00 is :56, then :00 again.
        await make_schedule(db, tenant_id, crm.url("x"), WEDNESDAY, "*/14 * * * *")
    [detail] = refused.value.details
    assert detail.loc == ("cron",)
    assert detail.msg == "fires 4 minutes apart; schedules may fire at most every 15 minutes"


async def test_one_tenants_many_due_schedules_never_hide_another_tenants(
    db: Database, crm: FakeCrm
) -> None:
    crowded = await make_tenant(db, crm, "Crowded CRM")
    other = await make_tenant(db, crm, "Other CRM")
    for i in range(5):
        await make_schedule(db, crowded, crm.url(f"c{i}"), WEDNESDAY)
    await make_schedule(db, other, crm.url("o"), WEDNESDAY, "5 6 * * *")
    async with db.session() as session:
        due = await service.due_schedules(session, utc(2027, 3, 25, 4, 6), 3, 2)
        everything = await service.due_schedules(session, utc(2027, 3, 25, 4, 6), 100, 100)
    # Three rows read: two of the crowded tenant (its share), then the other's, though four
    # more of the crowded tenant's are due longer.
    assert [d.tenant_id for d in due] == [crowded, crowded, other]
    assert [d.tenant_id for d in everything] == [crowded] * 5 + [other]
