"""One tenant's huge plan must not stall the others: ``/healthz`` and ``POST /webhooks/graph``
latency (p50, p99, max) while ``POST /v1/plans`` with 100,000 targets runs, against a real
``syncsvc api`` process on 127.0.0.1 (SQLite); then, unless ``--no-drain``, a second tenant's
single changes while the first drains 10,000 events (``bench/tenants.py``, its options too).

    python -m bench.isolation [--targets 100000] [--probe-ms 10] [--commit] [--no-drain] …

Graph wants webhook answers within 3 s; the goal here is 50 ms p99. Figures depend on the
machine and its load: run it on an idle one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from bench import tenants
from bench.api import USERS, body
from bench.feed import BIN, free_port, process, wait_ready

GOAL_P99_MS = 50.0


async def probe(
    http: aiohttp.ClientSession, api: str, done: asyncio.Event, every_s: float
) -> dict[str, list[float]]:
    """Latency of each probe (ms) until ``done``."""
    samples: dict[str, list[float]] = {"GET /healthz": [], "POST /webhooks/graph": []}
    while not done.is_set():
        for name, call in (
            ("GET /healthz", lambda: http.get(f"{api}/healthz")),
            (  # Graph's validation handshake: answered without the database
                "POST /webhooks/graph",
                lambda: http.post(f"{api}/webhooks/graph?validationToken=bench"),
            ),
        ):
            started = time.perf_counter()
            async with call() as answer:
                await answer.read()
            samples[name].append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(every_s)
    return samples


def line(name: str, ms: list[float]) -> str:
    ordered = sorted(ms)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    verdict = "ok" if p99 <= GOAL_P99_MS else f"over the {GOAL_P99_MS:.0f} ms goal"
    return (
        f"{name:22s} n={len(ms):5d}  p50={statistics.median(ms):6.1f} ms  "
        f"p99={p99:7.1f} ms  max={ordered[-1]:7.1f} ms  ({verdict})"
    )


async def main(args: argparse.Namespace) -> None:
    await plan_stall(args.targets, args.probe_ms, "/v1/batches" if args.commit else "/v1/plans")
    if not args.no_drain:
        print("a second tenant's single changes while the first drains:")
        await tenants.run(args)


async def plan_stall(targets: int, probe_ms: float, path: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-isolation-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SYNCSVC_DATABASE_URL": f"sqlite:///{tmp / 'syncsvc.db'}",
        "SYNCSVC_PUBLIC_BASE_URL": api,
        "SYNCSVC_SECRET_KEY": "bench-secret-key-" + "s" * 32,
        "SYNCSVC_MAX_BODY_BYTES": str(64 * 1024 * 1024),
    }
    created = await asyncio.create_subprocess_exec(
        str(BIN / "syncsvc"), "tenants", "create", "bench", env=env, stdout=subprocess.PIPE
    )
    out, _ = await created.communicate()
    key = out.decode().strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}
    server = [str(BIN / "syncsvc"), "api", "--host", "127.0.0.1", "--port", str(port)]
    with process(server, tmp / "api.log", env):
        await wait_ready(f"{api}/healthz")
        async with aiohttp.ClientSession() as http:
            for user in (f"u{i}" for i in range(USERS)):
                user_body = {
                    "name": user,
                    "timezone": "Europe/Copenhagen",
                    "country": "DK",
                    "calendar": {"provider": "none"},
                }
                async with http.put(f"{api}/v1/users/{user}", json=user_body, headers=headers) as r:
                    assert r.status == 200, await r.text()
            idle_done = asyncio.Event()
            idle = asyncio.create_task(probe(http, api, idle_done, probe_ms / 1000))
            await asyncio.sleep(2)
            idle_done.set()
            quiet = await idle
            # Serialised here, before the probes start: aiohttp's ``json=`` would do it on this
            # process's loop and stall the probes themselves.
            payload = json.dumps(body(targets)).encode()
            done = asyncio.Event()
            busy = asyncio.create_task(probe(http, api, done, probe_ms / 1000))
            started = time.perf_counter()
            async with http.post(
                f"{api}{path}",
                data=payload,
                headers={**headers, "Content-Type": "application/json"},
            ) as answer:
                status, size = answer.status, len(await answer.read())
            took = time.perf_counter() - started
            done.set()
            loaded = await busy
    print(f"POST {path}, {targets} targets: HTTP {status}, {size / 1e6:.1f} MB, {took:.1f} s")
    print("idle:")
    for name, ms in quiet.items():
        print("  " + line(name, ms))
    print("while the plan runs:")
    for name, ms in loaded.items():
        print("  " + line(name, ms))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=100_000)
    parser.add_argument("--probe-ms", type=float, default=10.0)
    parser.add_argument("--commit", action="store_true", help="POST /v1/batches, not a preview")
    parser.add_argument("--no-drain", action="store_true", help="skip the drain part")
    tenants.add_arguments(parser)
    asyncio.run(main(parser.parse_args()))
