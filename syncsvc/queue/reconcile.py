"""Decide what one ledger row needs, before doing it (the vdirsyncer way: decide, then execute).

An operation in the outbox means "bring this ledger row to what its activity wants now", so
executing it twice, or after a newer change, does no harm: the decision is taken on fresh data.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, Literal, NamedTuple
from zoneinfo import ZoneInfo

from syncsvc.providers.base import EventAttendee, EventSpec
from syncsvc.store.models import Activity, User
from syncsvc.store.states import LedgerState


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    #: Delete an event whose id was never recorded (a create that crashed before its answer
    #: was stored): looked up by its key first.
    FIND_AND_DELETE = "find_and_delete"


class LedgerRow(NamedTuple):
    """The ledger columns an operation acts on. The worker reads these (and ``ActivityRow``)
    for every event it syncs: plain rows cost a fraction of ORM objects."""

    id: int
    tenant_id: str
    state: str
    event_id: str | None
    etag: str | None


class ActivityRow(NamedTuple):
    """The activity columns an event is made of (field names are the column names)."""

    id: str
    batch_id: str | None
    subject: str
    start: datetime | None
    end: datetime | None
    description: str
    location: str
    due: date | None
    kind: str
    status: str
    reminder_minutes: int | None
    attendees: list[Any]
    version: int
    deleted: bool


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    #: Ledger state once the action succeeded.
    then: Literal[LedgerState.SYNCED, LedgerState.DELETED]


def decide(ledger: LedgerRow, activity: ActivityRow, batch_deleting: bool) -> Decision:
    """What to do for a ledger row given its activity.

    A row whose event id is unknown may still have an event at the provider (a create that
    crashed before we recorded its answer), so removing it looks the event up by key first.
    """
    wanted = not activity.deleted and not batch_deleting
    if not wanted:
        if ledger.event_id:
            return Decision(Action.DELETE, LedgerState.DELETED)
        return Decision(Action.FIND_AND_DELETE, LedgerState.DELETED)
    if ledger.event_id is None:
        return Decision(Action.CREATE, LedgerState.SYNCED)
    return Decision(Action.UPDATE, LedgerState.SYNCED)


def event_key(activity_id: str) -> str:
    """The idempotency key of an activity's external event: its id (lowercase hex).

    Hex digits are valid in every provider's id alphabet (Google's base32hex included).
    """
    return activity_id.lower()


def spec_for(activity: Activity | ActivityRow, user: User) -> EventSpec:
    tz = user.timezone or "UTC"
    zone = ZoneInfo(tz)
    return EventSpec(
        key=event_key(activity.id),
        activity_id=activity.id,
        batch_id=activity.batch_id,
        subject=activity.subject,
        start=_local(activity.start, zone),
        end=_local(activity.end, zone),
        timezone=tz,
        description=activity.description,
        location=activity.location,
        due=activity.due,
        kind=activity.kind,
        status=activity.status,
        reminder_minutes=activity.reminder_minutes,
        attendees=tuple(
            EventAttendee(name=str(a.get("name", "")), email=str(a.get("email", "")))
            for a in activity.attendees
            if a.get("email")
        ),
        sequence=max(activity.version - 1, 0),
    )


def _local(value: datetime | None, zone: ZoneInfo) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(zone)
