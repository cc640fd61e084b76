"""The operator dashboard: one server-rendered page, its script and style, and the JSON
behind it (polled every two seconds).

``/dashboard…`` passes the API's tenant auth untouched, so every handler here checks the
operator itself (``session.is_operator``): the operator key as a bearer, or the session cookie
that signing in with that key sets. Without it the page is the sign-in form and the JSON and
actions answer 401: there is no open admin page. After too many wrong keys every check of a
key answers 429 with ``Retry-After`` for a while (``session.check_key``). Actions take JSON
bodies only, which a form on another site cannot send without a CORS preflight; with the
SameSite=Strict cookie that keeps them from being forged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cache, wraps
from importlib import resources
from typing import ParamSpec, TypeVar
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import BaseModel, Field

from syncsvc.api._framework import Ctx, Routes
from syncsvc.api.middleware import bearer_key, error_response
from syncsvc.api.ops import (
    CycleOut,
    DeadOut,
    LaneOut,
    RetryIn,
    RetryOut,
    cycle_out,
    dead_out,
    lane_out,
)
from syncsvc.api.plan_schemas import SyncCountsOut, instant
from syncsvc.dashboard import session as auth
from syncsvc.errors import ErrorDetail, Forbidden, Unauthorized
from syncsvc.service import ops as service
from syncsvc.service.batches import SyncCounts
from syncsvc.store.types import utcnow

routes = Routes(tag="dashboard")

POLL_INTERVAL_MS = 2000
HTML = "text/html"
#: Everything is served by us: no inline script, no other origin, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ASSET_TYPES = {"app.js": "text/javascript", "login.js": "text/javascript", "style.css": "text/css"}
#: What a handler that compares a key may answer besides 401.
KEY_STATUSES = (429,)

P = ParamSpec("P")
R = TypeVar("R")


@cache
def _asset(name: str) -> str:
    return resources.files("syncsvc.dashboard").joinpath(name).read_text(encoding="utf-8")


def _html(body: str) -> web.Response:
    return web.Response(text=body, content_type=HTML, charset="utf-8", headers=SECURITY_HEADERS)


def _throttled(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R | web.Response]]:
    """``TooManySignIns`` as a 429 with ``Retry-After``, which the error middleware gives only
    to outages."""

    @wraps(handler)
    async def answer(*args: P.args, **kwargs: P.kwargs) -> R | web.Response:
        try:
            return await handler(*args, **kwargs)
        except auth.TooManySignIns as exc:
            response = error_response(exc.http_status, exc.code, exc.message, exc.details)
            response.headers["Retry-After"] = str(exc.retry_after_s)
            return response

    return answer


def _not_operator() -> Unauthorized:
    return Unauthorized(
        "the dashboard needs the operator key",
        [ErrorDetail(("header", "Authorization"), "Bearer <operator key>, or sign in")],
    )


async def _require_operator(ctx: Ctx) -> None:
    if not await auth.is_operator(ctx.request, ctx.settings):
        raise _not_operator()


# --- Models of data.json -------------------------------------------------------------------


class PointOut(BaseModel):
    t: str
    done: float
    failed: float
    throttled: float


class ChartOut(BaseModel):
    bucket_s: int
    points: list[PointOut]


class UserProgressOut(BaseModel):
    id: str
    name: str
    sync: SyncCountsOut


class BatchProgressOut(BaseModel):
    id: str
    tenant_id: str
    tenant_name: str
    targetgroup_name: str
    state: str
    total: int
    created_at: str
    sync: SyncCountsOut
    users: list[UserProgressOut]


class HealthOut(BaseModel):
    mailbox: str
    provider: str
    status: str = Field(description="ok | throttled | failing | reconnect_needed")
    last_cycle_at: str | None
    last_error: str | None
    dead: int
    users: list[str]


class DashboardOut(BaseModel):
    now: str
    poll_interval_ms: int
    cycles: list[CycleOut]
    chart: ChartOut
    lanes: list[LaneOut]
    dead_total: int
    dead: list[DeadOut]
    batches: list[BatchProgressOut]
    health: list[HealthOut]


class LoginIn(BaseModel):
    key: str = Field(min_length=1, max_length=1000)


class SignedIn(BaseModel):
    ok: bool


def _counts(sync: SyncCounts) -> SyncCountsOut:
    return SyncCountsOut(
        pending=sync.pending,
        synced=sync.synced,
        failed=sync.failed,
        deleting=sync.deleting,
        deleted=sync.deleted,
    )


def dashboard_out(snap: service.Snapshot) -> DashboardOut:
    return DashboardOut(
        now=instant(snap.now) or "",
        poll_interval_ms=POLL_INTERVAL_MS,
        cycles=[cycle_out(c) for c in snap.cycles],
        chart=ChartOut(
            bucket_s=service.CHART_BUCKET_S,
            points=[
                PointOut(
                    t=instant(b.start) or "", done=b.done, failed=b.failed, throttled=b.throttled
                )
                for b in snap.chart
            ],
        ),
        lanes=[lane_out(depth, snap.now) for depth in snap.lanes],
        dead_total=snap.dead_total,
        dead=[dead_out(op) for op in snap.dead],
        batches=[
            BatchProgressOut(
                id=b.id,
                tenant_id=b.tenant_id,
                tenant_name=b.tenant_name,
                targetgroup_name=b.targetgroup_name,
                state=b.state,
                total=b.total,
                created_at=instant(b.created_at) or "",
                sync=_counts(b.sync),
                users=[
                    UserProgressOut(id=u.id, name=u.name, sync=_counts(u.sync)) for u in b.users
                ],
            )
            for b in snap.batches
        ],
        health=[
            HealthOut(
                mailbox=h.mailbox,
                provider=h.provider,
                status=h.status,
                last_cycle_at=instant(h.last_cycle_at),
                last_error=h.last_error,
                dead=h.dead,
                users=h.users,
            )
            for h in snap.health
        ],
    )


async def _snapshot(ctx: Ctx) -> DashboardOut:
    async with ctx.session() as session:
        return dashboard_out(await service.snapshot(session, utcnow()))


def _embed(data: DashboardOut) -> str:
    """JSON safe inside ``<script type="application/json">`` (no ``</script>`` can close it)."""
    text = data.model_dump_json()
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# --- Pages ---------------------------------------------------------------------------------


@routes.endpoint(
    "GET",
    "/dashboard",
    media_type=HTML,
    summary="Operator dashboard (the sign-in form without the operator key)",
    error_statuses=KEY_STATUSES,
)
@_throttled
async def dashboard_page(ctx: Ctx) -> web.Response:
    """Needs the operator key as a bearer or the session cookie from signing in; otherwise it
    is the sign-in form and shows nothing else."""
    if not await auth.is_operator(ctx.request, ctx.settings):
        if bearer_key(ctx.request) is not None:
            raise _not_operator()
        return _html(_asset("login.html"))
    data = await _snapshot(ctx)
    return _html(_asset("page.html").replace("{{initial}}", _embed(data)))


@routes.endpoint("GET", "/dashboard/login", media_type=HTML, summary="Dashboard sign-in form")
async def dashboard_login_form(ctx: Ctx) -> web.Response:
    return _html(_asset("login.html"))


@routes.endpoint(
    "POST",
    "/dashboard/login",
    body=LoginIn,
    response=SignedIn,
    summary="Sign in to the dashboard with the operator key",
    error_statuses=KEY_STATUSES,
)
@_throttled
async def dashboard_login(ctx: Ctx, body: LoginIn) -> web.StreamResponse:
    """Opens a session and sets its HttpOnly, SameSite=Strict cookie; a wrong key is a 401,
    and after a few of them a 429 with ``Retry-After``, which does not compare the key."""
    if not await auth.check_key(ctx.request, ctx.settings, body.key):
        raise Unauthorized(
            "that is not the operator key", [ErrorDetail(("body", "key"), "wrong key")]
        )
    response = web.json_response({"ok": True}, headers={"Cache-Control": "no-store"})
    await auth.sign_in(response, ctx.request, ctx.settings)
    return response


@routes.endpoint("POST", "/dashboard/logout", status=204, summary="Sign out of the dashboard")
async def dashboard_logout(ctx: Ctx) -> web.StreamResponse:
    """Ends the session on the server: a copy of the cookie no longer signs in."""
    response = web.Response(status=204)
    await auth.sign_out(response, ctx.request, ctx.settings)
    return response


@routes.endpoint(
    "GET",
    "/dashboard/data.json",
    response=DashboardOut,
    summary="Everything the dashboard shows, for polling",
    error_statuses=KEY_STATUSES,
)
@_throttled
async def dashboard_data(ctx: Ctx) -> DashboardOut:
    """Sync cycles, the throughput chart, queue depth, failures, batches of every tenant and
    connection health. Operator key or session cookie."""
    await _require_operator(ctx)
    return await _snapshot(ctx)


@routes.endpoint(
    "POST",
    "/dashboard/retry",
    body=RetryIn,
    response=RetryOut,
    summary="Retry dead operations from the dashboard",
    error_statuses=(403, *KEY_STATUSES),
)
@_throttled
async def dashboard_retry(ctx: Ctx, body: RetryIn) -> RetryOut:
    """As ``POST /v1/ops/retry``, authenticated like the page."""
    await _require_operator(ctx)
    origin = ctx.request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != ctx.request.host:
        raise Forbidden("cross-origin request refused", [ErrorDetail(("header", "Origin"), origin)])
    return RetryOut(retried=await service.retry(ctx.db, None if body.all else body.ids))


def _asset_handler(name: str) -> None:
    async def serve(ctx: Ctx) -> web.Response:
        return web.Response(
            text=_asset(name),
            content_type=ASSET_TYPES[name],
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
        )

    serve.__name__ = "dashboard_" + name.replace(".", "_")
    routes.endpoint("GET", f"/dashboard/{name}", media_type=ASSET_TYPES[name], summary=name)(serve)


for _name in ASSET_TYPES:
    _asset_handler(_name)
