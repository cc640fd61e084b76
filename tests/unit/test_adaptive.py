"""The adaptive window of writes to one calendar: closes to 1 on a lock, reopens slowly."""

from __future__ import annotations

import asyncio

import pytest

from syncsvc.providers._adaptive import AdaptiveGate, AdaptiveWindow


def test_a_lock_closes_the_window_and_runs_of_successes_reopen_it_one_by_one() -> None:
    window = AdaptiveWindow(ceiling=4, grow_after=3)
    assert window.size == 4
    window.locked()
    assert window.size == 1
    sizes = []
    for _ in range(12):
        window.succeeded()
        sizes.append(window.size)
    assert sizes == [1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4]


def test_a_lock_mid_run_starts_the_run_again() -> None:
    window = AdaptiveWindow(ceiling=4, grow_after=3)
    window.locked()
    window.succeeded()
    window.succeeded()
    window.locked()
    window.succeeded()
    window.succeeded()
    assert window.size == 1
    window.succeeded()
    assert window.size == 2


def test_successes_at_the_ceiling_bank_nothing() -> None:
    """A long quiet spell must not let the window jump past 1 straight after a lock."""
    window = AdaptiveWindow(ceiling=2, grow_after=2)
    for _ in range(10):
        window.succeeded()
    window.locked()
    window.succeeded()
    assert window.size == 1


def test_a_window_needs_room() -> None:
    with pytest.raises(ValueError):
        AdaptiveWindow(ceiling=0)


async def test_the_gate_lets_through_as_many_as_the_window_allows() -> None:
    gate = AdaptiveGate(ceiling=3, grow_after=100)
    most = 0

    async def write() -> None:
        nonlocal most
        async with gate.slot():
            most = max(most, gate.in_flight)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(write() for _ in range(9)))
    assert most == 3
    gate.window.locked()
    most = 0
    await asyncio.gather(*(write() for _ in range(4)))
    assert most == 1 and gate.in_flight == 0
