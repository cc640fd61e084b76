"""Every Redis key syncsvc uses, in one place, so the keyspace can be read at a glance.

Redis only coordinates (architecture decision 1): every key here may vanish (restart, eviction,
``FLUSHALL``) without losing work, and every per-mailbox key carries a TTL so nothing lingers.

Per-mailbox keys wrap the mailbox in a Redis Cluster hash tag (``{...}``): the limiter's Lua
scripts touch all three keys of one mailbox at once, which Cluster allows only when they hash to
one slot. Whatever the mailbox contains, the tag is the same for all three keys because it runs
from our ``{`` to the first ``}`` after it.
"""

from __future__ import annotations

PREFIX = "syncsvc:"

#: Token bucket of one mailbox: its GCRA "theoretical arrival time" in server microseconds.
RATE_PREFIX = PREFIX + "rl:"
#: Concurrency slots of one mailbox: sorted set of lease id → expiry (server microseconds).
CONCURRENCY_PREFIX = PREFIX + "conc:"
#: Retry-After pause of one mailbox: exists (with a PX TTL) while the mailbox is paused.
PAUSE_PREFIX = PREFIX + "pause:"
#: Pub/sub channel the dispatcher uses to wake idle workers when new operations are due.
WAKE_CHANNEL = PREFIX + "wake"


def rate_key(mailbox: str) -> str:
    return f"{RATE_PREFIX}{{{mailbox}}}"


def concurrency_key(mailbox: str) -> str:
    return f"{CONCURRENCY_PREFIX}{{{mailbox}}}"


def pause_key(mailbox: str) -> str:
    return f"{PAUSE_PREFIX}{{{mailbox}}}"
