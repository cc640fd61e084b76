"""``/v1/users/{user_id}/feed`` (the secret URL) and ``/feeds/{token}.ics`` (the feed itself).

The feed path is public (``access_for``): the unguessable token is the credential.
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, Field

from syncsvc.api._framework import Ctx, Routes
from syncsvc.api.users import UserPath
from syncsvc.service import feeds as service
from syncsvc.store.types import utcnow

routes = Routes(tag="feeds")

ICAL_MEDIA_TYPE = "text/calendar"
#: How long a subscriber may reuse a feed without asking; short, because a committed change
#: must show in the feed at once and asking again is a cheap 304.
FEED_MAX_AGE_S = 60
TOKEN_MAX_CHARS = 200


class FeedOut(BaseModel):
    url: str = Field(description="The secret feed URL; the previous one stopped working.")


class FeedPath(BaseModel):
    token: str = Field(min_length=1, max_length=TOKEN_MAX_CHARS)


class FeedQuery(BaseModel):
    tasks: Literal["todos", "events"] = Field(
        "todos",
        description="``events``: tasks as all-day VEVENTs, for Outlook and Google "
        "subscriptions, which ignore VTODO.",
    )


@routes.endpoint(
    "POST",
    "/v1/users/{user_id}/feed",
    path=UserPath,
    response=FeedOut,
    summary="Create or rotate the user's secret iCal feed URL",
)
async def rotate_feed(ctx: Ctx, path: UserPath) -> FeedOut:
    """A new unguessable URL; the old one answers 404 from now on."""
    async with ctx.session() as session, session.begin():
        token = await service.rotate(session, ctx.tenant_id, path.user_id)
    return FeedOut(url=service.feed_url(ctx.settings.public_base_url, token))


@routes.endpoint(
    "DELETE",
    "/v1/users/{user_id}/feed",
    path=UserPath,
    status=204,
    summary="Revoke the user's iCal feed",
)
async def revoke_feed(ctx: Ctx, path: UserPath) -> None:
    """Revoking twice is fine."""
    async with ctx.session() as session, session.begin():
        await service.revoke(session, ctx.tenant_id, path.user_id)


@routes.endpoint(
    "GET",
    "/feeds/{token}.ics",
    path=FeedPath,
    query=FeedQuery,
    media_type=ICAL_MEDIA_TYPE,
    summary="The user's activities as an iCalendar feed (RFC 5545)",
)
async def get_feed(ctx: Ctx, path: FeedPath, query: FeedQuery) -> web.StreamResponse:
    """Needs no API key. Activities starting (tasks: due) from ``SYNCSVC_FEED_DAYS_BACK``
    days before today to ``SYNCSVC_FEED_DAYS_AHEAD`` after; meetings and calls are VEVENTs,
    tasks VTODOs (all-day VEVENTs with ``?tasks=events``); cancelled activities and those of
    deleted batches (for 30 days) are STATUS:CANCELLED, without alarms. Answers ``304`` to
    an ``If-None-Match`` holding the current strong ``ETag``."""
    window = service.FeedWindow(ctx.settings.feed_days_back, ctx.settings.feed_days_ahead)
    state = await service.current_state(ctx.db, path.token, utcnow(), window)
    if query.tasks == "events":
        state = state.with_tasks_as_events()
    headers = {"ETag": state.etag, "Cache-Control": f"private, max-age={FEED_MAX_AGE_S}"}
    if etag_matches(ctx.request.headers.get("If-None-Match"), state.etag):
        return web.Response(status=304, headers=headers)
    body = await service.feed_body(ctx.db, state)
    return web.Response(body=body, headers=headers, content_type=ICAL_MEDIA_TYPE, charset="utf-8")


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 §13.1.2: ``*`` or any listed tag equal under weak comparison."""
    if if_none_match is None:
        return False
    opaque = etag.removeprefix("W/")
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == opaque:
            return True
    return False
