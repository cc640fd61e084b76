"""Liveness, readiness, metrics and the API's own description: no key needed for any."""

from __future__ import annotations

import asyncio

from aiohttp import web
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from syncsvc.api._framework import METRICS, OPENAPI, Ctx, Routes
from syncsvc.errors import DatabaseUnavailable
from syncsvc.metrics import EXPOSITION_CONTENT_TYPE
from syncsvc.service.ops import refresh_queue_metrics

READY_TIMEOUT_S = 2.0

routes = Routes(tag="operations")


class NotReady(DatabaseUnavailable):
    """Readiness failed: a 503 with ``Retry-After``, like every route during an outage."""

    code = "not_ready"


class Status(BaseModel):
    status: str


@routes.endpoint("GET", "/healthz", response=Status, summary="Liveness: 200 once listening")
async def healthz(ctx: Ctx) -> Status:
    return Status(status="ok")


@routes.endpoint(
    "GET",
    "/readyz",
    response=Status,
    summary="Readiness: 200 when the database answers, else 503",
)
async def readyz(ctx: Ctx) -> Status:
    try:
        async with asyncio.timeout(READY_TIMEOUT_S), ctx.session() as session:
            await session.execute(text("SELECT 1"))
    except (TimeoutError, SQLAlchemyError, OSError) as exc:
        raise NotReady("the database does not answer") from exc
    return Status(status="ready")


@routes.endpoint(
    "GET", "/metrics", media_type="text/plain", summary="Prometheus metrics (text exposition)"
)
async def metrics(ctx: Ctx) -> web.Response:
    await refresh_queue_metrics(ctx.db, ctx.request.app[METRICS])
    response = web.Response(body=ctx.request.app[METRICS].exposition())
    response.headers["Content-Type"] = EXPOSITION_CONTENT_TYPE
    return response


@routes.endpoint(
    "GET", "/openapi.json", media_type="application/json", summary="This API as OpenAPI 3.1"
)
async def openapi(ctx: Ctx) -> web.Response:
    return web.json_response(ctx.request.app[OPENAPI])
