"""Prometheus metric objects, one registry per application (tests build many apps).

Other parts (the queue, webhooks) add their metrics as attributes here, so ``/metrics`` shows
everything and the names can be read in one place.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Buckets (seconds) for API latency: a preview of a few hundred activities is well under 1 s.
HTTP_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
EXPOSITION_CONTENT_TYPE = CONTENT_TYPE_LATEST

#: The sync workers' own counters. Process-wide, not per app: workers are built apart from the
#: application, and in ``serve`` both live in this one process, so ``/metrics`` shows them.
WORKER_REGISTRY = CollectorRegistry()
SYNC_OPERATIONS = Counter(
    "syncsvc_sync_operations",
    "Operations the sync workers of this process finished, by provider and outcome "
    "(done, failed = gave up after its attempts, throttled = paused by the provider).",
    ["provider", "outcome"],
    registry=WORKER_REGISTRY,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "syncsvc_http_requests",
            "HTTP requests answered, by route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "syncsvc_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["method", "route"],
            buckets=HTTP_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        #: Set from the outbox at scrape time, so every API process reports the whole queue.
        self.queue_operations = Gauge(
            "syncsvc_queue_operations",
            "Outbox operations by provider, lane and state (pending, running, dead).",
            ["provider", "lane", "state"],
            registry=self.registry,
        )
        self.queue_oldest_pending_age = Gauge(
            "syncsvc_queue_oldest_pending_age_seconds",
            "Age of the oldest pending operation, by provider and lane.",
            ["provider", "lane"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        """The text exposition format served at ``/metrics``."""
        return bytes(generate_latest(self.registry)) + bytes(generate_latest(WORKER_REGISTRY))
