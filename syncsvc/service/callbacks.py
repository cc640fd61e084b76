"""Delivers ``callback`` operations to the tenant's CRM (api-contract.md, "Callbacks to the CRM").

The body is the operation's payload plus ``tenant_id``, as compact JSON, signed per Standard
Webhooks 1.0 with the tenant's own secret (``service/signing.py``): ``webhook-id`` is
``op_<operation id>``, the same on every retry, so the CRM can drop a delivery it already
acknowledged. A 2xx answer is the acknowledgement.

408, 425, 429, 5xx, timeouts and refused connections mean the CRM is not listening now: they
raise ``Throttled`` (with the CRM's ``Retry-After`` when given), which pauses that tenant's
callbacks (``crm:<tenant>``) with a growing backoff and never uses up the operation's
attempts, so a delivery is retried until it is acknowledged, however long the CRM is down
(``Transient`` would give up after the worker's ``MAX_ATTEMPTS``). Any other answer is a
refusal that retrying cannot fix: the operation goes to the dead letter, from which an
operator can retry it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache

import aiohttp

from syncsvc.errors import Permanent, Throttled
from syncsvc.providers._http import parse_retry_after, ssl_context
from syncsvc.providers.egress import REFUSED_FOR_TENANT, GuardedConnector, is_refusal
from syncsvc.queue.worker import TaskContext
from syncsvc.service import signing
from syncsvc.store.crypto import SecretBox
from syncsvc.store.models import Operation, Tenant
from syncsvc.tracing import TRACEPARENT

log = logging.getLogger("syncsvc.callbacks")

CALLBACK_TIMEOUT_S = 10.0
RETRYABLE_STATUSES = frozenset({408, 425, 429})


@lru_cache(maxsize=4)
def box_for(secret_key: str, previous: str | None) -> SecretBox:
    """Key derivation costs a little; one box per secret key serves every delivery."""
    return SecretBox(secret_key, previous)


def callback_body(payload: Mapping[str, object]) -> bytes:
    """The exact bytes sent and signed: the payload without what is ours alone (the trace
    that queued it travels as the request's ``traceparent`` header, not in the body)."""
    body = {k: v for k, v in payload.items() if k != TRACEPARENT}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def message_id(op: Operation) -> str:
    return f"op_{op.id}"


async def deliver_callback(ctx: TaskContext, op: Operation) -> None:
    """Task handler: POSTs one signed callback; returning means the CRM acknowledged it."""
    now = datetime.now(UTC)
    async with ctx.db.session() as s:
        tenant = await s.get(Tenant, op.tenant_id)
        if tenant is None or not tenant.callback_url:
            return  # nobody to tell
        url = tenant.callback_url
        secrets = await signing.signing_secrets(
            s, box_for(ctx.settings.secret_key, ctx.settings.secret_key_previous), op.tenant_id, now
        )
    body = callback_body({**op.payload, "tenant_id": op.tenant_id})
    trace = op.payload.get(TRACEPARENT)
    headers = {
        "Content-Type": "application/json",
        **signing.signed_headers(secrets, message_id(op), body.decode(), now),
        # The CRM's own trace (or the webhook's that led here); with tracing on, the client
        # instrumentation puts the current span's in its place.
        **({TRACEPARENT: trace} if isinstance(trace, str) else {}),
    }
    timeout = aiohttp.ClientTimeout(total=CALLBACK_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(
                timeout=timeout,
                connector=GuardedConnector(ctx.settings.egress, ssl=ssl_context()),
            ) as http,
            http.post(url, data=body, headers=headers, allow_redirects=False) as r,
        ):
            status = r.status
            retry_after_s = parse_retry_after(r.headers.get("Retry-After"))
    except TimeoutError as exc:
        raise Throttled(f"callback timed out after {CALLBACK_TIMEOUT_S} s") from exc
    except aiohttp.ClientError as exc:
        if is_refusal(exc):
            log.warning("event=egress.refused what=callback tenant=%s detail=%s", op.tenant_id, exc)
            raise Permanent(f"callback not sent: {REFUSED_FOR_TENANT}") from exc
        raise Throttled(f"callback failed: {type(exc).__name__}") from exc
    if 200 <= status < 300:
        log.info("event=callback.delivered op=%d tenant=%s status=%d", op.id, op.tenant_id, status)
        return
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise Throttled(f"callback answered HTTP {status}", retry_after_s)
    raise Permanent(f"callback refused with HTTP {status}")
