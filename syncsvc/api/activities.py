"""Activities: one at a time, many at once, the tenant's filtered list and a batch's list
(JSON pages, CSV or XLSX), deletes, follow-ups, quick close and follow-up history."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, Field

from syncsvc.api._framework import Ctx, Routes
from syncsvc.api.batches import BatchPath
from syncsvc.api.pagination import (
    XLSX_MEDIA_TYPE,
    ExportQuery,
    PageQuery,
    csv_response,
    cursor_key,
    encode_cursor,
    xlsx_response,
)
from syncsvc.api.plan_schemas import (
    ActivitiesDelete,
    ActivitiesDeletedOut,
    ActivitiesPatch,
    ActivitiesPatchedOut,
    ActivityClosedOut,
    ActivityFilterFields,
    ActivityHistoryOut,
    ActivityListOut,
    ActivityOut,
    ActivityPatch,
    CloseBody,
    ExternalOut,
    FollowUpBody,
    instant,
)
from syncsvc.api.plans import body_errors, clock_of
from syncsvc.errors import Conflict, ErrorDetail, NotFound
from syncsvc.service import activities as service
from syncsvc.service.activities import ActivityView, Deleted, FollowUp, ReportRow
from syncsvc.service.activity_filters import ActivityFilter
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
    "direction",
    "phone",
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
        direction=view.direction,
        phone=view.phone,
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
        view.direction,
        view.phone,
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
    ``start`` alone moves the activity and keeps its length; ``end`` must be after ``start``.
    An activity its assignee edited in their own calendar is a 409 unless ``force``."""
    changes = body.model_dump(exclude_unset=True, exclude={"force"})
    with located(ActivityPatch):
        async with ctx.session() as session, session.begin():
            view = await service.patch(
                session, ctx.tenant_id, path.activity_id, changes, force=body.force
            )
    return activity_out(view)


@routes.endpoint(
    "PATCH",
    "/v1/activities",
    body=ActivitiesPatch,
    response=ActivitiesPatchedOut,
    summary="One status for many activities (by ids or by the list's filters)",
)
async def patch_activities(ctx: Ctx, body: ActivitiesPatch) -> ActivitiesPatchedOut:
    """All or nothing: an unknown id is a 404 naming it, an activity its assignee edited a
    409 naming it (unless ``force``), and then nothing is changed."""
    with located(ActivitiesPatch):
        async with ctx.session() as session, session.begin():
            count = await service.set_status(
                session,
                ctx.tenant_id,
                body.ids,
                body.status,
                wanted=None if body.filter is None else filter_of(body.filter),
                force=body.force,
            )
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
    wish = _wish(body)
    with body_errors(FollowUpBody):
        async with ctx.session() as session, session.begin():
            view = await service.follow_up(
                session, ctx.tenant_id, path.activity_id, wish, clock_of(ctx)()
            )
    return activity_out(view)


# --- The tenant's activities -----------------------------------------------------------------


class ActivityListQuery(ActivityFilterFields, PageQuery):
    format: Literal["json", "csv", "xlsx"] = Field(
        default="json", description="`csv` or `xlsx`: every matching row, unpaginated."
    )


class ForceQuery(BaseModel):
    force: bool = Field(default=False, description="Also if its assignee edited it.")


def filter_of(fields: ActivityFilterFields) -> ActivityFilter:
    return ActivityFilter(
        user_ids=tuple(fields.user_id),
        batch_id=fields.batch_id,
        kinds=tuple(fields.kind),
        statuses=tuple(fields.status),
        from_date=fields.from_,
        to_date=fields.to,
        created_by=fields.created_by,
        follow_ups=fields.follow_ups,
        q=fields.q or None,
        external_states=tuple(fields.external_state),
        directions=tuple(fields.direction),
    )


