"""Planner benchmark (a script, not a test): wall time and peak memory for big batches.

100,000 targets over 1,000 users in Europe/Copenhagen (country DK, ~10 random days off each,
fixed seed, mode ``users``), and 10,000 targets over 100 users to show how it grows.
Run: ``python bench/planner.py``.
"""

from __future__ import annotations

import random
import resource
import time
import tracemalloc
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from syncsvc.planner import plan
from syncsvc.planner.model import (
    Assignment,
    Contact,
    PlanRequest,
    PlanUser,
    Schedule,
    Target,
    Template,
)

SEED = 20170614
START = date(2027, 3, 1)
DAYS_OFF_PER_USER = 10
DAYS_OFF_SPAN_DAYS = 120


def request(n_targets: int, n_users: int) -> PlanRequest:
    rng = random.Random(SEED)
    users = {
        f"u{i}": PlanUser(
            id=f"u{i}",
            name=f"User Number{i}",
            email=f"u{i}@example.com",
            timezone="Europe/Copenhagen",
            country="DK",
            days_off=frozenset(
                START + timedelta(days=rng.randrange(DAYS_OFF_SPAN_DAYS))
                for _ in range(DAYS_OFF_PER_USER)
            ),
        )
        for i in range(n_users)
    }
    targets = tuple(
        Target(
            id=f"org-{i}",
            name=f"Organisation {i}",
            postcode=f"{1000 + i % 9000}",
            contacts=(Contact(id=f"p-{i}", first_name="Ann", last_name=f"Person{i}"),),
        )
        for i in range(n_targets)
    )
    return PlanRequest(
        targets=targets,
        template=Template(kind="meeting", subject="Visit $account-name$ ($user-name$)"),
        schedule=Schedule(START, timedelta(hours=1), timedelta(minutes=15)),
        assignment=Assignment("users", tuple(users)),
        users=users,
        now=datetime(2027, 2, 26, 12, 0, tzinfo=ZoneInfo("Europe/Copenhagen")),
        targetgroup_name="Bench",
    )


def measure(n_targets: int, n_users: int) -> None:
    req = request(n_targets, n_users)
    plan(request(10, 2))  # warm caches (holidays, zone) outside the measurement
    start = time.perf_counter()
    result = plan(req)
    wall_s = time.perf_counter() - start
    tracemalloc.start()
    plan(req)
    _, peak_b = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    last = max(u.last for u in result.users if u.last is not None)
    print(
        f"{n_targets:>7} targets / {n_users:>5} users: {wall_s:6.3f} s wall, "
        f"peak {peak_b / 2**20:6.1f} MiB traced, last meeting {last}, total {result.total}"
    )


if __name__ == "__main__":
    measure(10_000, 100)
    measure(100_000, 1_000)
    max_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak RSS {max_rss_mib:.1f} MiB (requests, plans and interpreter included)")
