"""One short seed of the chaos run (``tests/e2e/chaos.py``): every kind of fault once, then
every activity exactly once in its calendar with its latest subject, status and time, the
deleted batch gone, no orphans, the users' own events untouched, no process ended."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.chaos import Scale, run_chaos

SEED = 20261202


@pytest.mark.timeout(600)  # about 2 minutes idle; a loaded machine stretches every wait
async def test_a_bad_night_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    report = await run_chaos(SEED, tmp_path, Scale())
    print(report.faults, f"settled in {report.settle_s:.1f} s")  # shown with -s or on failure
    if not report.clean:
        print(*report.unsettled, sep="\n")
        for log in sorted((tmp_path / "logs").iterdir()):
            print(f"--- {log.name} (last lines)", *log.read_text().splitlines()[-30:], sep="\n")
    assert [kind for kind, _, _ in report.faults] and len(report.faults) == 7
    assert report.exited == []
    assert report.unsettled == []
    assert report.missing == []
    assert report.doubles == []
    assert report.orphans == []
    assert report.stale == []
    assert report.deleted_left == 0
    assert report.failed_ops == 0
    assert report.own_events_ok
    assert report.expected == report.events == Scale().per_batch * (Scale().batches - 1)
