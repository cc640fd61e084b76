"""The one small interface every calendar provider implements.

The queue knows nothing about Graph, Google or CalDAV: it hands an adapter ``EventSpec`` values
and gets ``EventRef`` values (or a ``syncsvc.errors.ProviderError``) back. Every adapter passes
the same contract test suite (``tests/contract/``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Protocol

from syncsvc.errors import ProviderError


@dataclass(frozen=True, slots=True)
class EventAttendee:
    name: str
    email: str


@dataclass(frozen=True, slots=True)
class EventSpec:
    """What an activity looks like in a calendar, independent of the provider.

    ``key`` is derived from the activity id and is what makes a create idempotent (Graph
    ``transactionId``, Google event ``id``, CalDAV resource name); ``batch_id`` travels with the
    event (extended property / ``X-`` property) so a lost ledger row can still be found.
    """

    key: str
    activity_id: str
    batch_id: str | None
    subject: str
    start: datetime | None
    end: datetime | None
    timezone: str
    description: str = ""
    location: str = ""
    #: Tasks have no slot: they are written as an all-day item (or VTODO) on their due date.
    due: date | None = None
    kind: str = "meeting"
    status: str = "planned"
    reminder_minutes: int | None = None
    attendees: tuple[EventAttendee, ...] = ()
    #: Raised on every change; becomes iCal SEQUENCE where the provider has one.
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class EventRef:
    """Where an event lives at the provider, and its version tag (etag / changeKey)."""

    event_id: str
    etag: str | None = None


@dataclass(frozen=True, slots=True)
class BusyInterval:
    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class TimeOff:
    """Days off read from a calendar (out-of-office events, automatic replies, away blocks)."""

    days: frozenset[date] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The outcome of one item of a batched call: a reference or the error it got."""

    key: str
    ref: EventRef | None = None
    error: ProviderError | None = None


class CalendarProvider(Protocol):
    """One user's calendar at one provider.

    Errors are ``syncsvc.errors`` provider errors: ``Throttled`` (with ``retry_after_s``),
    ``ProviderNotFound``, ``ProviderConflict``, ``AuthFailed``, ``Transient``, ``Permanent``.
    ``delete`` treats "already gone" as success.
    """

    #: Requests the provider can take in one batched round trip (1 = no batching).
    batch_max: int

    async def create(self, spec: EventSpec) -> EventRef: ...

    async def update(self, ref: EventRef, spec: EventSpec) -> EventRef: ...

    async def delete(self, ref: EventRef) -> None: ...

    async def find(self, key: str) -> EventRef | None:
        """The event a create with this key made, if any (recovery after a crash)."""
        ...

    async def find_batch(self, batch_id: str) -> Sequence[EventRef]:
        """Every event carrying this batch id (recovery of lost ledger rows)."""
        ...

    async def time_off(self, start: date, end: date) -> TimeOff: ...

    async def busy(self, start: datetime, end: datetime) -> Sequence[BusyInterval]: ...

    async def create_many(self, specs: Sequence[EventSpec]) -> Sequence[BatchResult]:
        """Creates in as few round trips as the provider allows; one result per spec, in order."""
        ...

    async def aclose(self) -> None: ...
