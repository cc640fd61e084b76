"""Cross-cutting HTTP work, outermost first: observe (log + metrics), errors, auth, idempotency.

``errors`` is the ONE place where exceptions become HTTP answers: every answer >= 400 carries
``{"error": {"code", "message", "details"}}``. Bad input is always a 4xx and never logs a
traceback; only an unexpected exception is a 500, logged with its traceback.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from pydantic import ValidationError as PydanticValidationError

from syncsvc.api._framework import (
    DB,
    METRICS,
    SETTINGS,
    TENANT,
    ErrorBody,
    ErrorDetailModel,
    ErrorEnvelope,
    access_for,
    json_response,
)
from syncsvc.api.bodies import validation_error
from syncsvc.api.quota import QUOTA
from syncsvc.dashboard.guard import GUARD, client_of
from syncsvc.errors import (
    DatabaseUnavailable,
    ErrorDetail,
    Forbidden,
    SyncSvcError,
    TooLarge,
    Unauthorized,
    ValidationError,
)
from syncsvc.service import idempotency
from syncsvc.service.tenants import tenant_for_key
from syncsvc.store.db import is_unavailable

log = logging.getLogger("syncsvc.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Error codes for statuses aiohttp raises itself (unknown route, wrong method, too large).
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: TooLarge.code,
    415: "unsupported_media_type",
    422: ValidationError.code,
}
UNMATCHED_ROUTE = "unmatched"
NOT_MODIFIED = 304


def error_response(
    status: int, code: str, message: str, details: Sequence[ErrorDetail] = ()
) -> web.Response:
    envelope = ErrorEnvelope(
        error=ErrorBody(
            code=code,
            message=message,
            details=[ErrorDetailModel(loc=list(d.loc), msg=d.msg) for d in details],
        )
    )
    return json_response(envelope, status=status)


def route_of(request: web.Request) -> str:
    """The route template (``/v1/users/{user_id}``): bounded label values, no ids or tokens."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED_ROUTE


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The metrics per request, and one structured log line per request that is not a
    ``304``; never bodies, paths or keys."""
    started = time.perf_counter()
    response = await handler(request)
    elapsed_s = time.perf_counter() - started
    route = route_of(request)
    metrics = request.app[METRICS]
    metrics.http_requests.labels(request.method, route, str(response.status)).inc()
    metrics.http_latency.labels(request.method, route).observe(elapsed_s)
    if response.status == NOT_MODIFIED:
        # A conditional hit (a feed polled, unchanged) says nothing a log reader needs, and
        # formatting the line is a tenth of its cost; the metrics above still count it.
        return response
    tenant = request.get(TENANT)
    log.info(
        "event=http.request method=%s route=%s status=%d ms=%.1f tenant=%s",
        request.method,
        route,
        response.status,
        elapsed_s * 1000,
        tenant.id if tenant is not None else "-",
    )
    return response


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except DatabaseUnavailable as exc:
        return _unavailable(request, exc)
    except SyncSvcError as exc:
        return error_response(exc.http_status, exc.code, exc.message, exc.details)
    except PydanticValidationError as exc:
        # A model built below the edge (not the request's own): same 422 shape.
        err = validation_error(exc, ())
        return error_response(err.http_status, err.code, err.message, err.details)
    except web.HTTPRequestEntityTooLarge:
        limit_bytes = request.app[SETTINGS].max_body_bytes
        return error_response(
            413,
            TooLarge.code,
            f"the body is larger than {limit_bytes} bytes",
            [ErrorDetail(("body",), f"at most {limit_bytes} bytes")],
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, _HTTP_CODES.get(exc.status, "http_error"), exc.reason)
    except Exception as exc:
        if is_unavailable(exc):
            return _unavailable(request, exc)
        log.exception("event=http.error method=%s route=%s", request.method, route_of(request))
        return error_response(500, "internal_error", "an unexpected error occurred")


def _unavailable(request: web.Request, exc: BaseException) -> web.Response:
    """503 with ``Retry-After`` for any route while the database is away (webhook senders
    retry on 5xx too); one log line per outage, not a traceback per request."""
    request.app[DB].unavailable(exc)
    response = error_response(
        DatabaseUnavailable.http_status,
        exc.code if isinstance(exc, DatabaseUnavailable) else DatabaseUnavailable.code,
        "the database is unavailable for a moment; retry after the Retry-After seconds",
    )
    response.headers["Retry-After"] = str(DatabaseUnavailable.retry_after_s)
    return response


def bearer_key(request: web.Request) -> str | None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer key → tenant; ``/v1/ops`` wants the operator key (a tenant key is a 403)."""
    access = access_for(request.path)
    if access == "public":
        return await handler(request)
    key = bearer_key(request)
    if key is None:
        raise Unauthorized(
            "an API key is required",
            [ErrorDetail(("header", "Authorization"), "expected: Bearer <api key>")],
        )
    if access == "operator":
        # Wrong operator keys count against the client as the dashboard's sign-ins do.
        guard, client = request.app[GUARD], client_of(request)
        wait_s = await guard.attempt(client)
        if wait_s > 0:
            return _too_many("too many wrong operator keys", math.ceil(wait_s), {})
        operator_key = request.app[SETTINGS].operator_key
        if operator_key is not None and hmac.compare_digest(key.encode(), operator_key.encode()):
            await guard.succeeded(client)
            return await handler(request)
    async with request.app[DB].session() as session:
        tenant = await tenant_for_key(session, key)
    if tenant is None:
        raise Unauthorized(
            "the API key is not valid",
            [ErrorDetail(("header", "Authorization"), "unknown key")],
        )
    if access == "operator":
        raise Forbidden("this path needs the operator key")
    request[TENANT] = tenant
    return await handler(request)


