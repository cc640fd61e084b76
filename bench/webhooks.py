"""Webhook benchmark: how many Graph notifications ``POST /webhooks/graph`` acknowledges per
second, and the latency of each acknowledgement (goal: >= 1,000/s, p99 <= 50 ms; Graph drops
endpoints slower than 3 s).

The real application (middlewares, clientState check against the stored hash, the pending
``graph_sync`` look-up and insert) serves on 127.0.0.1 in a child process, without workers, so
the figures are the webhook's alone; the client runs in this process with ``--concurrency``
requests in flight. Two loads:

- ``burst``: notifications for 50 mailboxes (a batch's worth of changes); after the first per
  mailbox a sync is already waiting, so most requests read and do not write;
- ``spread``: every notification for another mailbox, so every request inserts an operation.

A fresh SQLite file by default; PostgreSQL too when ``SYNCSVC_BENCH_PG_URL`` names an empty
database.

    python bench/webhooks.py [--requests 4000] [--concurrency 16]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# top-level ``webhooks`` package that the application imports.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import multiprocessing
import os
import secrets
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Any

import aiohttp
from aiohttp import web

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.service.tenants import create_tenant
from syncsvc.store.crypto import hash_token
from syncsvc.store.db import Database
from syncsvc.store.models import Subscription
from syncsvc.store.types import utcnow

BURST_MAILBOXES = 50
SECRET_KEY = "bench-webhooks-secret-key-" + "b" * 20
READY_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(database_url: str, port: int) -> None:
    """The child process: the API application only (no workers)."""
    settings = Settings(database_url=database_url, secret_key=SECRET_KEY, port=port)

    async def app() -> web.Application:
        db = Database(database_url)
        application = build_app(settings, db)

        async def close(_: web.Application) -> None:
            await db.aclose()

        application.on_cleanup.append(close)
        return application

    web.run_app(app(), host="127.0.0.1", port=port, access_log=None, print=None)


async def _seed(database_url: str, mailboxes: int) -> list[tuple[str, str]]:
    """A tenant and ``mailboxes`` subscriptions; returns (subscription id, clientState)."""
    db = Database(database_url)
    await db.migrate()
    tenant, _ = await create_tenant(db, f"bench-{secrets.token_hex(4)}")
    subs: list[tuple[str, str]] = []
    async with db.session() as s, s.begin():
        for n in range(mailboxes):
            external_id, secret = secrets.token_hex(16), secrets.token_urlsafe(32)
            s.add(
                Subscription(
                    provider="graph",
                    tenant_id=tenant.id,
                    user_id=f"u{n}",
                    calendar=f"user{n}@contoso.example",
                    external_id=external_id,
                    client_state=hash_token(secret),
                    resource_id=f"/users/user{n}@contoso.example/events",
                    expires_at=utcnow() + timedelta(days=7),
                )
            )
            subs.append((external_id, secret))
    await db.aclose()
    return subs


def _notification(sub: tuple[str, str], n: int) -> dict[str, Any]:
    external_id, secret = sub
    return {
        "value": [
            {
                "subscriptionId": external_id,
                "subscriptionExpirationDateTime": "2027-06-20T11:00:00.0000000Z",
                "changeType": "updated",
                "resource": f"Users/x/Events/AAMk{n}",
                "resourceData": {
                    "@odata.type": "#Microsoft.Graph.Event",
                    "@odata.id": f"Users/x/Events/AAMk{n}",
                    "@odata.etag": 'W/"DwAAABYAAAA"',
                    "id": f"AAMk{n}",
                },
                "clientState": secret,
                "tenantId": "11111111-2222-3333-4444-555555555555",
            }
        ]
    }


async def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url + "/healthz") as answer:
                    if answer.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the benchmark server did not start")
            await asyncio.sleep(0.1)


async def _load(
    url: str, subs: list[tuple[str, str]], requests: int, concurrency: int
) -> tuple[float, list[float]]:
    """Sends ``requests`` notifications, ``concurrency`` at a time; wall time and latencies."""
    bodies = [_notification(subs[n % len(subs)], n) for n in range(requests)]
    latencies: list[float] = []
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def client() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                async with http.post(url + "/webhooks/graph", json=body) as answer:
                    await answer.read()
                    if answer.status != 202:
                        raise RuntimeError(f"answered {answer.status}")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench(database_url: str, label: str, requests: int, concurrency: int) -> None:
    for load, mailboxes in (("burst", BURST_MAILBOXES), ("spread", requests)):
        subs = await _seed(database_url, mailboxes)
        port = _free_port()
        server = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(database_url, port), daemon=True
        )
        server.start()
        try:
            url = f"http://127.0.0.1:{port}"
            await _wait_ready(url)
            await _load(url, subs, min(200, requests), concurrency)  # warm-up
            wall_s, latencies = await _load(url, subs, requests, concurrency)
        finally:
            server.terminate()
            server.join()
        ordered = sorted(latencies)
        print(
            f"{label:<10} {load:<7} requests={requests:<6} concurrency={concurrency:<3} "
            f"rate={requests / wall_s:8.0f}/s median={statistics.median(ordered) * 1000:6.1f} ms "
            f"p99={_quantile(ordered, 0.99) * 1000:6.1f} ms max={ordered[-1] * 1000:6.1f} ms"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as folder:
        await bench(f"sqlite:///{folder}/bench.db", "sqlite", args.requests, args.concurrency)
    pg_url = os.environ.get("SYNCSVC_BENCH_PG_URL")
    if pg_url:
        await bench(pg_url, "postgresql", args.requests, args.concurrency)


if __name__ == "__main__":
    asyncio.run(main())
