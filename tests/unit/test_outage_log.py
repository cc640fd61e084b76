"""One outage, one pair of lines: what an operator greps for after a database restart."""

from __future__ import annotations

import logging

import pytest

from syncsvc.store.db import Outage

CUT = ConnectionError("connection is closed")


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split(" ")[0] for r in caplog.records if r.name == "syncsvc.db"]


def test_a_pooled_connection_failing_just_after_the_restart_is_the_same_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "syncsvc.db")
    outage = Outage()
    outage.down(CUT)
    outage.down(CUT)  # another request, same outage
    outage.up()
    outage.down(CUT)  # a connection held through the restart, used once more
    outage.up()  # the watcher's probe answers at once
    assert lines(caplog) == ["event=db.unavailable", "event=db.back"]


def test_going_away_again_is_logged_when_the_probe_fails_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "syncsvc.db")
    outage = Outage()
    outage.down(CUT)
    outage.up()
    outage.down(CUT)
    outage.down(CUT, probed=True)  # the watcher cannot reach it either: a second outage
    outage.up()
    assert lines(caplog) == ["event=db.unavailable", "event=db.back"] * 2


def test_an_outage_long_after_the_last_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "syncsvc.db")
    outage = Outage()
    outage.down(CUT)
    outage.up()
    outage.back_at -= Outage.STALE_S
    outage.down(CUT)
    outage.up()
    assert lines(caplog) == ["event=db.unavailable", "event=db.back"] * 2