@web.middleware
async def idempotent_posts(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Replays the first 2xx answer for a repeated ``Idempotency-Key`` with the same body."""
    key = request.headers.get("Idempotency-Key")
    tenant = request.get(TENANT)
    if request.method != "POST" or key is None or tenant is None or _read_only(request):
        return await handler(request)
    if not 1 <= len(key) <= idempotency.IDEMPOTENCY_KEY_MAX_CHARS or not key.isprintable():
        raise ValidationError(
            "invalid Idempotency-Key",
            [
                ErrorDetail(
                    ("header", "Idempotency-Key"),
                    f"1 to {idempotency.IDEMPOTENCY_KEY_MAX_CHARS} printable characters",
                )
            ],
        )
    db = request.app[DB]
    body = await request.read()
    digest = idempotency.request_hash(request.method, request.path, body)
    stored = await idempotency.begin(db, tenant.id, key, request.method, request.path, digest)
    if stored is not None:
        return web.Response(
            status=stored.status,
            body=None if stored.body is None else stored.body.encode(),
            headers={"Content-Type": stored.content_type} if stored.content_type else None,
        )
    try:
        response = await handler(request)
    except BaseException:
        await idempotency.release(db, tenant.id, key)
        raise
    if 200 <= response.status < 300 and isinstance(response, web.Response):
        body_out = response.body
        text = bytes(body_out).decode() if isinstance(body_out, bytes | bytearray) else None
        await idempotency.finish(
            db, tenant.id, key, response.status, response.headers.get("Content-Type"), text
        )
    else:
        await idempotency.release(db, tenant.id, key)
    return response


def _read_only(request: web.Request) -> bool:
    resource = request.match_info.route.resource
    return resource is not None and resource.canonical in idempotency.READ_ONLY_POSTS


@web.middleware
async def tenant_quota(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The tenant's request quota and heavy-request cap (``api/quota.py``): 429 beyond."""
    tenant = request.get(TENANT)
    if tenant is None:
        return await handler(request)
    quota, store = request.app[SETTINGS].api_quota, request.app[QUOTA]
    taken = await store.take(tenant.id, quota)
    headers = quota.headers(quota.requests - taken.count, taken.reset_s)
    if taken.count > quota.requests:
        message = f"more than {quota.requests} requests in {quota.window_s} s for this tenant"
        return _too_many(message, taken.reset_s, headers)
    endpoint = getattr(request.match_info.handler, "__self__", None)
    if not getattr(endpoint, "heavy", False):
        response = await handler(request)
        response.headers.update(headers)
        return response
    lease = await store.enter(tenant.id, quota)
    if lease is None:
        message = f"this tenant already runs {quota.heavy} plans or commits at once"
        return _too_many(message, HEAVY_RETRY_AFTER_S, headers)
    try:
        response = await handler(request)
    finally:
        await store.leave(tenant.id, lease)
    response.headers.update(headers)
    return response


#: A heavy request takes seconds: try again after a few.
HEAVY_RETRY_AFTER_S = 5


def _too_many(message: str, retry_after_s: int, headers: dict[str, str]) -> web.Response:
    response = error_response(
        429,
        "rate_limited",
        f"{message}; retry after {retry_after_s} s",
        [ErrorDetail(("header", "Authorization"), f"retry after {retry_after_s} s")],
    )
    response.headers.update({**headers, "Retry-After": str(max(retry_after_s, 1))})
    return response


MIDDLEWARES = (observe, errors, auth, tenant_quota, idempotent_posts)
