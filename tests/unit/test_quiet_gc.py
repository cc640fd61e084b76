"""Full garbage collections wait for heavy requests to end (``syncsvc/quiet_gc.py``)."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import pytest

from syncsvc import quiet_gc


async def test_no_full_collection_runs_while_a_heavy_request_is_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(quiet_gc, "FULL_EVERY_S", 0.0)
    monkeypatch.setattr(quiet_gc, "CHECK_S", 0.01)
    full: list[float] = []

    def seen(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == 2:
            full.append(time.monotonic())

    before = gc.get_threshold()
    stop = asyncio.Event()
    collector = asyncio.create_task(quiet_gc.collect_when_quiet(stop))
    gc.callbacks.append(seen)
    try:
        await asyncio.sleep(0.1)
        assert gc.get_threshold()[2] > 10**8  # the interpreter starts none of its own
        with quiet_gc.heavy_work():
            full.clear()
            # Plenty of garbage cycles: an interpreter left alone would run full collections.
            for _ in range(300_000):
                a: list[Any] = []
                a.append(a)
            await asyncio.sleep(0.3)
            assert full == []
        deadline = time.monotonic() + 30
        while not full:
            assert time.monotonic() < deadline, "no full collection after the heavy request"
            await asyncio.sleep(0.01)
    finally:
        gc.callbacks.remove(seen)
        stop.set()
        await collector
    assert gc.get_threshold() == before  # handed back
