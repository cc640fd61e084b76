"""Small builders so each test states only what it is about."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from syncsvc.planner.model import (
    Assignment,
    PlanRequest,
    PlanUser,
    Schedule,
    Target,
    Template,
)

CPH = ZoneInfo("Europe/Copenhagen")
HOUR = timedelta(hours=1)
QUARTER = timedelta(minutes=15)


def at(day: date, hh: int, mm: int = 0, zone: ZoneInfo = CPH) -> datetime:
    return datetime.combine(day, time(hh, mm), zone)


def user(uid: str, **kw: Any) -> PlanUser:
    kw.setdefault("name", f"Name {uid.upper()}")
    kw.setdefault("timezone", "Europe/Copenhagen")
    kw.setdefault("country", "DK")
    return PlanUser(uid, **kw)


def targets(n: int, **kw: Any) -> tuple[Target, ...]:
    return tuple(Target(f"t{i}", f"Target {i}", **kw) for i in range(n))


def request(
    n_or_targets: int | Sequence[Target],
    *,
    start: date,
    now: datetime | None = None,
    users: Iterable[PlanUser] = (),
    mode: str = "users",
    listed: Sequence[str] | None = None,
    template: Template | None = None,
    **schedule: Any,
) -> PlanRequest:
    """A request planned by ``users`` (all listed in order) with the default seed schedule."""
    tlist = targets(n_or_targets) if isinstance(n_or_targets, int) else tuple(n_or_targets)
    people = {u.id: u for u in (users or [user("u1")])}
    schedule.setdefault("duration", HOUR)
    schedule.setdefault("interval", QUARTER)
    return PlanRequest(
        targets=tlist,
        template=template or Template("meeting", "Visit $account-name$"),
        schedule=Schedule(start_date=start, **schedule),
        assignment=Assignment(mode, tuple(listed if listed is not None else people)),  # type: ignore[arg-type]
        users=people,
        now=now or at(start - timedelta(days=7), 8),
    )


def but(req: PlanRequest, **kw: Any) -> PlanRequest:
    return replace(req, **kw)


def starts(plan_activities: Iterable[Any]) -> list[str]:
    return [a.start.isoformat() for a in plan_activities]
