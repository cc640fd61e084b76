"""The worker's two queue queries at scale, on PostgreSQL: finding due mailboxes and claiming a
chunk of one, with ``--pending`` operations over ``--mailboxes`` waiting and ``--done`` ones
kept (issue 15's goal: each ≤ 10 ms at 1,000,000 pending / 10,000 mailboxes / 5,000,000 done).

    .venv/bin/python -m bench.queue_scale [--pending 1000000] [--done 5000000]
                                          [--mailboxes 10000] [--tenants 100]

Rows are made by the server itself (``generate_series``), so filling takes seconds per million
and none of our CPU. The queries timed are the worker's own (``Worker._due_mailboxes``,
``Worker._claim``), called as the worker calls them; the plan of each is printed with
``EXPLAIN (ANALYZE, BUFFERS)`` on the statement and parameters SQLAlchemy sent. The claim is
timed twice more, without the ``operations`` UPDATE trigger that keeps ``queue_mailboxes`` (a
claim never makes work due earlier, yet fires it), and the plan of its UPDATE shows the
trigger's own time.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, event, text

from syncsvc.config import Settings
from syncsvc.queue.ratelimit import MemoryRateLimiter
from syncsvc.queue.worker import Worker
from syncsvc.store.db import Database
from syncsvc.store.migrate import upgrade
from tests.servers.postgres import start_postgres

BENCH_SECRET_KEY = "bench-queue-scale-secret-key-" + "q" * 16
GOAL_MS = 10.0
RUNS = 30
#: Migration 0007's statement trigger on UPDATE of ``operations``.
UPDATE_TRIGGER = "operations_due_updated"


async def fill(db: Database, args: argparse.Namespace) -> None:
    """Tenants, then done operations, then pending ones spread evenly over the mailboxes (a
    few interactive), then statistics."""
    async with db.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO tenants "
                "(id, name, api_key_hash, closing_days, return_origins, created_at) "
                "SELECT 't' || i, 'tenant ' || i, md5('k' || i), '[]', '[]', now() "
                "FROM generate_series(0, :n - 1) i"
            ),
            {"n": args.tenants},
        )
        for state, count in (("done", args.done), ("pending", args.pending)):
            await conn.execute(
                text(
                    "INSERT INTO operations (tenant_id, kind, mailbox, lane, state, attempts, "
                    "not_before, payload, created_at, updated_at) "
                    "SELECT 't' || (i % :m % :t), 'create', 'caldav:box-' || (i % :m), "
                    "CASE WHEN i % 97 = 0 THEN 'interactive' ELSE 'bulk' END, :state, 0, "
                    "now() - interval '1 minute', '{}', now(), now() "
                    "FROM generate_series(0, :n - 1) i"
                ),
                {"m": args.mailboxes, "t": args.tenants, "state": state, "n": count},
            )
    async with db.engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("VACUUM ANALYZE operations"))


def capture() -> list[tuple[str, Any]]:
    """Every statement any engine sends (the worker's urgent pool is an engine of its own),
    with its parameters, for EXPLAIN."""
    sent: list[tuple[str, Any]] = []

    @event.listens_for(Engine, "before_cursor_execute")
    def _sent(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        sent.append((statement, params))

    return sent


async def timed(call: Callable[[], Awaitable[object]], runs: int = RUNS) -> list[float]:
    times: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1000)
    return times


async def explain(db: Database, statement: str, params: Any) -> str:
    """The plan as run, rolled back (an UPDATE's rows and its triggers' writes too)."""
    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        transaction = driver.transaction()
        await transaction.start()
        try:
            rows = await driver.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", *(params or ()))
        finally:
            await transaction.rollback()
    return "\n".join(f"    {row[0]}" for row in rows)


async def update_trigger(db: Database, enabled: bool) -> None:
    action = "ENABLE" if enabled else "DISABLE"
    async with db.engine.begin() as conn:
        await conn.execute(text(f"ALTER TABLE operations {action} TRIGGER {UPDATE_TRIGGER}"))


def figures(name: str, times: list[float]) -> str:
    p50 = statistics.median(times)
    p95 = sorted(times)[int(len(times) * 0.95) - 1]
    verdict = "meets" if p50 <= GOAL_MS else "misses"
    return f"{name}: median {p50:.1f} ms, p95 {p95:.1f} ms ({verdict} the {GOAL_MS:g} ms goal)"


async def run(args: argparse.Namespace) -> None:
    server = start_postgres()
    try:
        url = await server.create_database()
        settings = Settings(database_url=url, secret_key=BENCH_SECRET_KEY)
        db = Database(url)
        await upgrade(db.engine)
        started = time.perf_counter()
        await fill(db, args)
        filled_s = time.perf_counter() - started
        print(
            f"filled {args.pending:,} pending over {args.mailboxes:,} mailboxes of "
            f"{args.tenants} tenants and {args.done:,} done in {filled_s:.0f} s"
        )
        worker = Worker(settings, db, MemoryRateLimiter(), providers=None, embedded=False)  # type: ignore[arg-type]
        sent = capture()

        due_times = await timed(worker._due_mailboxes)
        due_sql = next(s for s in reversed(sent) if "LATERAL" in s[0])
        rng = random.Random(7)

        async def claim() -> None:
            box = rng.randrange(args.mailboxes)
            tenant = f"t{box % args.tenants}"
            await worker._claim(tenant, f"caldav:box-{box}", 20)

        claim_times = await timed(claim)
        claim_sql = next(s for s in reversed(sent) if "FOR UPDATE SKIP LOCKED" in s[0])
        lease, params = next(s for s in reversed(sent) if "RETURNING operations.id" in s[0])
        # Explained later, its claim is held: as of a time past the lease, the UPDATE takes
        # the same rows again, as a renewal does (never due earlier: the trigger writes none).
        as_of = int(re.search(r"not_before <= \$(\d+)", lease)[1]) - 1  # type: ignore[index]
        later = [p + timedelta(hours=1) if i == as_of else p for i, p in enumerate(params)]
        lease_sql = (lease, later)
        await update_trigger(db, enabled=False)
        untriggered = await timed(claim)
        await update_trigger(db, enabled=True)
        triggered = await timed(claim)
        print(figures("due mailboxes", due_times))
        print(figures("claim 20 of one mailbox", claim_times))
        print(
            figures("  the same, again", triggered)
            + "\n"
            + figures(f"  the same without {UPDATE_TRIGGER}", untriggered)
        )
        if args.plans:
            print("plan, due mailboxes:\n" + await explain(db, *due_sql))
            print("plan, claim:\n" + await explain(db, *claim_sql))
            print("plan, the claim's UPDATE (and its trigger):\n" + await explain(db, *lease_sql))
        await db.aclose()
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pending", type=int, default=1_000_000)
    parser.add_argument("--done", type=int, default=5_000_000)
    parser.add_argument("--mailboxes", type=int, default=10_000)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--no-plans", dest="plans", action="store_false")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
