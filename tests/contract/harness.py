"""What a contract-test backend hands the suite: an adapter plus a direct line to its server.

Each ``tests/contract/backend_<name>.py`` defines an async fixture ``harness_<name>`` that
yields a ``ProviderHarness`` bound to a fresh, empty calendar. The suite in
``test_provider_contract.py`` runs against every backend that exists.

Conventions every backend follows so one assertion fits all providers:

- ``ServerEvent.event_id`` is the id the adapter's ``EventRef.event_id`` uses for that event.
- ``ServerEvent.start``/``end`` are timezone-aware datetimes (compared as instants), or None
  for all-day items such as tasks.
- ``ServerEvent.status`` is lower-case: ``"cancelled"`` for a cancelled event, otherwise
  ``"confirmed"`` (or the provider's own lower-case word, e.g. ``"tentative"``). Where the
  provider has one state for cancelled and deleted (Google), a cancelled event may be absent.
- A backend module lists every fixture it defines in ``__all__`` (``conftest.py`` imports them).
- ``add_foreign_event(..., all_day_off=True)`` makes an all-day out-of-office event covering
  the dates from ``start.date()`` up to, not including, ``end.date()`` (at least one day);
  otherwise an ordinary timed, busy event from ``start`` to ``end``.

An extra every backend also provides (kept out of ``ProviderHarness`` so that stays as agreed;
the reminder test checks for it with ``ReminderReader``):

- ``async def server_reminder_minutes(self, event_id: str) -> int | None``: the reminder the
  server stores for the event, in minutes before its start, read directly from the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from syncsvc.providers.base import CalendarProvider


@dataclass(frozen=True)
class ServerEvent:
    """An event as the server itself stores it, read without the adapter under test."""

    event_id: str
    subject: str
    start: datetime | None
    end: datetime | None
    status: str
    batch_id: str | None


class ProviderHarness(Protocol):
    #: The adapter under test, bound to a fresh, empty calendar.
    provider: CalendarProvider

    async def server_events(self) -> list[ServerEvent]:
        """Every event in the calendar, read directly from the server, NOT through the adapter."""
        ...

    async def add_foreign_event(
        self, subject: str, start: datetime, end: datetime, *, all_day_off: bool = False
    ) -> None:
        """An event the user made themselves (``all_day_off=True``: an out-of-office day)."""
        ...


@runtime_checkable
class ReminderReader(Protocol):
    async def server_reminder_minutes(self, event_id: str) -> int | None:
        """The reminder stored with the event, in minutes before its start, or None."""
        ...
