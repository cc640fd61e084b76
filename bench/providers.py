"""How close the real worker keeps real Graph and Google adapters to the providers' limits.

2,000 events (250 per calendar) over 4 Graph mailboxes and 4 Google users, committed as one
batch through the HTTP app and pushed by the real ``Worker`` (SQLite in a temp dir, in-process
limiter) through ``GraphProvider`` (msal + aiohttp, ``$batch``) and ``GoogleProvider``
(google-api-python-client, batch requests) against ``tests/fakes`` running the real limit
*shapes* scaled in time: Graph 10,000 per 600 s and 4 at once becomes 100 per 6 s and 4 at once,
Google 600 per 60 s becomes 60 per 6 s. The fakes enforce those limits; syncsvc is given the same
ones and must stay under them.

Printed per calendar and per provider: the achieved rate over the steady part of the run (the
middle 80 % of accepted calls, so the opening burst and the tail do not count) against the
allowed rate (goal >= 0.95), the share of throttled answers at the fake (goal <= 1 %), HTTP round
trips per event (what batching saves) and the wall time until its last event landed.
``--no-batch`` turns provider batching off (``batch_max = 1`` on both adapter classes, in this
process only) for the comparison.

    python -m bench.providers [--per-calendar 250] [--window-s 6] [--no-batch]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from bench.queue import commit_batch, pending, service
from syncsvc.config import Settings
from syncsvc.limits import RateLimit
from syncsvc.providers.google import GoogleProvider
from syncsvc.providers.graph import GraphProvider
from syncsvc.queue.ratelimit import MemoryRateLimiter
from syncsvc.queue.worker import Worker
from syncsvc.service.connections import UserProviders
from syncsvc.store.crypto import SecretBox
from tests.fakes.google import FakeGoogleConfig, running_fake
from tests.fakes.graph import FakeGraph, ThrottleLimits

BENCH_SECRET_KEY = "bench-providers-secret-key-" + "p" * 20
CALENDARS_PER_PROVIDER = 4
DOMAIN = "brewery.example"
#: Published limits (providers.md) whose shape the run keeps while shrinking the window.
GRAPH_REQUESTS_PER_600_S = 10_000
GOOGLE_REQUESTS_PER_60_S = 600
GRAPH_CONCURRENCY = 4
GOOGLE_CONCURRENCY = 10
#: Time every accepted Graph call takes at the fake, so concurrent calls really overlap.
GRAPH_LATENCY_S = 0.05
#: The drain gives up after this long, whatever state the ledger is in.
DRAIN_TIMEOUT_S = 180.0
DRAIN_POLL_S = 0.25
#: The steady part of a run: accepted calls between these quantiles.
STEADY_FROM = 0.1
STEADY_TO = 0.9
GOAL_RATIO = 0.95
GOAL_THROTTLED_SHARE = 0.01


@dataclass(frozen=True, slots=True)
class CalendarRun:
    """What one calendar's traffic looked like at its fake."""

    name: str
    accepted_at: Sequence[float]
    throttled: int

    @property
    def calls(self) -> int:
        return len(self.accepted_at) + self.throttled

    def steady_rate(self) -> float:
        """Accepted calls per second between the ``STEADY_FROM`` and ``STEADY_TO`` quantiles."""
        times = sorted(self.accepted_at)
        first, last = int(len(times) * STEADY_FROM), int(len(times) * STEADY_TO) - 1
        span = times[last] - times[first] if last > first else 0.0
        return (last - first) / span if span > 0 else 0.0

    def idle_s(self, limit: RateLimit) -> tuple[float, float]:
        """Seconds in which the limiter's bucket sat full (gaps between accepted calls longer
        than it takes to refill it: tokens the worker let overflow), and the longest gap."""
        times = sorted(self.accepted_at)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        refill_s = limit.capacity / limit.refill_per_s
        return sum(max(0.0, g - refill_s) for g in gaps), max(gaps, default=0.0)


@dataclass(frozen=True, slots=True)
class ProviderRun:
    name: str
    limit: RateLimit
    calendars: Sequence[CalendarRun]
    events: int
    round_trips: int
    wall_s: float

    @property
    def allowed_per_s(self) -> float:
        return self.limit.requests / self.limit.per_s


