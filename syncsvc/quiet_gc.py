"""Full garbage collections at quiet moments only, in the processes that serve HTTP.

On Python 3.11 a full (generation 2) collection walks every live object with the GIL held.
While a heavy request holds a 100,000-target plan (millions of objects), each automatic one
took 0.1–1.6 s and found nothing to free, stalling every other tenant's requests and Graph's
webhooks meanwhile (``bench/isolation.py``). So automatic full collections are switched off
(young ones go on as usual), the objects alive after start-up are left out of collections for
good (``gc.freeze``), and a full collection runs every ``FULL_EVERY_S`` when no heavy request
is in flight, or after ``FULL_MAX_S`` whatever runs: cycles are still freed, at a moment when
the heap is small.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Iterator

log = logging.getLogger("syncsvc.gc")

FULL_EVERY_S = 30.0
FULL_MAX_S = 600.0
CHECK_S = 1.0
#: A generation-2 threshold no count reaches: no automatic full collection.
_NEVER = 1_000_000_000

_heavy_in_flight = 0


@contextlib.contextmanager
def heavy_work() -> Iterator[None]:
    """Marks a heavy request (a large plan) in flight: no full collection starts meanwhile."""
    global _heavy_in_flight
    _heavy_in_flight += 1
    try:
        yield
    finally:
        _heavy_in_flight -= 1


async def collect_when_quiet(stop: asyncio.Event) -> None:
    """Takes over full collections from the interpreter until ``stop``, then hands them back."""
    gen0, gen1, gen2 = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0, gen1, _NEVER)
    last = time.monotonic()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CHECK_S)
            since = time.monotonic() - last
            if (since >= FULL_EVERY_S and _heavy_in_flight == 0) or since >= FULL_MAX_S:
                started = time.perf_counter()
                found = gc.collect()
                last = time.monotonic()
                log.debug(
                    "event=gc.full found=%d ms=%.0f", found, (time.perf_counter() - started) * 1000
                )
    finally:
        gc.set_threshold(gen0, gen1, gen2)
        gc.unfreeze()
