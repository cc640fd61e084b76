"""How many writes one calendar takes at once, learnt from its answers (AIMD).

CalDAV servers that lock a collection while writing it (Xandikos, servers behind a WebDAV lock
manager) answer ``423 Locked`` to overlapping writes. Sending them one at a time is then the
fastest way through; a server that stops refusing gets its parallelism back one write at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

#: Writes in a row answered without a lock before the window opens by one.
GROW_AFTER_SUCCESSES = 8


@dataclass(slots=True)
class AdaptiveWindow:
    """The pure rule: a lock answer closes the window to 1 at once (multiplicative
    decrease); each run of ``grow_after`` unlocked answers opens it by one (additive
    increase), up to ``ceiling``."""

    ceiling: int
    grow_after: int = GROW_AFTER_SUCCESSES
    size: int = field(init=False)
    streak: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.ceiling < 1 or self.grow_after < 1:
            raise ValueError("ceiling and grow_after must be at least 1")
        self.size = self.ceiling

    def locked(self) -> None:
        self.size = 1
        self.streak = 0

    def succeeded(self) -> None:
        if self.size >= self.ceiling:
            return
        self.streak += 1
        if self.streak >= self.grow_after:
            self.size += 1
            self.streak = 0


class AdaptiveGate:
    """An ``asyncio`` gate whose capacity is an ``AdaptiveWindow``: a write waits for a slot
    while ``size`` writes are in flight (those already in flight when it narrows finish)."""

    def __init__(self, ceiling: int, grow_after: int = GROW_AFTER_SUCCESSES) -> None:
        self.window = AdaptiveWindow(ceiling, grow_after)
        self.in_flight = 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < self.window.size)
            self.in_flight += 1
        try:
            yield
        finally:
            async with self._changed:
                self.in_flight -= 1
                self._changed.notify_all()
