"""What every calendar provider must do, checked against each backend's real or fake server.

Times are in Europe/Copenhagen in June 2027 (CEST, UTC+2); the expected values are written out
by hand. Keys are lower-case hex so every provider can use them as they are (Google event ids
allow only base32hex), and batch ids are fresh per test.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from syncsvc.errors import ProviderNotFound
from syncsvc.providers.base import BusyInterval, EventSpec
from tests.contract.harness import ProviderHarness, ReminderReader, ServerEvent

CPH = ZoneInfo("Europe/Copenhagen")
MONDAY_9 = datetime(2027, 6, 14, 9, 0, tzinfo=CPH)


def new_batch_id() -> str:
    return f"batch-{uuid.uuid4().hex[:12]}"


def make_spec(n: int, batch_id: str, **changes: object) -> EventSpec:
    """Meeting ``n``: 30 minutes, starting ``n`` half-hours after Monday 09:00."""
    start = MONDAY_9 + timedelta(minutes=30 * n)
    spec = EventSpec(
        key=f"{uuid.uuid4().hex[:16]}{n:04d}",
        activity_id=f"activity-{n}",
        batch_id=batch_id,
        subject=f"Møde {n} med Ærø Å/S",
        start=start,
        end=start + timedelta(minutes=30),
        timezone="Europe/Copenhagen",
        description="Gennemgå tilbud; ring først",
        location="Hovedgaden 1, 5970 Ærøskøbing",
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


async def test_create_puts_the_event_on_the_server(harness: ProviderHarness) -> None:
    batch = new_batch_id()
    spec = make_spec(1, batch)

    ref = await harness.provider.create(spec)

    assert await harness.server_events() == [
        ServerEvent(
            event_id=ref.event_id,
            subject="Møde 1 med Ærø Å/S",
            start=datetime(2027, 6, 14, 9, 30, tzinfo=CPH),
            end=datetime(2027, 6, 14, 10, 0, tzinfo=CPH),
            status="confirmed",
            batch_id=batch,
        )
    ]


async def test_create_twice_with_one_key_makes_one_event(harness: ProviderHarness) -> None:
    spec = make_spec(1, new_batch_id())

    first = await harness.provider.create(spec)
    second = await harness.provider.create(spec)

    assert second.event_id == first.event_id
    assert [event.event_id for event in await harness.server_events()] == [first.event_id]


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
async def test_a_repeated_create_brings_the_event_to_the_activity_as_it_is_now(
    harness: ProviderHarness, monkeypatch: pytest.MonkeyPatch, batched: bool
) -> None:
    """A create whose first try got through before a crash is claimed again after the activity
    was edited (the edit's own operation merged into it): the event must end as the edit says,
    not as the first try wrote it."""
    from syncsvc.providers import graph

    monkeypatch.setattr(graph, "REPLAY_AGE_S", 0.0)  # any earlier create counts as a replay
    batch = new_batch_id()
    spec = make_spec(1, batch)
    first = await harness.provider.create(spec)
    edited = replace(
        spec,
        subject="Omdøbt efter nedbruddet",
        start=MONDAY_9 + timedelta(hours=2),
        end=MONDAY_9 + timedelta(hours=3),
        sequence=1,
    )

    if batched:
        (result,) = await harness.provider.create_many([edited])
        assert result.ref is not None, result.error
        again = result.ref
    else:
        again = await harness.provider.create(edited)

    assert again.event_id == first.event_id
    (event,) = await harness.server_events()
    assert (event.subject, event.start, event.end) == (
        "Omdøbt efter nedbruddet",
        datetime(2027, 6, 14, 11, 0, tzinfo=CPH),
        datetime(2027, 6, 14, 12, 0, tzinfo=CPH),
    )


async def test_update_changes_subject_and_time(harness: ProviderHarness) -> None:
    batch = new_batch_id()
    spec = make_spec(1, batch)
    ref = await harness.provider.create(spec)
    moved = replace(
        spec,
        subject="Flyttet møde",
        start=datetime(2027, 6, 16, 13, 0, tzinfo=CPH),
        end=datetime(2027, 6, 16, 14, 15, tzinfo=CPH),
        sequence=1,
    )

    updated = await harness.provider.update(ref, moved)

    assert updated.event_id == ref.event_id
    assert await harness.server_events() == [
        ServerEvent(
            event_id=ref.event_id,
            subject="Flyttet møde",
            start=datetime(2027, 6, 16, 11, 0, tzinfo=ZoneInfo("UTC")),
            end=datetime(2027, 6, 16, 12, 15, tzinfo=ZoneInfo("UTC")),
            status="confirmed",
            batch_id=batch,
        )
    ]


async def test_updates_chain_on_the_returned_ref(harness: ProviderHarness) -> None:
    spec = make_spec(1, new_batch_id())
    ref = await harness.provider.create(spec)

    ref = await harness.provider.update(ref, replace(spec, subject="Anden", sequence=1))
    await harness.provider.update(ref, replace(spec, subject="Tredje", sequence=2))

    assert [event.subject for event in await harness.server_events()] == ["Tredje"]


async def test_update_of_a_deleted_event_is_not_found(harness: ProviderHarness) -> None:
    spec = make_spec(1, new_batch_id())
    ref = await harness.provider.create(spec)
    await harness.provider.delete(ref)

    with pytest.raises(ProviderNotFound):
        await harness.provider.update(ref, replace(spec, subject="For sent", sequence=1))
    assert await harness.server_events() == []


async def test_delete_removes_the_event(harness: ProviderHarness) -> None:
    spec = make_spec(1, new_batch_id())
    ref = await harness.provider.create(spec)

    await harness.provider.delete(ref)

    assert await harness.server_events() == []
    assert await harness.provider.find(spec.key) is None


async def test_deleting_twice_is_fine(harness: ProviderHarness) -> None:
    ref = await harness.provider.create(make_spec(1, new_batch_id()))

    await harness.provider.delete(ref)
    await harness.provider.delete(ref)

    assert await harness.server_events() == []


async def test_find_by_key_sees_only_a_created_event(harness: ProviderHarness) -> None:
    spec = make_spec(1, new_batch_id())
    assert await harness.provider.find(spec.key) is None

    ref = await harness.provider.create(spec)

    found = await harness.provider.find(spec.key)
    assert found is not None
    assert found.event_id == ref.event_id


async def test_find_batch_returns_only_that_batch(harness: ProviderHarness) -> None:
    batch_a, batch_b = new_batch_id(), new_batch_id()
    a1 = await harness.provider.create(make_spec(1, batch_a))
    a2 = await harness.provider.create(make_spec(2, batch_a))
    b1 = await harness.provider.create(make_spec(3, batch_b))
    await harness.provider.create(make_spec(4, None))
    await harness.add_foreign_event(
        batch_a, MONDAY_9 + timedelta(days=1), MONDAY_9 + timedelta(days=1, hours=1)
    )

    found_a = await harness.provider.find_batch(batch_a)
    found_b = await harness.provider.find_batch(batch_b)

    assert sorted(ref.event_id for ref in found_a) == sorted([a1.event_id, a2.event_id])
    assert [ref.event_id for ref in found_b] == [b1.event_id]
    assert await harness.provider.find_batch(new_batch_id()) == []


async def test_a_cancelled_event_never_stays_confirmed(harness: ProviderHarness) -> None:
    """Cancelled is shown as cancelled, or as gone where the two are one state (Google)."""
    spec = make_spec(1, new_batch_id())
    ref = await harness.provider.create(spec)

    await harness.provider.update(ref, replace(spec, status="cancelled", sequence=1))

    statuses = [event.status for event in await harness.server_events()]
    assert statuses in (["cancelled"], [])


async def test_reminder_reaches_the_server(harness: ProviderHarness) -> None:
    assert isinstance(harness, ReminderReader), "backends provide server_reminder_minutes"
    with_reminder = await harness.provider.create(make_spec(1, None, reminder_minutes=15))
    without = await harness.provider.create(make_spec(2, None))

    assert await harness.server_reminder_minutes(with_reminder.event_id) == 15
    assert await harness.server_reminder_minutes(without.event_id) is None


async def test_a_task_becomes_one_item_on_its_due_date(harness: ProviderHarness) -> None:
    batch = new_batch_id()
    task = make_spec(1, batch, start=None, end=None, due=date(2027, 6, 16), kind="task")

    ref = await harness.provider.create(task)

    events = await harness.server_events()
    assert [(event.event_id, event.subject, event.batch_id) for event in events] == [
        (ref.event_id, "Møde 1 med Ærø Å/S", batch)
    ]
    found = await harness.provider.find(task.key)
    assert found is not None
    assert found.event_id == ref.event_id


async def test_time_off_is_the_users_out_of_office_days(harness: ProviderHarness) -> None:
    await harness.add_foreign_event(
        "Ferie",
        datetime(2027, 6, 17, 0, 0, tzinfo=CPH),
        datetime(2027, 6, 19, 0, 0, tzinfo=CPH),
        all_day_off=True,
    )
    await harness.add_foreign_event(
        "Tandlæge",
        datetime(2027, 6, 15, 10, 0, tzinfo=CPH),
        datetime(2027, 6, 15, 11, 0, tzinfo=CPH),
    )
    task = make_spec(1, None, start=None, end=None, due=date(2027, 6, 16), kind="task")
    await harness.provider.create(task)

    time_off = await harness.provider.time_off(date(2027, 6, 14), date(2027, 6, 20))

    assert time_off.days == frozenset({date(2027, 6, 17), date(2027, 6, 18)})


async def test_busy_includes_the_users_own_meeting(harness: ProviderHarness) -> None:
    start = datetime(2027, 6, 15, 10, 0, tzinfo=CPH)
    end = datetime(2027, 6, 15, 11, 30, tzinfo=CPH)
    await harness.add_foreign_event("Tandlæge", start, end)

    busy = await harness.provider.busy(MONDAY_9, MONDAY_9 + timedelta(days=5))

    assert BusyInterval(start, end) in busy
    assert all(interval.start < interval.end for interval in busy)


async def test_create_many_makes_every_event_in_order(harness: ProviderHarness) -> None:
    batch = new_batch_id()
    specs = [make_spec(n, batch) for n in range(30)]

    results = await harness.provider.create_many(specs)

    assert [result.key for result in results] == [spec.key for spec in specs]
    assert [result.error for result in results] == [None] * 30
    ids = [result.ref.event_id for result in results if result.ref is not None]
    assert len(set(ids)) == 30
    events = await harness.server_events()
    assert sorted(event.event_id for event in events) == sorted(ids)
    by_id = {event.event_id: event for event in events}
    assert [by_id[event_id].start for event_id in ids] == [spec.start for spec in specs]
    assert {event.batch_id for event in events} == {batch}
