"""The webhook routes, mounted by ``syncsvc/app.py`` next to the API and listed in its spec.

Webhook paths are public (``access_for``): each provider's message carries its own proof
(Graph ``clientState``, Google channel token), checked by the handlers.
"""

from __future__ import annotations

from aiohttp import web

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
    media_type=graph.TEXT_PLAIN,
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
    media_type=graph.TEXT_PLAIN,
    error_statuses=(403,),
    summary="Microsoft Graph lifecycle notifications",
    description="Like /webhooks/graph, for `reauthorizationRequired`, `subscriptionRemoved` "
    "and `missed`.",
)
async def graph_lifecycle(ctx: Ctx, query: graph.ValidationQuery) -> web.StreamResponse:
    return await graph.handle(ctx.request, query)


@routes.endpoint(
    "POST",
    google.PATH,
    status=200,
    error_statuses=(403,),
    summary="Google Calendar push notifications",
    description="The `X-Goog-*` headers of a push channel; the body is empty.",
)
async def google_notifications(ctx: Ctx) -> web.StreamResponse:
    return await google.handle(ctx.request)
