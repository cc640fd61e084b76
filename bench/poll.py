"""What polling unchanged CalDAV calendars costs (a script, not a test).

A real Radicale gets ``--calendars`` collections with one event each; every calendar is listed
once (the first, full poll), then every one is polled again with nothing changed, through
``sync-collection`` and through the ``getctag`` fallback. Prints requests and milliseconds per
calendar for the unchanged polls, which is what a deployment pays every
``SYNCSVC_CALDAV_POLL_MINUTES`` per connected calendar.

    python -m bench.poll [--calendars 1000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from syncsvc.providers.base import EventSpec
from syncsvc.providers.caldav import CalDAVProvider, CollectionChanges
from tests.servers.radicale import RADICALE_PASSWORD, RADICALE_USER, RadicaleServer, new_calendar

GOAL_REQUESTS_PER_CALENDAR = 1.0


async def _each(
    items: list[Any], concurrency: int, work: Callable[[Any], Awaitable[Any]]
) -> list[Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(item: Any) -> Any:
        async with gate:
            return await work(item)

    return await asyncio.gather(*(one(item) for item in items))


async def run(calendars: int, concurrency: int) -> None:
    requests: list[str] = []

    async def counted(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
        requests.append(params.method)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(counted)
    with tempfile.TemporaryDirectory() as folder:
        server = RadicaleServer(Path(folder))
        server.start()
        try:
            async with aiohttp.ClientSession(trace_configs=[trace]) as http:
                urls = await _each(
                    list(range(calendars)),
                    concurrency,
                    lambda _: new_calendar(http, server.url),
                )
                providers = [
                    CalDAVProvider(url, RADICALE_USER, RADICALE_PASSWORD, http) for url in urls
                ]
                start = datetime(2027, 6, 14, 9, 0, tzinfo=UTC)
                spec = EventSpec(
                    key="visit",
                    activity_id="a",
                    batch_id="b",
                    subject="Visit",
                    start=start,
                    end=start + timedelta(hours=1),
                    timezone="UTC",
                )
                await _each(providers, concurrency, lambda p: p.create(spec))
                for method in ("sync-collection", "ctag"):

                    async def first(p: CalDAVProvider, method: str = method) -> CollectionChanges:
                        if method == "ctag":
                            return await p.changes_by_ctag(None)
                        return await p.changes(None)

                    states = [found.state for found in await _each(providers, concurrency, first)]
                    del requests[:]
                    began = time.perf_counter()
                    found = await _each(
                        list(zip(providers, states, strict=True)),
                        concurrency,
                        lambda pair: pair[0].changes(pair[1]),
                    )
                    elapsed = time.perf_counter() - began
                    assert all(not f.changed and not f.removed for f in found)
                    per = len(requests) / calendars
                    print(
                        f"{method:>15}: {calendars} unchanged calendars polled in {elapsed:.2f} s"
                        f" ({elapsed / calendars * 1000:.2f} ms and {per:.2f} requests per"
                        f" calendar, {concurrency} at once; goal <= "
                        f"{GOAL_REQUESTS_PER_CALENDAR:.0f} request)"
                    )
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calendars", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(run(args.calendars, args.concurrency))


if __name__ == "__main__":
    main()