def scaled(requests_per_window: int, window_s: float, scale: float, concurrency: int) -> RateLimit:
    """The published limit with its window shrunk by ``scale``: same burst share, same shape."""
    return RateLimit(max(2, round(requests_per_window / scale)), window_s / scale, concurrency)


async def add_user(
    client: TestClient[Any, Any], headers: dict[str, str], user: str, calendar: dict[str, str]
) -> None:
    body = {"name": user, "timezone": "Europe/Copenhagen", "country": "DK", "calendar": calendar}
    answer = await client.put(f"/v1/users/{user}", headers=headers, json=body)
    assert answer.status == 200, await answer.text()


async def drain(worker: Worker, db: Any) -> float:
    """Runs the worker until the ledger has nothing left to sync; the seconds it took."""
    stop = asyncio.Event()
    started = time.monotonic()
    task = asyncio.create_task(worker.run(stop))
    try:
        while await pending(db):
            if time.monotonic() - started > DRAIN_TIMEOUT_S:
                print(f"!! gave up after {DRAIN_TIMEOUT_S:g} s with {await pending(db)} left")
                break
            await asyncio.sleep(DRAIN_POLL_S)
    finally:
        stop.set()
        await task
    return time.monotonic() - started


def report(run: ProviderRun, started: float) -> None:
    allowed = run.allowed_per_s
    print(
        f"{run.name}: limit {run.limit.requests} per {run.limit.per_s:g} s, "
        f"{run.limit.concurrency} at once (limiter burst {run.limit.capacity}, sustained "
        f"{run.limit.refill_per_s:.2f}/s = {run.limit.refill_per_s / allowed:.3f} of allowed)"
    )
    print(
        f"  {'calendar':<28} {'accepted':>8} {'steady/s':>8} {'allowed/s':>9} {'ratio':>6} "
        f"{'throttled':>9} {'share':>7} {'idle s':>6} {'max gap s':>9}"
    )
    for cal in run.calendars:
        rate = cal.steady_rate()
        share = cal.throttled / cal.calls if cal.calls else 0.0
        idle, gap = cal.idle_s(run.limit)
        print(
            f"  {cal.name:<28} {len(cal.accepted_at):>8} {rate:>8.2f} {allowed:>9.2f} "
            f"{rate / allowed:>6.3f} {cal.throttled:>9} {share:>7.2%} {idle:>6.2f} {gap:>9.2f}"
        )
    ratios = [c.steady_rate() / allowed for c in run.calendars]
    calls = sum(c.calls for c in run.calendars)
    throttled = sum(c.throttled for c in run.calendars)
    share = throttled / calls if calls else 0.0
    mean = sum(ratios) / len(ratios)
    print(
        f"  => achieved/allowed mean {mean:.3f} (min {min(ratios):.3f}; goal >= {GOAL_RATIO}"
        f"{'' if min(ratios) >= GOAL_RATIO else ', MISSED'}), throttled {throttled}/{calls} = "
        f"{share:.2%} (goal <= {GOAL_THROTTLED_SHARE:.0%}"
        f"{'' if share <= GOAL_THROTTLED_SHARE else ', MISSED'}), round trips "
        f"{run.round_trips} for {run.events} events = {run.round_trips / run.events:.3f}/event, "
        f"last event at {run.wall_s - started:.1f} s"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-calendar", type=int, default=250, help="events per calendar")
    parser.add_argument(
        "--window-s", type=float, default=6.0, help="both providers' windows shrink to this"
    )
    parser.add_argument("--no-batch", action="store_true", help="provider batch_max = 1")
    args = parser.parse_args()
    if args.no_batch:
        GraphProvider.batch_max = 1
        GoogleProvider.batch_max = 1
    graph_limit = scaled(GRAPH_REQUESTS_PER_600_S, 600.0, 600.0 / args.window_s, GRAPH_CONCURRENCY)
    google_limit = scaled(GOOGLE_REQUESTS_PER_60_S, 60.0, 60.0 / args.window_s, GOOGLE_CONCURRENCY)
    mailboxes = [f"m{i}@contoso.example" for i in range(CALENDARS_PER_PROVIDER)]
    google_users = [f"g{i}@{DOMAIN}" for i in range(CALENDARS_PER_PROVIDER)]
    with tempfile.TemporaryDirectory(prefix="bench-providers-") as folder:
        root = Path(folder)
        graph = FakeGraph(
            limits=ThrottleLimits(
                requests=graph_limit.requests,
                window_s=graph_limit.per_s,
                concurrency=graph_limit.concurrency,
                latency_s=GRAPH_LATENCY_S,
            )
        )
        await graph.start(root / "graph")
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(graph.stop)
            google = await stack.enter_async_context(
                running_fake(
                    FakeGoogleConfig(
                        quota_requests=google_limit.requests, quota_window_s=google_limit.per_s
                    )
                )
            )
            assert graph.ca_bundle is not None
            os.environ["SSL_CERT_FILE"] = os.environ["REQUESTS_CA_BUNDLE"] = str(graph.ca_bundle)
            key_file = root / "google-sa.json"
            key_file.write_text(
                json.dumps(
                    google.new_service_account(
                        "syncsvc@bench.iam.gserviceaccount.com",
                        delegated_domains=frozenset({DOMAIN}),
                    )
                ),
                encoding="utf-8",
            )
            for mailbox in mailboxes:
                graph.add_mailbox(mailbox, "Europe/Copenhagen")
            settings = Settings(
                database_url=f"sqlite:///{root / 'bench.db'}",
                secret_key=BENCH_SECRET_KEY,
                graph_api_url=graph.graph_url,
                graph_authority_url=graph.authority_url,
                graph_client_id=graph.client_id,
                graph_client_secret=graph.client_secret,
                graph_tenant_id=graph.tenant_id,
                google_api_url=google.api_url,
                google_token_url=google.token_url,
                google_service_account_file=str(key_file),
                limits={"graph": graph_limit, "google": google_limit},
            )
            client, db, headers = await stack.enter_async_context(service(settings))
            users: list[str] = []
            for n, mailbox in enumerate(mailboxes):
                users.append(f"graph{n}")
                await add_user(
                    client, headers, users[-1], {"provider": "graph", "mailbox": mailbox}
                )
            for n, email in enumerate(google_users):
                users.append(f"google{n}")
                await add_user(
                    client, headers, users[-1], {"provider": "google", "calendar_id": email}
                )
            t0 = time.monotonic()
            await commit_batch(client, headers, users, args.per_calendar * len(users))
            commit_s = time.monotonic() - t0
            registry = UserProviders(settings, SecretBox(settings.secret_key), db)
            stack.push_async_callback(registry.aclose)
            worker = Worker(settings, db, MemoryRateLimiter(), registry, embedded=True)
            started = time.monotonic()
            drain_s = await drain(worker, db)
            graph_runs = [
                CalendarRun(m, graph.stats(m).accepted_at, graph.stats(m).throttled)
                for m in mailboxes
            ]
            google_runs = [
                CalendarRun(u, google.stats(u).request_times, google.stats(u).throttled)
                for u in google_users
            ]
            runs = [
                ProviderRun(
                    "graph",
                    graph_limit,
                    graph_runs,
                    sum(len(graph.mailbox_events(m)) for m in mailboxes),
                    len(graph.round_trips),
                    max(max(c.accepted_at, default=started) for c in graph_runs),
                ),
                ProviderRun(
                    "google",
                    google_limit,
                    google_runs,
                    sum(len(google.events(u)) for u in google_users),
                    sum(google.stats(u).http_requests for u in google_users),
                    max(max(c.accepted_at, default=started) for c in google_runs),
                ),
            ]
    print(
        f"{len(users)} calendars x {args.per_calendar} events, batching "
        f"{'off (batch_max 1)' if args.no_batch else 'on'}, Graph latency "
        f"{GRAPH_LATENCY_S * 1000:g} ms; commit {commit_s:.1f} s, drain (wall) {drain_s:.1f} s"
    )
    for run in runs:
        report(run, started)
        assert run.events == args.per_calendar * CALENDARS_PER_PROVIDER, "every event landed"


if __name__ == "__main__":
    asyncio.run(main())
