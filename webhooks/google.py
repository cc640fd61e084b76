"""``POST /webhooks/google``: Google Calendar push notifications.

Google puts everything in headers (the body is empty). The handler reads them, lets
:func:`syncsvc.changes.google.record_notification` verify the channel and token and store
a sync operation, and answers ``200`` at once; the worker does the calendar work. A message
for an unknown channel or with a wrong token is refused with ``403`` (the error middleware
writes the envelope) and never processed. Google retries only failures, so a refused forgery
costs nothing.
"""

from __future__ import annotations

import logging

from aiohttp import web

from syncsvc.api._framework import DB
from syncsvc.changes.google import WEBHOOK_PATH, Notification, record_notification
from syncsvc.errors import BadRequest, ErrorDetail

log = logging.getLogger("syncsvc.webhooks.google")

PATH = WEBHOOK_PATH
#: Headers longer than this are not Google's (channel ids ≤ 64, tokens ≤ 256 characters).
HEADER_MAX_CHARS = 512


def _header(request: web.Request, name: str, *, required: bool = True) -> str:
    value = request.headers.get(name, "")
    if (required and not value) or len(value) > HEADER_MAX_CHARS:
        raise BadRequest(
            "not a Google push notification", [ErrorDetail(("header", name), "missing or too long")]
        )
    return value


def notification_of(request: web.Request) -> Notification:
    number = request.headers.get("X-Goog-Message-Number", "")
    return Notification(
        channel_id=_header(request, "X-Goog-Channel-ID"),
        token=_header(request, "X-Goog-Channel-Token", required=False),
        resource_id=_header(request, "X-Goog-Resource-ID", required=False),
        state=_header(request, "X-Goog-Resource-State"),
        message_number=int(number) if number.isdigit() else None,
    )


async def handle(request: web.Request) -> web.Response:
    note = notification_of(request)
    recorded = await record_notification(request.app[DB], note)
    log.info(
        "event=webhook.google.accepted mailbox=%s state=%s message=%s outcome=%s",
        recorded.mailbox,
        note.state,
        note.message_number,
        recorded.outcome,
    )
    return web.Response(status=200)
