"""The webhook routes, mounted by ``syncsvc/app.py`` next to the API and listed in its spec.

Webhook paths are public (``access_for``): each provider's message carries its own proof
(Graph ``clientState``, Google channel token), checked by the handlers.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, Field

from syncsvc.api._framework import Ctx, Routes
from webhooks import google, graph

routes = Routes(tag="webhooks")

_GRAPH_DESCRIPTION = (
    "With `validationToken`: the subscription handshake, answered 200 text/plain with the "
    'token. Otherwise a Graph notification body (`{"value": [...]}`): answered 202 once the '
    "valid items are stored (items with an unknown subscription or a wrong `clientState` are "
    "dropped), 403 when no item is valid."
)


@routes.endpoint(
    "POST",
    graph.PATH,
    query=graph.ValidationQuery,
    status=202,
    other_successes=((200, graph.TEXT_PLAIN),),
    error_statuses=(403,),
    summary="Microsoft Graph change notifications",
    description=_GRAPH_DESCRIPTION,
)
async def graph_notifications(ctx: Ctx, query: graph.ValidationQuery) -> web.StreamResponse:
    return await graph.handle(ctx.request, query)


@routes.endpoint(
    "POST",
    graph.LIFECYCLE,
    query=graph.ValidationQuery,
    status=202,
    other_successes=((200, graph.TEXT_PLAIN),),
    error_statuses=(403,),
    summary="Microsoft Graph lifecycle notifications",
    description="Like /webhooks/graph, for `reauthorizationRequired`, `subscriptionRemoved` "
    "and `missed`.",
)
async def graph_lifecycle(ctx: Ctx, query: graph.ValidationQuery) -> web.StreamResponse:
    return await graph.handle(ctx.request, query)


class GoogleHeaders(BaseModel):
    """What a Google push message carries (its body is empty); documented for the spec, read
    again by ``webhooks.google``."""

    channel_id: str = Field(
        alias="X-Goog-Channel-ID", min_length=1, max_length=google.HEADER_MAX_CHARS
    )
    token: str | None = Field(
        default=None, alias="X-Goog-Channel-Token", max_length=google.HEADER_MAX_CHARS
    )
    resource_id: str | None = Field(
        default=None, alias="X-Goog-Resource-ID", max_length=google.HEADER_MAX_CHARS
    )
    state: str = Field(
        alias="X-Goog-Resource-State",
        min_length=1,
        max_length=google.HEADER_MAX_CHARS,
        description="sync, exists or not_exists.",
    )
    message_number: str | None = Field(
        default=None, alias="X-Goog-Message-Number", max_length=google.HEADER_MAX_CHARS
    )


@routes.endpoint(
    "POST",
    google.PATH,
    headers=GoogleHeaders,
    status=200,
    error_statuses=(403,),
    summary="Google Calendar push notifications",
    description="The `X-Goog-*` headers of a push channel (the body is empty): answered 200 "
    "once verified and stored, 403 for an unknown channel or a wrong token.",
)
async def google_notifications(ctx: Ctx, headers: GoogleHeaders) -> web.StreamResponse:
    return await google.handle(ctx.request)
