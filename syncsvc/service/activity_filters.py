"""Which activities a list, an export, a bulk delete or a bulk edit means: one filter, one
SQL translation, so the rows a CRM user sees are exactly the rows a filtered delete removes.

Dates are the assignee's: ``from``/``to`` (both inclusive) are days in each assignee's own
zone, so a 00:30 call in Copenhagen counts on its Copenhagen day. A task, which has no start,
counts on its due day.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, and_, exists, false, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from syncsvc.errors import ErrorDetail, ValidationError
from syncsvc.queue.outbox import chunks
from syncsvc.store.models import Activity, Batch, ExternalEvent, User

FollowUps = Literal["has", "is", "none"]
#: ``external_state=none``: activities with no event in any calendar (feed-only users).
NO_EXTERNAL = "none"
#: Characters that mean something to ``LIKE`` and are searched for literally in ``q``.
LIKE_ESCAPE = "\\"


@dataclass(frozen=True, slots=True)
class ActivityFilter:
    """Every field narrows; several values of one field are alternatives (``status`` planned
    or unanswered). The empty filter means every live activity of the tenant."""

    user_ids: tuple[str, ...] = ()
    batch_id: str | None = None
    kinds: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    from_date: date | None = None
    to_date: date | None = None
    created_by: str | None = None
    follow_ups: FollowUps | None = None
    q: str | None = None
    external_states: tuple[str, ...] = ()
    directions: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) in (None, ()) for f in fields(self))


async def conditions(
    session: AsyncSession,
    tenant_id: str,
    wanted: ActivityFilter,
    loc: tuple[str | int, ...] = (),
) -> list[ColumnElement[bool]]:
    """``WHERE`` terms for live activities of the tenant matching ``wanted``, for a query that
    joins ``User`` on the assignee. A ``user_id``, ``batch_id`` or ``created_by`` this tenant
    does not have is a 422 naming it (a typo would otherwise look like an empty list)."""
    await _check_known(session, tenant_id, wanted, loc)
    terms: list[ColumnElement[bool]] = [
        Activity.tenant_id == tenant_id,
        Activity.deleted.is_(False),
    ]
    if wanted.user_ids:
        terms.append(Activity.user_id.in_(wanted.user_ids))
    if wanted.batch_id is not None:
        terms.append(Activity.batch_id == wanted.batch_id)
    if wanted.kinds:
        terms.append(Activity.kind.in_(wanted.kinds))
    if wanted.statuses:
        terms.append(Activity.status.in_(wanted.statuses))
    if wanted.directions:
        terms.append(Activity.direction.in_(wanted.directions))
    if wanted.created_by is not None:
        terms.append(
            Activity.batch_id.in_(
                select(Batch.id).where(
                    Batch.tenant_id == tenant_id, Batch.created_by == wanted.created_by
                )
            )
        )
    if wanted.follow_ups is not None:
        terms.append(_follow_ups(wanted.follow_ups))
    if wanted.q:
        terms.append(_text(wanted.q))
    if wanted.external_states:
        terms.append(_external(wanted.external_states))
    if wanted.from_date is not None or wanted.to_date is not None:
        zones = await _zones(session, tenant_id)
        terms.append(or_(false(), *(_in_days(zone, wanted) for zone in zones)))
    return terms


async def _check_known(
    session: AsyncSession, tenant_id: str, wanted: ActivityFilter, loc: tuple[str | int, ...]
) -> None:
    details: list[ErrorDetail] = []
    if wanted.user_ids:
        known: set[str] = set()
        for chunk in chunks(sorted(set(wanted.user_ids))):
            known.update(
                await session.scalars(
                    select(User.id).where(User.tenant_id == tenant_id, User.id.in_(chunk))
                )
            )
        details += [
            ErrorDetail((*loc, "user_id"), f"no such user {uid!r}")
            for uid in wanted.user_ids
            if uid not in known
        ]
    if wanted.batch_id is not None:
        found = await session.scalar(
            select(Batch.id).where(Batch.tenant_id == tenant_id, Batch.id == wanted.batch_id)
        )
        if found is None:
            details.append(ErrorDetail((*loc, "batch_id"), f"no such batch {wanted.batch_id!r}"))
    if wanted.created_by is not None:
        found = await session.scalar(
            select(Batch.id)
            .where(Batch.tenant_id == tenant_id, Batch.created_by == wanted.created_by)
            .limit(1)
        )
        if found is None:
            details.append(
                ErrorDetail((*loc, "created_by"), f"no batch was created by {wanted.created_by!r}")
            )
    if details:
        raise ValidationError(details[0].msg, details)


def _follow_ups(which: FollowUps) -> ColumnElement[bool]:
    child = aliased(Activity)
    has = exists().where(
        child.tenant_id == Activity.tenant_id,
        child.follow_up_of == Activity.id,
        child.deleted.is_(False),
    )
    if which == "has":
        return has
    if which == "is":
        return Activity.follow_up_of.is_not(None)
    return and_(Activity.follow_up_of.is_(None), ~has)


def _text(q: str) -> ColumnElement[bool]:
    """Case-insensitive, literal (``%`` and ``_`` are characters, not wildcards)."""
    escaped = (
        q.replace(LIKE_ESCAPE, LIKE_ESCAPE * 2)
        .replace("%", LIKE_ESCAPE + "%")
        .replace("_", LIKE_ESCAPE + "_")
    )
    pattern = f"%{escaped.lower()}%"
    return or_(
        *(
            func.lower(column).like(pattern, escape=LIKE_ESCAPE)
            for column in (Activity.subject, Activity.description, Activity.phone)
        )
    )


def _external(states: Sequence[str]) -> ColumnElement[bool]:
    real = [s for s in states if s != NO_EXTERNAL]
    terms: list[ColumnElement[bool]] = []
    if real:
        terms.append(
            exists().where(ExternalEvent.activity_id == Activity.id, ExternalEvent.state.in_(real))
        )
    if NO_EXTERNAL in states:
        terms.append(~exists().where(ExternalEvent.activity_id == Activity.id))
    return or_(*terms)


async def _zones(session: AsyncSession, tenant_id: str) -> list[str]:
    return list(
        await session.scalars(select(User.timezone).where(User.tenant_id == tenant_id).distinct())
    )


def _in_days(timezone: str, wanted: ActivityFilter) -> ColumnElement[bool]:
    """Assignees in ``timezone``: a timed activity starting within the days, a task due in them."""
    zone = ZoneInfo(timezone or "UTC")
    timed: list[ColumnElement[bool]] = [Activity.start.is_not(None)]
    due: list[ColumnElement[bool]] = [Activity.start.is_(None), Activity.due.is_not(None)]
    if wanted.from_date is not None:
        timed.append(Activity.start >= _midnight(wanted.from_date, zone))
        due.append(Activity.due >= wanted.from_date)
    if wanted.to_date is not None:
        timed.append(Activity.start < _midnight(wanted.to_date + timedelta(days=1), zone))
        due.append(Activity.due <= wanted.to_date)
    return and_(User.timezone == timezone, or_(and_(*timed), and_(*due)))


def _midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), tzinfo=zone)
