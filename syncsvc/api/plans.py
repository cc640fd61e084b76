"""``POST /v1/plans``: preview a plan. Reads the tenant's users; writes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web
from pydantic import BaseModel

from syncsvc.api._framework import Ctx, Routes
from syncsvc.api.plan_schemas import (
    AttendeeOut,
    PlanBody,
    PlannedActivityOut,
    PreviewOut,
    StandardWeekOut,
    UserSummaryOut,
    WarningOut,
    WindowCountOut,
    check_sizes,
    instant,
)
from syncsvc.errors import ErrorDetail, NotFound, ValidationError
from syncsvc.planner.model import WEEKDAYS, Plan, UserSummary
from syncsvc.service import plans as service
from syncsvc.service.plans import CalendarBusy, Clock, system_clock

routes = Routes(tag="plans")

#: The service's clock; tests and benchmarks may set a fixed one before the app starts.
CLOCK: web.AppKey[Clock] = web.AppKey("clock")


#: Reads the users' calendars for ``avoid_busy`` (``build_app`` installs one per app).
CALENDARS: web.AppKey[CalendarBusy] = web.AppKey("calendar_busy", CalendarBusy)


def clock_of(ctx: Ctx) -> Clock:
    return ctx.request.app.get(CLOCK, system_clock)


def calendars_of(ctx: Ctx) -> CalendarBusy | None:
    return ctx.request.app.get(CALENDARS)


@contextmanager
def body_errors(model: type[BaseModel]) -> Iterator[None]:
    """Service and planner errors name body fields (``("template", "subject")``) without the
    ``body`` prefix that the framework's own 422s carry; add it, so every ``loc`` reads alike.
    Locations outside the body (``("users", "u1", "timezone")``: stored data) stay as they are.
    """
    try:
        yield
    except (ValidationError, NotFound) as exc:
        fields = model.model_fields
        exc.details = tuple(
            ErrorDetail(("body", *d.loc), d.msg) if d.loc and d.loc[0] in fields else d
            for d in exc.details
        )
        raise


def users_out(users: tuple[UserSummary, ...]) -> list[UserSummaryOut]:
    return [
        UserSummaryOut(id=u.id, name=u.name, count=u.count, first=u.first, last=u.last)
        for u in users
    ]


def preview_out(plan: Plan) -> PreviewOut:
    return PreviewOut(
        total=plan.total,
        start_date=plan.start_date,
        standard_week=StandardWeekOut(
            max=plan.standard_week_max,
            days={
                day: [
                    WindowCountOut.model_validate(
                        {"from": f"{w.start:%H:%M}", "to": f"{w.end:%H:%M}", "count": w.count}
                    )
                    for w in plan.standard_week.get(day, ())
                ]
                for day in WEEKDAYS
            },
        ),
        users=users_out(plan.users),
        activities=[
            PlannedActivityOut(
                target_id=a.target_id,
                user_id=a.user_id,
                kind=a.kind,
                start=instant(a.start),
                end=instant(a.end),
                due=a.due,
                subject=a.subject,
                attendees=[
                    AttendeeOut(contact_id=x.contact_id, name=x.name, email=x.email)
                    for x in a.attendees
                ],
            )
            for a in plan.activities
        ],
        warnings=[
            WarningOut(code=w.code, message=w.message, suggestion=w.suggestion)
            for w in plan.warnings
        ],
    )


@routes.endpoint(
    "POST", "/v1/plans", body=PlanBody, response=PreviewOut, summary="Preview a plan", heavy=True
)
async def preview_plan(ctx: Ctx, body: PlanBody) -> PreviewOut:
    """The plan as ``POST /v1/batches`` would commit it now: nothing is written."""
    check_sizes(body, ctx.settings)
    with body_errors(PlanBody):
        spec = await asyncio.to_thread(body.to_spec)
        async with ctx.session() as session:
            plan = await service.preview(
                session, ctx.tenant_id, spec, clock_of(ctx)(), calendars_of(ctx)
            )
    return await asyncio.to_thread(preview_out, plan)
