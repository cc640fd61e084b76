"""``POST /webhooks/graph`` (and ``/webhooks/graph/lifecycle``): Microsoft Graph notifications.

Two kinds of request arrive here:

- the **validation handshake**: when a subscription is created or renewed, Graph POSTs with
  ``?validationToken=…`` and needs ``200``, ``text/plain``, the token as the body, within 10 s;
- **notifications**: ``{"value": [{"subscriptionId", "clientState", "changeType" | "lifecycleEvent",
  …}]}``. :func:`syncsvc.changes.graph.record_notifications` checks every item's
  ``clientState`` and stores the work; the answer is ``202`` at once (Graph wants it within
  3 s), or ``403`` when no item is valid. Forged items are never processed.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from syncsvc.api._framework import DB
from syncsvc.changes.graph import (
    LIFECYCLE_PATH,
    WEBHOOK_PATH,
    NotificationItem,
    record_notifications,
)
from syncsvc.errors import BadRequest, ErrorDetail

log = logging.getLogger("syncsvc.webhooks.graph")

PATH = WEBHOOK_PATH
LIFECYCLE = LIFECYCLE_PATH
#: Graph sends up to a few hundred items per request; more is not Graph.
ITEMS_MAX = 1000
FIELD_MAX_CHARS = 512
TEXT_PLAIN = "text/plain"
#: NUL and lone surrogates: valid JSON, but no database can store or compare them.
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


class ValidationQuery(BaseModel):
    validationToken: str | None = Field(
        default=None,
        max_length=4096,
        description="Sent by Graph when it validates the URL; echoed as text/plain.",
    )


def _text(item: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = item.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or len(value) > FIELD_MAX_CHARS or _BAD_CHARS.search(value):
        raise BadRequest(
            "not a Graph notification", [ErrorDetail(("body", "value", name), "missing or invalid")]
        )
    return value


def parse_items(raw: bytes) -> list[NotificationItem]:
    """The items of a notification body; anything that is not Graph's shape is a 400."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("the body is not valid JSON", [ErrorDetail(("body",), str(exc))]) from exc
    values = data.get("value") if isinstance(data, dict) else None
    if not isinstance(values, list) or not 1 <= len(values) <= ITEMS_MAX:
        raise BadRequest(
            "not a Graph notification",
            [ErrorDetail(("body", "value"), f"a list of 1 to {ITEMS_MAX} notifications")],
        )
    items = []
    for value in values:
        if not isinstance(value, dict):
            raise BadRequest(
                "not a Graph notification", [ErrorDetail(("body", "value"), "objects")]
            )
        items.append(
            NotificationItem(
                subscription_id=_text(value, "subscriptionId", required=True) or "",
                client_state=_text(value, "clientState", required=False) or "",
                change_type=_text(value, "changeType", required=False),
                lifecycle_event=_text(value, "lifecycleEvent", required=False),
            )
        )
    return items


async def handle(request: web.Request, query: ValidationQuery) -> web.Response:
    if query.validationToken is not None:
        # Echo only: no lookup, so the handshake is answered in well under Graph's 10 s.
        return web.Response(
            text=query.validationToken,
            content_type=TEXT_PLAIN,
            headers={"X-Content-Type-Options": "nosniff"},
        )
    raw = await request.read()
    # An empty POST is no notification of ours: refused like a forged one (403), not a 400.
    items = parse_items(raw) if raw.strip() else []
    recorded = await record_notifications(request.app[DB], items)
    log.debug(  # the access log has a line per request already
        "event=webhook.graph.accepted accepted=%d rejected=%d queued=%d",
        recorded.accepted,
        recorded.rejected,
        recorded.queued,
    )
    return web.Response(status=202)
