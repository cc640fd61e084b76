"""Rate limits (per mailbox, and the API's per tenant): the values configuration and the
limiters share.

Kept apart from ``syncsvc.queue.ratelimit`` (the mechanism) so that configuration, which
every layer reads, depends on no layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: Share of ``requests`` the bucket may hold (its burst); the sustained rate is the rest.
BURST_SHARE = 0.04

GRAPH_REQUESTS_PER_WINDOW = 10_000
GRAPH_WINDOW_S = 600.0
GRAPH_CONCURRENCY = 4
GOOGLE_REQUESTS_PER_WINDOW = 600
GOOGLE_WINDOW_S = 60.0
GOOGLE_CONCURRENCY = 10
CALDAV_REQUESTS_PER_WINDOW = 20
CALDAV_WINDOW_S = 1.0
CALDAV_CONCURRENCY = 4


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``requests`` per ``per_s`` seconds and ``concurrency`` at once, per mailbox.

    ``burst`` overrides the bucket capacity (default ``BURST_SHARE`` of ``requests``); it must
    stay below ``requests`` so that the bucket still refills.
    """

    requests: int
    per_s: float
    concurrency: int
    burst: int | None = None

    def __post_init__(self) -> None:
        if self.per_s <= 0 or self.concurrency < 1:
            raise ValueError(f"per_s must be positive and concurrency at least 1: {self}")
        if not 1 <= self.capacity < self.requests:
            raise ValueError(f"need 1 <= burst < requests (at least 2 requests): {self}")

    @property
    def capacity(self) -> int:
        """Tokens the bucket holds when full: the largest ``n`` one acquire can take."""
        if self.burst is not None:
            return self.burst
        return max(1, int(self.requests * BURST_SHARE))

    @property
    def refill_per_s(self) -> float:
        """Sustained rate, chosen so that ``capacity + refill_per_s · per_s == requests``."""
        return (self.requests - self.capacity) / self.per_s


GRAPH_LIMIT = RateLimit(GRAPH_REQUESTS_PER_WINDOW, GRAPH_WINDOW_S, GRAPH_CONCURRENCY)
GOOGLE_LIMIT = RateLimit(GOOGLE_REQUESTS_PER_WINDOW, GOOGLE_WINDOW_S, GOOGLE_CONCURRENCY)
CALDAV_LIMIT = RateLimit(CALDAV_REQUESTS_PER_WINDOW, CALDAV_WINDOW_S, CALDAV_CONCURRENCY)
#: Published per-mailbox defaults by provider name; configuration may replace any of them.
DEFAULT_LIMITS: Mapping[str, RateLimit] = {
    "graph": GRAPH_LIMIT,
    "google": GOOGLE_LIMIT,
    "caldav": CALDAV_LIMIT,
}

#: Graph's per-app limit over all tenants and mailboxes (requests per 10 s). Apps have no
#: concurrency cap of their own: the mailboxes' caps apply.
GRAPH_APP_REQUESTS_PER_WINDOW = 130_000
GRAPH_APP_WINDOW_S = 10.0
APP_CONCURRENCY = 1_000_000
GRAPH_APP_LIMIT = RateLimit(GRAPH_APP_REQUESTS_PER_WINDOW, GRAPH_APP_WINDOW_S, APP_CONCURRENCY)


@dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's API quota: ``requests`` per ``window_s``, ``heavy`` requests at once."""

    requests: int
    window_s: int
    heavy: int

    def headers(self, remaining: int, reset_s: int) -> dict[str, str]:
        """The IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers)."""
        return {
            "RateLimit-Policy": f'"tenant";q={self.requests};w={self.window_s}',
            "RateLimit": f'"tenant";r={max(remaining, 0)};t={max(reset_s, 0)}',
        }
