"""Activities: one at a time, many at once, a batch's list (JSON pages or CSV), follow-ups."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from aiohttp import web
from pydantic import BaseModel, Field

from syncsvc.api._framework import Ctx, Routes
from syncsvc.api.batches import BatchPath
from syncsvc.api.pagination import ExportQuery, csv_response, cursor_key, encode_cursor
from syncsvc.api.plan_schemas import (
    ActivitiesPatch,
    ActivitiesPatchedOut,
    ActivityListOut,
    ActivityOut,
    ActivityPatch,
    ExternalOut,
    FollowUpBody,
    instant,
)
from syncsvc.api.plans import body_errors, clock_of
from syncsvc.service import activities as service
from syncsvc.service.activities import ActivityView, FollowUp
from syncsvc.service.plans import parse_span

routes = Routes(tag="activities")

CSV_HEADER = (
    "id",
    "batch_id",
    "target_id",
    "user_id",
    "kind",
    "start",
    "end",
    "due",
    "subject",
    "description",
    "status",
    "follow_up_of",
    "external_provider",
    "external_event_id",
    "external_state",
)


class ActivityPath(BaseModel):
    activity_id: str = Field(min_length=1, max_length=64)


def activity_out(view: ActivityView) -> ActivityOut:
    ext = view.external
    return ActivityOut(
        id=view.id,
        batch_id=view.batch_id,
        target_id=view.target_id,
        user_id=view.user_id,
        kind=view.kind,
        start=instant(view.start),
        end=instant(view.end),
        due=view.due,
        subject=view.subject,
        description=view.description,
        status=view.status,
        follow_up_of=view.follow_up_of,
        external=None
        if ext is None
        else ExternalOut(provider=ext.provider, event_id=ext.event_id, state=ext.state),
        location=view.location,
        priority=view.priority,
        reminder_minutes=view.reminder_minutes,
        version=view.version,
        user_edited=view.user_edited,
    )


def csv_row(view: ActivityView) -> Sequence[object]:
    ext = view.external
    return (
        view.id,
        view.batch_id,
        view.target_id,
        view.user_id,
        view.kind,
        instant(view.start),
        instant(view.end),
        view.due.isoformat() if view.due else None,
        view.subject,
        view.description,
        view.status,
        view.follow_up_of,
        ext.provider if ext else None,
        ext.event_id if ext else None,
        ext.state if ext else None,
    )


@routes.endpoint(
    "GET",
    "/v1/batches/{batch_id}/activities",
    path=BatchPath,
    query=ExportQuery,
    response=ActivityListOut,
    media_type="text/csv",
    summary="A batch's activities, in target order (JSON pages, or ?format=csv: all)",
)
async def list_batch_activities(
    ctx: Ctx, path: BatchPath, query: ExportQuery
) -> ActivityListOut | web.StreamResponse:
    async with ctx.session() as session:
        if query.format == "csv":
            views = await service.export_batch(session, ctx.tenant_id, path.batch_id)
            return await csv_response(
                ctx.request, CSV_HEADER, _rows(views), filename=f"batch-{path.batch_id}.csv"
            )
        after = cursor_key(query.cursor, int, str)
        views_page = await service.list_for_batch(
            session, ctx.tenant_id, path.batch_id, query.limit, after
        )
    shown = views_page[: query.limit]
    more = len(views_page) > query.limit
    return ActivityListOut(
        items=[activity_out(v) for v in shown],
        next_cursor=encode_cursor([shown[-1].seq, shown[-1].id]) if more else None,
    )


async def _rows(views: AsyncIterator[ActivityView]) -> AsyncIterator[Sequence[object]]:
    async for view in views:
        yield csv_row(view)


@routes.endpoint(
    "GET",
    "/v1/activities/{activity_id}",
    path=ActivityPath,
    response=ActivityOut,
    summary="One activity",
)
async def get_activity(ctx: Ctx, path: ActivityPath) -> ActivityOut:
    async with ctx.session() as session:
        return activity_out(await service.get(session, ctx.tenant_id, path.activity_id))


@routes.endpoint(
    "PATCH",
    "/v1/activities/{activity_id}",
    path=ActivityPath,
    body=ActivityPatch,
    response=ActivityOut,
    summary="Change one activity (status, time, text, reminder)",
)
async def patch_activity(ctx: Ctx, path: ActivityPath, body: ActivityPatch) -> ActivityOut:
    """The external event follows through the interactive lane, ahead of any bulk work.
    ``start`` alone moves the activity and keeps its length; ``end`` must be after ``start``."""
    with body_errors(ActivityPatch):
        async with ctx.session() as session, session.begin():
            view = await service.patch(
                session, ctx.tenant_id, path.activity_id, body.model_dump(exclude_unset=True)
            )
    return activity_out(view)


@routes.endpoint(
    "PATCH",
    "/v1/activities",
    body=ActivitiesPatch,
    response=ActivitiesPatchedOut,
    summary="One status for many activities",
)
async def patch_activities(ctx: Ctx, body: ActivitiesPatch) -> ActivitiesPatchedOut:
    """All or nothing: an unknown id is a 404 naming it, and nothing is changed."""
    with body_errors(ActivitiesPatch):
        async with ctx.session() as session, session.begin():
            count = await service.set_status(session, ctx.tenant_id, body.ids, body.status)
    return ActivitiesPatchedOut(updated=count)


@routes.endpoint(
    "POST",
    "/v1/activities/{activity_id}/follow-ups",
    path=ActivityPath,
    body=FollowUpBody,
    response=ActivityOut,
    status=201,
    summary="Plan a follow-up call",
)
async def create_follow_up(ctx: Ctx, path: ActivityPath, body: FollowUpBody) -> ActivityOut:
    """At ``start`` if given, else in the assignee's next free slot after the followed
    activity, under its batch's schedule and around the user's other activities."""
    wish = FollowUp(
        start=body.start,
        duration=parse_span(body.duration) if body.duration else None,
        subject=body.subject,
        description=body.description,
        reminder_minutes=body.reminder_minutes,
    )
    with body_errors(FollowUpBody):
        async with ctx.session() as session, session.begin():
            view = await service.follow_up(
                session, ctx.tenant_id, path.activity_id, wish, clock_of(ctx)()
            )
    return activity_out(view)