@contextmanager
def located(model: type[BaseModel]) -> Iterator[None]:
    """``body_errors`` for these endpoints' 409s too: their details name body fields."""
    try:
        with body_errors(model):
            yield
    except Conflict as exc:
        fields = model.model_fields
        exc.details = tuple(
            ErrorDetail(("body", *d.loc), d.msg) if d.loc and d.loc[0] in fields else d
            for d in exc.details
        )
        raise


@routes.endpoint(
    "GET",
    "/v1/activities",
    query=ActivityListQuery,
    response=ActivityListOut,
    media_type="text/csv",
    other_successes=((200, XLSX_MEDIA_TYPE),),
    summary="The tenant's activities, filtered, by start (JSON pages, or all as CSV or XLSX)",
)
async def list_activities(
    ctx: Ctx, query: ActivityListQuery
) -> ActivityListOut | web.StreamResponse:
    """Timed activities by start, then tasks by due date. An unknown filter value, user or
    batch is a 422 naming it. ``?format=csv`` or ``?format=xlsx`` exports exactly the rows
    the pages show, read and written in chunks."""
    wanted = filter_of(query)
    async with ctx.session() as session:
        if query.format != "json":
            views = await service.export_activities(session, ctx.tenant_id, wanted)
            if query.format == "xlsx":
                return await xlsx_response(
                    ctx.request, CSV_HEADER, _rows(views), "activities.xlsx", "activities"
                )
            return await csv_response(ctx.request, CSV_HEADER, _rows(views), "activities.csv")
        after = cursor_key(query.cursor, int, str, str)
        views_page = await service.list_activities(
            session,
            ctx.tenant_id,
            wanted,
            query.limit,
            after,
        )
    shown = views_page[: query.limit]
    more = len(views_page) > query.limit
    return ActivityListOut(
        items=[activity_out(v) for v in shown],
        next_cursor=encode_cursor(list(shown[-1].sort_key)) if more else None,
    )


def deleted_out(deleted: Deleted) -> ActivitiesDeletedOut:
    return ActivitiesDeletedOut(deleted=deleted.deleted, not_found=list(deleted.not_found))


@routes.endpoint(
    "DELETE",
    "/v1/activities/{activity_id}",
    path=ActivityPath,
    query=ForceQuery,
    response=ActivitiesDeletedOut,
    summary="Delete one activity and its external event",
)
async def delete_activity(ctx: Ctx, path: ActivityPath, query: ForceQuery) -> ActivitiesDeletedOut:
    """Committed before the answer; the event leaves the calendar through the outbox. An
    activity its assignee edited is a 409 unless ``?force=true``; an unknown, foreign or
    already deleted one a 404."""
    async with ctx.session() as session, session.begin():
        deleted = await service.delete(
            session, ctx.tenant_id, [path.activity_id], force=query.force
        )
        if deleted.not_found:
            raise NotFound(
                f"activity {path.activity_id!r} not found",
                [ErrorDetail(("id",), "no such activity")],
            )
    return deleted_out(deleted)


@routes.endpoint(
    "DELETE",
    "/v1/activities",
    body=ActivitiesDelete,
    response=ActivitiesDeletedOut,
    summary="Delete many activities (by ids or by the list's filters) and their events",
)
async def delete_activities(ctx: Ctx, body: ActivitiesDelete) -> ActivitiesDeletedOut:
    """Ids this tenant has no live activity of are answered in ``not_found`` and touch
    nothing. An activity its assignee edited is a 409 naming it unless ``force``, and then
    nothing is deleted."""
    with located(ActivitiesDelete):
        async with ctx.session() as session, session.begin():
            deleted = await service.delete(
                session,
                ctx.tenant_id,
                body.ids,
                wanted=None if body.filter is None else filter_of(body.filter),
                force=body.force,
            )
    return deleted_out(deleted)


