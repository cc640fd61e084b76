"""Our CalDAV resources as libical reads them: nothing it rejects, no alarm on a cancelled
item, tasks as all-day VEVENTs."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime
from zoneinfo import ZoneInfo

import pytest

from syncsvc.providers._ical import render_resource
from syncsvc.providers.base import EventAttendee, EventSpec
from tests.libical import libical_read

CPH = ZoneInfo("Europe/Copenhagen")
MEETING = EventSpec(
    key="k1",
    activity_id="a1",
    batch_id="b1",
    subject="Besøg",
    start=datetime(2027, 6, 7, 9, tzinfo=CPH),
    end=datetime(2027, 6, 7, 10, tzinfo=CPH),
    timezone="Europe/Copenhagen",
    description="Tag brochurer med",
    location="Vesterbrogade 1",
    reminder_minutes=15,
    attendees=(EventAttendee("Ada", "ada@brewery.example"),),
)
TASK = replace(MEETING, kind="task", start=None, end=None, due=date(2027, 6, 9), attendees=())


@pytest.mark.parametrize(
    ("spec", "cancelled", "alarms", "all_day"),
    [
        (MEETING, False, 1, False),
        (replace(MEETING, status="cancelled", sequence=1), True, 0, False),
        (TASK, False, 1, True),
        (replace(TASK, status="cancelled"), True, 0, True),
    ],
)
def test_libical_takes_our_resources(
    spec: EventSpec, cancelled: bool, alarms: int, all_day: bool
) -> None:
    read = libical_read(render_resource(spec))
    assert read.errors == []
    ((item),) = read.items
    assert (item.kind, item.cancelled, item.alarms, item.all_day) == (
        "VEVENT",
        cancelled,
        alarms,
        all_day,
    )
