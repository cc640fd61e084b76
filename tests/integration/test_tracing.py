"""One trace follows an activity from the CRM's request to the provider call (OpenTelemetry
SDK with its in-memory exporter; the service's own instrumentation, as ``OTEL_*`` would turn
it on)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select

from bench.queue import (
    BENCH_SECRET_KEY,
    ThrottledCalendar,
    ThrottledMailbox,
    add_users,
    commit_batch,
    pending,
    provider_factory,
    service,
)
from syncsvc import tracing
from syncsvc.changes.apply import enqueue_callback
from syncsvc.config import Settings
from syncsvc.limits import RateLimit
from syncsvc.queue.outbox import enqueue_task
from syncsvc.queue.ratelimit import MemoryRateLimiter
from syncsvc.queue.worker import TaskContext, Worker
from syncsvc.store.models import Operation, Tenant
from syncsvc.store.states import OpKind

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
LIMIT = RateLimit(100, 1.0, 4)
BODY = {
    "targetgroup_name": "Traced",
    "targets": [{"id": "t1", "name": "Target 1"}, {"id": "t2", "name": "Target 2"}],
    "template": {"kind": "meeting", "subject": "Visit $account-name$"},
    "schedule": {"start_date": "2027-06-07", "duration": "00:30", "interval": "00:15"},
    "assignment": {"mode": "users", "users": ["ann"]},
}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    tracing.enable()
    try:
        yield exporter
    finally:
        tracing.disable()
        processor.shutdown()  # later tests' spans go nowhere


async def test_the_crms_trace_reaches_the_provider_call(
    spans: InMemorySpanExporter, tmp_path: Any
) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'traced.db'}",
        secret_key=BENCH_SECRET_KEY,
        limits={"caldav": LIMIT},
    )
    box = ThrottledMailbox(LIMIT.requests, LIMIT.per_s, LIMIT.concurrency)
    async with service(settings) as (client, db, headers):
        await add_users(client, headers, ["ann"])
        # The CRM's trace. The test's own client is instrumented too (it is in this process),
        # so it sends a child of this context rather than the header verbatim.
        crm = propagate.extract({"traceparent": TRACEPARENT})
        token = context.attach(crm)
        try:
            answer = await client.post("/v1/batches", headers=headers, json=BODY)
        finally:
            context.detach(token)
        assert answer.status == 201, await answer.text()
        untraced = await commit_batch(client, headers, ["ann"], 1)  # a trace of its own
        assert untraced
        worker = Worker(
            settings,
            db,
            MemoryRateLimiter(),
            provider_factory({"ann": ThrottledCalendar(box)}),
            embedded=True,
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            deadline = time.monotonic() + 30
            while await pending(db):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await running
    assert len(box.events) == 3
    finished = spans.get_finished_spans()
    ours = [s for s in finished if format(s.context.trace_id, "032x") == TRACE_ID]
    kinds = {(s.kind, s.name.split(" ")[0]) for s in ours}
    assert (trace.SpanKind.SERVER, "POST") in kinds  # the API's request span continues it
    assert any(
        (s.attributes and "db.statement" in s.attributes) or "db.query.text" in (s.attributes or {})
        for s in ours
    )
    sync = [s for s in ours if s.name.startswith("sync.create")]
    assert len(sync) == 2  # each of the traced batch's creates, in the worker
    assert all(
        s.attributes and s.attributes["syncsvc.mailbox"] == "caldav:http://calendar.invalid/ann/"
        for s in sync
    )
    # The untraced batch's create is a trace of its own.
    others = [s for s in finished if s.name.startswith("sync.create") and s not in sync]
    assert len(others) == 1 and format(others[0].context.trace_id, "032x") != TRACE_ID


async def test_with_tracing_off_operations_still_carry_the_crms_traceparent(
    tmp_path: Any,
) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'plain.db'}", secret_key=BENCH_SECRET_KEY
    )
    async with service(settings) as (client, db, headers):
        await add_users(client, headers, ["ann"])
        answer = await client.post(
            "/v1/batches", headers={**headers, "traceparent": TRACEPARENT}, json=BODY
        )
        assert answer.status == 201, await answer.text()
        await commit_batch(client, headers, ["ann"], 1)
        async with db.session() as s:
            payloads = list(await s.scalars(select(Operation.payload).order_by(Operation.id)))
    assert [p.get("traceparent") for p in payloads] == [TRACEPARENT, TRACEPARENT, None]


async def test_a_task_runs_in_the_trace_that_queued_it_and_carries_it_on(
    spans: InMemorySpanExporter, tmp_path: Any
) -> None:
    """A webhook's sync queued in its request's trace runs in that trace, so the callback it
    queues in turn (here: queued by the handler) carries the same trace to the CRM."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'tasks.db'}", secret_key=BENCH_SECRET_KEY
    )
    seen: list[str | None] = []

    async def handler(ctx: TaskContext, op: Operation) -> None:
        seen.append(tracing.current_traceparent())
        async with ctx.db.session() as s, s.begin():
            enqueue_callback(s, op.tenant_id, {"type": "activity.changed"})

    async with service(settings) as (_, db, _headers):
        async with db.session() as s:
            tenant = await s.scalar(select(Tenant.id))
        assert tenant is not None
        token = context.attach(propagate.extract({"traceparent": TRACEPARENT}))
        try:
            async with db.session() as s, s.begin():
                op = enqueue_task(s, tenant, OpKind.CALDAV_POLL, "caldav:x", {"subscription_id": 1})
        finally:
            context.detach(token)
        assert op.payload["traceparent"] == TRACEPARENT
        worker = Worker(
            settings,
            db,
            MemoryRateLimiter(),
            provider_factory({}),
            embedded=True,
            tasks={OpKind.CALDAV_POLL: handler},
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            deadline = time.monotonic() + 30
            while not seen:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await running
        async with db.session() as s:
            callback = await s.scalar(select(Operation).where(Operation.kind == OpKind.CALLBACK))
    assert seen[0] is not None and seen[0].split("-")[1] == TRACE_ID
    assert callback is not None and callback.payload["traceparent"].split("-")[1] == TRACE_ID
    [task] = [s for s in spans.get_finished_spans() if s.name == "task.caldav_poll"]
    assert format(task.context.trace_id, "032x") == TRACE_ID