@routes.endpoint(
    "POST",
    "/v1/activities/{activity_id}/close",
    path=ActivityPath,
    body=CloseBody,
    response=ActivityClosedOut,
    summary="Quick close: set the status, optionally plan a follow-up call",
)
async def close_activity(ctx: Ctx, path: ActivityPath, body: CloseBody) -> ActivityClosedOut:
    """The status and the follow-up commit together; the follow-up takes the assignee's next
    free slot unless it gives ``start``. An activity its assignee edited is a 409 unless
    ``force``."""
    wish = None if body.follow_up is None else _wish(body.follow_up)
    with located(CloseBody):
        async with ctx.session() as session, session.begin():
            closed, follow_up = await service.close(
                session,
                ctx.tenant_id,
                path.activity_id,
                body.status,
                wish,
                clock_of(ctx)(),
                force=body.force,
            )
    return ActivityClosedOut(
        activity=activity_out(closed),
        follow_up=None if follow_up is None else activity_out(follow_up),
    )


@routes.endpoint(
    "GET",
    "/v1/activities/{activity_id}/history",
    path=ActivityPath,
    response=ActivityHistoryOut,
    summary="The follow-up chain an activity belongs to, oldest first",
)
async def activity_history(ctx: Ctx, path: ActivityPath) -> ActivityHistoryOut:
    """Both directions: the calls it follows up and every follow-up of any of them."""
    async with ctx.session() as session:
        views = await service.history(session, ctx.tenant_id, path.activity_id)
    return ActivityHistoryOut(items=[activity_out(v) for v in views])


def _wish(body: FollowUpBody) -> FollowUp:
    return FollowUp(
        start=body.start,
        duration=parse_span(body.duration) if body.duration else None,
        subject=body.subject,
        description=body.description,
        reminder_minutes=body.reminder_minutes,
    )


# --- A batch's report --------------------------------------------------------------------------

REPORT_HEADER = (
    "activity_id",
    "target_ids",
    "target_names",
    "contacts",
    "user_id",
    "user_name",
    "kind",
    "start",
    "end",
    "due",
    "subject",
    "status",
    "follow_up_of",
    "external_provider",
    "sync_state",
)
#: Several values in one report cell (targets of a shared activity, contacts).
REPORT_JOIN = "; "


class ReportQuery(BaseModel):
    format: Literal["csv", "xlsx"] = Field(default="csv", description="`csv` or `xlsx`.")


@routes.endpoint(
    "GET",
    "/v1/batches/{batch_id}/report",
    path=BatchPath,
    query=ReportQuery,
    media_type="text/csv",
    other_successes=((200, XLSX_MEDIA_TYPE),),
    heavy=True,
    summary="A batch's report: one row per activity with its targets, contacts, assignee, "
    "time and sync state (CSV or XLSX)",
)
async def batch_report(ctx: Ctx, path: BatchPath, query: ReportQuery) -> web.StreamResponse:
    """The Swedish group-activity wizard's printable check of the selection, with each
    activity's id; streamed in chunks like the exports."""
    async with ctx.session() as session:
        rows = await service.batch_report(session, ctx.tenant_id, path.batch_id)
        name = f"batch-{path.batch_id}-report"
        if query.format == "xlsx":
            return await xlsx_response(
                ctx.request, REPORT_HEADER, _report_rows(rows), f"{name}.xlsx", "report"
            )
        return await csv_response(ctx.request, REPORT_HEADER, _report_rows(rows), f"{name}.csv")


async def _report_rows(rows: AsyncIterator[ReportRow]) -> AsyncIterator[Sequence[object]]:
    async for row in rows:
        view, ext = row.activity, row.activity.external
        yield (
            view.id,
            REPORT_JOIN.join(view.target_ids),
            REPORT_JOIN.join(row.target_names),
            REPORT_JOIN.join(row.contacts),
            view.user_id,
            row.user_name,
            view.kind,
            instant(view.start),
            instant(view.end),
            view.due.isoformat() if view.due else None,
            view.subject,
            view.status,
            view.follow_up_of,
            ext.provider if ext else None,
            ext.state if ext else None,
        )
