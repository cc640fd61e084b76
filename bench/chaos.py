"""Longer chaos runs (``tests/e2e/chaos.py``) over several seeds: per seed, the tallies of the
exact verification against the calendars and how long the sync took to move again after each
fault; then the recovery times per kind of fault over all seeds.

    python -m bench.chaos [--seeds 1 2 3] [--users 6] [--batches 4] [--per-batch 100]
                          [--outage-s 20] [--freeze-s 20]

Everything runs on 127.0.0.1 (PostgreSQL, Redis and Radicale are started in a temporary
folder). Radicale slows down past ~200 events per collection; keep ``per-batch × batches /
users`` around that.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from tests.e2e.chaos import Report, Scale, run_chaos


def print_report(report: Report, took_s: float) -> None:
    print(
        f"seed {report.seed}: {'CLEAN' if report.clean else 'PROBLEMS'} in {took_s:.0f} s — "
        f"events {report.events}/{report.expected}, missing {len(report.missing)}, "
        f"doubles {len(report.doubles)}, orphans {len(report.orphans)}, "
        f"stale {len(report.stale)}, deleted batch left {report.deleted_left}, "
        f"failed ops {report.failed_ops}, "
        f"own events {'ok' if report.own_events_ok else 'CHANGED'}, "
        f"exited {report.exited}, settled {report.settle_s:.1f} s after the workload"
    )
    for kind, at_s, recovery_s in report.faults:
        print(f"    {at_s:6.1f} s  {kind:<16} sync moving again after {recovery_s:5.1f} s")
    for line in report.stale[:10]:
        print(f"    stale: {line}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--per-batch", type=int, default=100)
    parser.add_argument("--outage-s", type=float, default=20.0)
    parser.add_argument("--freeze-s", type=float, default=20.0)
    args = parser.parse_args()
    scale = Scale(
        users=args.users,
        batches=args.batches,
        per_batch=args.per_batch,
        outage_s=args.outage_s,
        freeze_s=args.freeze_s,
        settle_timeout_s=600.0,
    )
    recoveries: dict[str, list[float]] = defaultdict(list)
    clean = 0
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="syncsvc-chaos-") as folder:
            started = time.monotonic()
            report = await run_chaos(seed, Path(folder), scale)
            print_report(report, time.monotonic() - started)
        clean += report.clean
        for kind, _, recovery_s in report.faults:
            recoveries[kind].append(recovery_s)
    print(f"\n{clean}/{len(args.seeds)} seeds clean. Sync moving again after a fault (s):")
    for kind, values in sorted(recoveries.items()):
        print(
            f"    {kind:<16} median {statistics.median(values):5.1f}  max {max(values):5.1f}"
            f"  ({len(values)} runs)"
        )


if __name__ == "__main__":
    asyncio.run(main())
