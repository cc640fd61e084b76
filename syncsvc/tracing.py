"""OpenTelemetry traces: off unless the standard ``OTEL_*`` variables ask for them.

``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, or both comma-separated; unset or ``none``:
off) chooses the exporter; ``OTEL_EXPORTER_OTLP_*``, ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` are read by the SDK as usual. When on, the API's requests
(aiohttp server), every outbound HTTP call (aiohttp client: CalDAV, callbacks, schedules) and
every SQL statement are spans.

One trace follows an activity from the CRM's request to the provider call: the W3C
``traceparent`` of the request (the CRM's own, or ours) is stored in each operation's payload
when the outbox writes it, and the worker's span for that operation continues it (a batched
call links every operation it carries). The trace context travels even with tracing off, so
a CRM that traces sees its ids come back in the workers of a tracing deployment.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from aiohttp import web
from opentelemetry import context, propagate, trace
from opentelemetry.context import Context

TRACEPARENT = "traceparent"
_tracer = trace.get_tracer("syncsvc")
_state = {"on": False}


def configure_from_env() -> bool:
    """Installs the SDK with the exporters ``OTEL_TRACES_EXPORTER`` names; ``False`` if off."""
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n and n != "none"]
    if not names or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": "syncsvc"}))
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER: {name!r} is not otlp, console or none")
    trace.set_tracer_provider(provider)
    enable()
    return True


def enable() -> None:
    """Traces the API's requests, outbound HTTP and the engines made from now on (tests with
    their own SDK provider call this directly, and ``disable`` after)."""
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor

    if not _state["on"]:
        AioHttpClientInstrumentor().instrument()
        AioHttpServerInstrumentor().instrument()  # its middleware in every app made later
        _state["on"] = True


def disable() -> None:
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor

    if _state["on"]:
        AioHttpClientInstrumentor().uninstrument()
        AioHttpServerInstrumentor().uninstrument()
        _state["on"] = False


def instrument_engine(sync_engine: Any) -> None:
    """Spans for every statement of an engine, when tracing is on."""
    if _state["on"]:
        from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
        from opentelemetry.metrics import get_meter

        connections = get_meter("syncsvc").create_up_down_counter("db.client.connections.usage")
        EngineTracer(_tracer, sync_engine, connections)  # type: ignore[no-untyped-call]


def middlewares() -> list[Any]:
    """With tracing off, a middleware that still takes the caller's trace context from the
    request (``traceparent``), so operations carry it; with tracing on, the instrumentation's
    own middleware does that and makes the request's span."""
    return [] if _state["on"] else [_trace_context]


@web.middleware
async def _trace_context(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    token = context.attach(propagate.extract(request.headers))
    try:
        return await handler(request)
    finally:
        context.detach(token)


def current_traceparent() -> str | None:
    """The running trace's W3C ``traceparent``, for an operation to carry; ``None`` outside
    of any trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get(TRACEPARENT)


def _context(traceparent: str | None) -> Context | None:
    return propagate.extract({TRACEPARENT: traceparent}) if traceparent else None


@contextmanager
def operation_span(
    name: str, traceparents: Sequence[str | None], attributes: dict[str, Any]
) -> Iterator[None]:
    """A span for the provider call of one or more operations: the child of the first one's
    trace, linked to the others'."""
    parent = _context(traceparents[0]) if traceparents else None
    links = [
        trace.Link(trace.get_current_span(ctx).get_span_context())
        for tp in traceparents[1:]
        if (ctx := _context(tp)) is not None
    ]
    with _tracer.start_as_current_span(
        name, context=parent, kind=trace.SpanKind.CLIENT, links=links, attributes=attributes
    ):
        yield
