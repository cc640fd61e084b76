"""Microsoft Graph change notifications and delta queries for one mailbox's calendar.

Graph tells us *that* a mailbox's events changed (``POST /subscriptions``); what changed is
read with a delta query (``calendarView/delta``), whose ``@odata.deltaLink`` is the bookmark
for the next round. Both go through the shared :class:`GraphClient` of ``graph.py``.

Facts this relies on (docs/providers.md): creating or renewing a subscription makes Graph
validate the notification URLs first (so the service must be reachable and answer the
``validationToken``); Outlook event subscriptions live at most 10,080 minutes; a delta token
Graph no longer knows answers ``410`` (``syncStateNotFound``) and the sync starts over.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from syncsvc.errors import ProviderNotFound, SyncTokenExpired
from syncsvc.providers.graph import GraphProvider, _read_time, error_for

#: Outlook's maximum lifetime of an event subscription (older docs: 4,230 minutes).
SUBSCRIPTION_MAX_MIN = 10_080
CHANGE_TYPES = "created,updated,deleted"
#: Pages Graph may send before the delta link; a bound against a server that never ends.
DELTA_MAX_PAGES = 1000
DELTA_PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class GraphSubscription:
    id: str
    resource: str
    expires_at: dt.datetime


@dataclass(frozen=True, slots=True)
class DeltaEvent:
    """One event of a delta page; ``removed`` events carry only their id."""

    event_id: str
    removed: bool = False
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    subject: str | None = None
    change_key: str | None = None
    show_as: str | None = None


@dataclass(frozen=True, slots=True)
class DeltaResult:
    events: Sequence[DeltaEvent]
    #: The bookmark for the next delta query.
    delta_link: str
    #: True when the query started without a token (every event in the window was listed).
    full: bool


def _graph_instant(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.0000000Z")


def events_resource(mailbox: str) -> str:
    return f"/users/{quote(mailbox, safe='@.')}/events"


async def subscribe(
    provider: GraphProvider,
    *,
    notification_url: str,
    lifecycle_url: str,
    client_state: str,
    expires_at: dt.datetime,
) -> GraphSubscription:
    """``POST /subscriptions`` for the mailbox's events; Graph validates both URLs first."""
    client = provider.client
    resource = events_resource(provider.mailbox)
    body = {
        "changeType": CHANGE_TYPES,
        "notificationUrl": notification_url,
        "lifecycleNotificationUrl": lifecycle_url,
        "resource": resource,
        "expirationDateTime": _graph_instant(expires_at),
        "clientState": client_state,
    }
    answer = await client.send("POST", client.url("/subscriptions"), body)
    if answer.status != 201 or not isinstance(answer.body, dict) or "id" not in answer.body:
        raise error_for(answer, f"subscribe {provider.mailbox}")
    return GraphSubscription(
        id=str(answer.body["id"]),
        resource=str(answer.body.get("resource") or resource),
        expires_at=_expiry(answer.body, expires_at),
    )


async def renew(
    provider: GraphProvider, subscription_id: str, expires_at: dt.datetime
) -> dt.datetime:
    """``PATCH /subscriptions/{id}`` with a later expiry; ``ProviderNotFound`` if it is gone."""
    client = provider.client
    answer = await client.send(
        "PATCH",
        client.url(f"/subscriptions/{quote(subscription_id, safe='')}"),
        {"expirationDateTime": _graph_instant(expires_at)},
    )
    if answer.status != 200 or not isinstance(answer.body, dict):
        raise error_for(answer, f"renew subscription {subscription_id}")
    return _expiry(answer.body, expires_at)


async def unsubscribe(provider: GraphProvider, subscription_id: str) -> None:
    """``DELETE /subscriptions/{id}``; one that is gone already is done."""
    client = provider.client
    answer = await client.send(
        "DELETE", client.url(f"/subscriptions/{quote(subscription_id, safe='')}")
    )
    if answer.status not in (200, 204, 404):
        raise error_for(answer, f"delete subscription {subscription_id}")


async def delta(
    provider: GraphProvider,
    delta_link: str | None,
    window: tuple[dt.datetime, dt.datetime],
) -> DeltaResult:
    """Every page of a ``calendarView/delta`` round, from ``delta_link`` or from scratch.

    Raises :class:`SyncTokenExpired` when Graph answers 410 for the stored link.
    """
    client = provider.client
    if delta_link is None:
        start, end = window
        url: str | None = client.url(
            f"/users/{quote(provider.mailbox, safe='@.')}/calendarView/delta",
            {"startDateTime": _graph_instant(start), "endDateTime": _graph_instant(end)},
        )
    else:
        url = delta_link
    events: list[DeltaEvent] = []
    for _ in range(DELTA_MAX_PAGES):
        assert url is not None
        answer = await client.send("GET", url)
        if answer.status == 410 and delta_link is not None:
            raise SyncTokenExpired(f"delta of {provider.mailbox}: the token expired")
        if answer.status != 200 or not isinstance(answer.body, dict):
            raise error_for(answer, f"delta of {provider.mailbox}")
        events.extend(
            _delta_event(v) for v in answer.body.get("value") or [] if isinstance(v, dict)
        )
        done = answer.body.get("@odata.deltaLink")
        if isinstance(done, str):
            return DeltaResult(events, done, full=delta_link is None)
        link = answer.body.get("@odata.nextLink")
        if not isinstance(link, str):
            raise ProviderNotFound(f"delta of {provider.mailbox}: neither nextLink nor deltaLink")
        url = link
    raise ProviderNotFound(f"delta of {provider.mailbox}: more than {DELTA_MAX_PAGES} pages")


def _delta_event(item: dict[str, Any]) -> DeltaEvent:
    event_id = str(item.get("id") or "")
    if "@removed" in item:
        return DeltaEvent(event_id, removed=True)
    subject = item.get("subject")
    change_key = item.get("changeKey")
    show_as = item.get("showAs")
    return DeltaEvent(
        event_id,
        start=_read_time(item.get("start")),
        end=_read_time(item.get("end")),
        subject=subject if isinstance(subject, str) else None,
        change_key=change_key if isinstance(change_key, str) else None,
        show_as=show_as if isinstance(show_as, str) else None,
    )


def _expiry(body: dict[str, Any], asked: dt.datetime) -> dt.datetime:
    """Graph's granted expiry (it may shorten what was asked)."""
    text = body.get("expirationDateTime")
    if isinstance(text, str):
        head = text.replace("Z", "+00:00")
        main, dot, rest = head.partition(".")
        if dot:
            digits = "".join(c for c in rest if c.isdigit())
            zone = rest[len(digits) :]
            head = f"{main}.{digits[:6]}{zone}"
        try:
            parsed = dt.datetime.fromisoformat(head)
        except ValueError:
            return asked
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    return asked
