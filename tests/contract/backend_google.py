"""Contract backend: ``GoogleProvider`` (real client library) against the local Google fake.

Every harness gets a fresh user, so a fresh, empty primary calendar; the provider reaches it by
service-account delegation, as in production. The harness reads the fake's state directly.
Deleted events linger at Google as ``cancelled`` and no calendar shows them, so
``server_events`` lists what the calendar shows, as ``events.list`` does without ``showDeleted``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from syncsvc.providers.google import GoogleOptions, GoogleProvider, service_account_credentials
from tests.contract.harness import ServerEvent
from tests.fakes.google import FakeGoogle, running_fake

__all__ = ["google_fake_server", "google_service_account", "harness_google"]

DOMAIN = "contract.example"


def _instant(edt: dict[str, Any]) -> datetime | None:
    """A timed boundary as an aware datetime; all-day boundaries are None (harness rule)."""
    if not edt.get("dateTime"):
        return None
    moment = datetime.fromisoformat(edt["dateTime"])
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(edt.get("timeZone") or "UTC"))
    return moment


def _zone_name(moment: datetime) -> str:
    zone = moment.tzinfo
    return zone.key if isinstance(zone, ZoneInfo) else "UTC"


@dataclass
class GoogleHarness:
    provider: GoogleProvider
    fake: FakeGoogle
    user: str

    async def server_events(self) -> list[ServerEvent]:
        return [
            ServerEvent(
                event_id=event["id"],
                subject=event.get("summary", ""),
                start=_instant(event["start"]),
                end=_instant(event["end"]),
                status=event["status"].lower(),
                batch_id=((event.get("extendedProperties") or {}).get("private") or {}).get(
                    "syncsvcBatch"
                ),
            )
            for event in self.fake.events(self.user, include_cancelled=False)
        ]

    async def server_reminder_minutes(self, event_id: str) -> int | None:
        [event] = [e for e in self.fake.events(self.user) if e["id"] == event_id]
        reminders = event.get("reminders") or {}
        if reminders.get("useDefault"):
            return 10  # the fake calendar's default reminder
        overrides = reminders.get("overrides") or []
        return int(overrides[0]["minutes"]) if overrides else None

    async def add_foreign_event(
        self, subject: str, start: datetime, end: datetime, *, all_day_off: bool = False
    ) -> None:
        """As Google Calendar's own UI stores them: an out-of-office block is a timed
        ``outOfOffice`` event from midnight to midnight in the user's zone."""
        if not all_day_off:
            self.fake.add_event(
                self.user,
                {
                    "summary": subject,
                    "start": {"dateTime": start.isoformat()},
                    "end": {"dateTime": end.isoformat()},
                },
            )
            return
        zone = _zone_name(start)
        last = max(end.date(), start.date() + timedelta(days=1))
        self.fake.add_event(
            self.user,
            {
                "summary": subject,
                "eventType": "outOfOffice",
                "start": {"dateTime": f"{start.date()}T00:00:00", "timeZone": zone},
                "end": {"dateTime": f"{last}T00:00:00", "timeZone": zone},
            },
        )


@pytest.fixture(scope="session")
async def google_fake_server() -> AsyncIterator[FakeGoogle]:
    async with running_fake() as fake:
        yield fake


@pytest.fixture(scope="session")
def google_service_account(google_fake_server: FakeGoogle) -> dict[str, str]:
    return google_fake_server.new_service_account(
        "contract@syncsvc.iam.gserviceaccount.com", delegated_domains=frozenset({DOMAIN})
    )


@pytest.fixture
async def harness_google(
    google_fake_server: FakeGoogle, google_service_account: dict[str, str]
) -> AsyncIterator[GoogleHarness]:
    user = f"user-{uuid.uuid4().hex[:12]}@{DOMAIN}"
    creds = service_account_credentials(google_service_account, user, google_fake_server.token_url)
    provider = GoogleProvider(creds, user, GoogleOptions(api_url=google_fake_server.api_url))
    try:
        yield GoogleHarness(provider=provider, fake=google_fake_server, user=user)
    finally:
        await provider.aclose()
