"""GraphProvider with the real MSAL and aiohttp against the fake Graph over https.

Times are Europe/Copenhagen in summer 2027 (CEST, UTC+2); expected values are worked out by
hand in the comments.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from zoneinfo import ZoneInfo

import aiohttp
import certifi
import pytest

import syncsvc.providers.graph as graph_module
from syncsvc.errors import (
    AuthFailed,
    Permanent,
    ProviderConflict,
    ProviderNotFound,
    Throttled,
    Transient,
)
from syncsvc.providers._http import ca_bundle_path, parse_retry_after, ssl_context
from syncsvc.providers.base import BusyInterval, EventAttendee, EventRef, EventSpec
from syncsvc.providers.graph import (
    PROP_BATCH,
    GraphAnswer,
    GraphClient,
    GraphProvider,
    error_for,
    transaction_id,
)
from tests.fakes.graph import FakeGraph, Fault, FaultPlan, ThrottleLimits, running_fake_graph

CPH = ZoneInfo("Europe/Copenhagen")
UTC = dt.UTC
MONDAY_9 = dt.datetime(2027, 6, 14, 9, 0, tzinfo=CPH)


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeGraph]:
    async with running_fake_graph() as server:
        yield server


def new_client(fake: FakeGraph, **changes: object) -> GraphClient:
    assert fake.ca_bundle is not None
    settings: dict[str, object] = {
        "tenant_id": fake.tenant_id,
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
        "api_url": fake.graph_url,
        "authority_url": fake.authority_url,
        "ca_bundle": str(fake.ca_bundle),
        **changes,
    }
    return GraphClient(**settings)  # type: ignore[arg-type]


@pytest.fixture
async def client(fake: FakeGraph) -> AsyncIterator[GraphClient]:
    graph = new_client(fake)
    yield graph
    await graph.aclose()
    fake.reset_throttling()


@pytest.fixture
def mailbox(fake: FakeGraph) -> str:
    address = f"sales-{uuid.uuid4().hex[:8]}@contoso.example"
    fake.add_mailbox(address, "Europe/Copenhagen")
    return address


@pytest.fixture
def provider(client: GraphClient, mailbox: str) -> GraphProvider:
    return client.mailbox(mailbox, "Europe/Copenhagen")


def spec(n: int, batch_id: str | None = "batch-1", **changes: object) -> EventSpec:
    """Meeting ``n``: 30 minutes from Monday 09:00 + n half-hours."""
    start = MONDAY_9 + dt.timedelta(minutes=30 * n)
    base = EventSpec(
        key=f"key-{uuid.uuid4().hex[:10]}-{n}",
        activity_id=f"activity-{n}",
        batch_id=batch_id,
        subject=f"Besøg {n}",
        start=start,
        end=start + dt.timedelta(minutes=30),
        timezone="Europe/Copenhagen",
        description="Tag brochurer med",
        location="Vesterbrogade 1",
        reminder_minutes=15,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# --- auth ---------------------------------------------------------------------------------------


async def test_one_token_serves_many_calls_even_when_they_start_together(
    fake: FakeGraph, client: GraphClient, provider: GraphProvider
) -> None:
    before = fake.token_requests

    await asyncio.gather(*(provider.find(f"nothing-{n}") for n in range(8)))
    await provider.create(spec(1))
    await provider.find_batch("batch-1")

    assert fake.token_requests - before == 1


async def test_wrong_client_secret_is_auth_failed_every_time(fake: FakeGraph, mailbox: str) -> None:
    graph = new_client(fake, client_secret="not-the-secret")
    try:
        provider = graph.mailbox(mailbox)
        with pytest.raises(AuthFailed, match="invalid_client: AADSTS7000215"):
            await provider.create(spec(1))
        with pytest.raises(AuthFailed):
            await provider.find("k")
    finally:
        await graph.aclose()
    assert fake.mailbox_events(mailbox) == []


async def test_unknown_tenant_is_auth_failed(fake: FakeGraph, mailbox: str) -> None:
    graph = new_client(fake, tenant_id="no-such-tenant")
    try:
        with pytest.raises(AuthFailed, match="authority"):
            await graph.mailbox(mailbox).find("k")
    finally:
        await graph.aclose()


async def test_a_revoked_token_is_replaced_once(
    fake: FakeGraph, client: GraphClient, provider: GraphProvider
) -> None:
    await provider.find("k")
    before = fake.token_requests
    fake.revoke_tokens()

    assert await provider.find("k") is None

    assert fake.token_requests - before == 1


async def test_graph_wants_a_bearer_token(fake: FakeGraph, mailbox: str) -> None:
    assert fake.ca_bundle is not None
    context = ssl_context(str(fake.ca_bundle))
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{fake.graph_url}/users/{mailbox}/events", ssl=context) as response,
    ):
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "InvalidAuthenticationToken"


async def test_a_mailbox_the_app_may_not_touch_is_auth_failed(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    fake.deny(mailbox)
    with pytest.raises(AuthFailed, match="ErrorAccessDenied"):
        await provider.create(spec(1))


async def test_an_unknown_mailbox_is_not_found(client: GraphClient) -> None:
    with pytest.raises(ProviderNotFound, match="ErrorInvalidUser"):
        await client.mailbox("nobody@contoso.example").create(spec(1))


async def test_the_ca_bundle_comes_from_ssl_cert_file(
    fake: FakeGraph, mailbox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert fake.ca_bundle is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(fake.ca_bundle))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(fake.ca_bundle))
    assert ca_bundle_path() == str(fake.ca_bundle)
    graph = GraphClient(  # no ca_bundle: it is read from the environment
        tenant_id=fake.tenant_id,
        client_id=fake.client_id,
        client_secret=fake.client_secret,
        api_url=fake.graph_url,
        authority_url=fake.authority_url,
    )
    assert graph.ca_bundle == str(fake.ca_bundle)
    try:
        ref = await graph.mailbox(mailbox).create(spec(1))
    finally:
        await graph.aclose()
    assert [e.id for e in fake.mailbox_events(mailbox)] == [ref.event_id]


async def test_a_client_that_does_not_trust_the_fake_fails_transiently(
    fake: FakeGraph, mailbox: str
) -> None:
    graph = new_client(fake, ca_bundle=certifi.where())  # public CAs only
    try:
        with pytest.raises(Transient):
            await graph.mailbox(mailbox).find("k")
    finally:
        await graph.aclose()


# --- writes and reads ---------------------------------------------------------------------------


async def test_create_writes_what_outlook_shows(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    meeting = spec(
        2,
        attendees=(EventAttendee("Bo Ærbo", "bo@kunde.example"),),
    )

    ref = await provider.create(meeting)

    [event] = fake.mailbox_events(mailbox)
    assert ref == EventRef(event.id, event.change_key)
    # 09:00 + 2 half-hours = 10:00 CEST = 08:00 UTC, kept in the user's zone as sent.
    assert event.props["start"] == {
        "dateTime": "2027-06-14T10:00:00",
        "timeZone": "Europe/Copenhagen",
    }
    assert event.props["end"] == {
        "dateTime": "2027-06-14T10:30:00",
        "timeZone": "Europe/Copenhagen",
    }
    assert event.start == dt.datetime(2027, 6, 14, 8, 0, tzinfo=UTC)
    assert event.props["body"] == {"contentType": "text", "content": "Tag brochurer med"}
    assert event.props["location"] == {"displayName": "Vesterbrogade 1"}
    assert (event.props["isReminderOn"], event.props["reminderMinutesBeforeStart"]) == (True, 15)
    assert event.show_as == "busy"
    assert event.props["attendees"] == [
        {"emailAddress": {"address": "bo@kunde.example", "name": "Bo Ærbo"}, "type": "required"}
    ]
    assert event.transaction_id == transaction_id(meeting.key)
    assert event.extended_value("syncsvcBatch") == "batch-1"
    assert event.extended_value("syncsvcActivity") == "activity-2"


async def test_a_meeting_without_attendees_invites_nobody(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    await provider.create(spec(1, reminder_minutes=None))

    [event] = fake.mailbox_events(mailbox)
    assert "attendees" not in event.props
    assert event.props["isReminderOn"] is False


async def test_create_with_one_key_twice_returns_the_first_event(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    meeting = spec(1)

    first = await provider.create(meeting)
    second = await provider.create(meeting)

    assert second.event_id == first.event_id
    assert len(fake.mailbox_events(mailbox)) == 1


async def test_update_moves_the_event_and_changes_its_change_key(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    meeting = spec(1)
    ref = await provider.create(meeting)

    moved = await provider.update(
        ref,
        replace(
            meeting,
            subject="Flyttet",
            start=dt.datetime(2027, 6, 16, 13, 0, tzinfo=CPH),
            end=dt.datetime(2027, 6, 16, 14, 0, tzinfo=CPH),
        ),
    )

    [event] = fake.mailbox_events(mailbox)
    assert moved.event_id == ref.event_id
    assert moved.etag == event.change_key != ref.etag
    assert (event.subject, event.start) == ("Flyttet", dt.datetime(2027, 6, 16, 11, 0, tzinfo=UTC))


async def test_delete_then_delete_again_then_update_is_not_found(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    meeting = spec(1)
    ref = await provider.create(meeting)

    await provider.delete(ref)
    await provider.delete(ref)

    assert fake.mailbox_events(mailbox) == []
    with pytest.raises(ProviderNotFound, match="ErrorItemNotFound"):
        await provider.update(ref, meeting)


async def test_find_and_find_batch_use_the_extended_properties(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    a1 = await provider.create(spec(1, "batch-a"))
    a2 = await provider.create(spec(2, "batch-a"))
    mine = spec(3, "batch-b")
    b1 = await provider.create(mine)
    fake.add_foreign_event(mailbox, "batch-a", MONDAY_9, MONDAY_9 + dt.timedelta(hours=1))

    assert sorted(r.event_id for r in await provider.find_batch("batch-a")) == sorted(
        [a1.event_id, a2.event_id]
    )
    assert await provider.find(mine.key) == b1
    assert await provider.find("it's-not-there") is None
    assert await provider.find_batch("batch-c") == []


async def test_a_task_is_a_free_all_day_item_on_its_due_date(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    await provider.create(spec(1, start=None, end=None, kind="task", due=dt.date(2027, 6, 16)))

    [event] = fake.mailbox_events(mailbox)
    assert event.is_all_day
    assert (event.props["start"]["dateTime"], event.props["end"]["dateTime"]) == (
        "2027-06-16T00:00:00",
        "2027-06-17T00:00:00",
    )
    assert event.show_as == "free"


async def test_a_cancelled_activity_stays_but_frees_the_time(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    meeting = spec(1)
    ref = await provider.create(meeting)

    await provider.update(ref, replace(meeting, status="cancelled"))

    [event] = fake.mailbox_events(mailbox)
    assert (event.subject, event.show_as) == ("Cancelled: Besøg 1", "free")
    assert event.props["isReminderOn"] is False
    assert event.extended_value("syncsvcStatus") == "cancelled"
    assert await provider.busy(MONDAY_9, MONDAY_9 + dt.timedelta(days=1)) == []
    assert [r.event_id for r in await provider.find_batch("batch-1")] == [ref.event_id]


# --- $batch -------------------------------------------------------------------------------------


async def test_45_creates_take_3_round_trips(
    fake: FakeGraph, provider: GraphProvider, mailbox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = [spec(n, "batch-45") for n in range(45)]
    trips = len(fake.round_trips)

    results = await provider.create_many(specs)

    assert fake.round_trips[trips:] == [("POST", "/$batch")] * 3
    assert [r.key for r in results] == [s.key for s in specs]
    assert all(r.error is None and r.ref is not None for r in results)
    events = {e.id: e for e in fake.mailbox_events(mailbox)}
    assert len(events) == 45
    assert [events[r.ref.event_id].start for r in results if r.ref] == [s.start for s in specs]
    # Sub-requests to one mailbox are served at most 4 at a time, as Outlook does.
    assert fake.stats(mailbox).max_concurrency <= 4
    # Graph pages lists; with 10 per page, 45 events take 5 pages.
    monkeypatch.setattr(graph_module, "GRAPH_PAGE_SIZE", 10)
    trips = len(fake.round_trips)
    assert len(await provider.find_batch("batch-45")) == 45
    assert len(fake.round_trips) - trips == 5


async def test_a_throttled_item_in_a_batch_reports_its_own_retry_after(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    fake.reset_throttling(ThrottleLimits(requests=5, window_s=600))
    specs = [spec(n) for n in range(25)]
    trips = len(fake.round_trips)

    results = await provider.create_many(specs)

    created = [r for r in results if r.ref is not None]
    throttled = [r.error for r in results if isinstance(r.error, Throttled)]
    # 5 fit in the window; the other 15 of the first batch get 429 with ~600 s to wait, and
    # the last 5 are not sent at all while that wait runs.
    assert len(created) == 5
    assert len(throttled) == 20
    assert {e.retry_after_s for e in throttled} == {600.0}
    assert fake.round_trips[trips:] == [("POST", "/$batch")]
    assert len(fake.mailbox_events(mailbox)) == 5
    assert fake.stats(mailbox).early == 0


async def test_the_fake_refuses_batches_over_20(client: GraphClient, mailbox: str) -> None:
    items = [{"id": str(n), "method": "GET", "url": f"/users/{mailbox}/events"} for n in range(21)]

    answer = await client.send("POST", client.url("/$batch"), {"requests": items})

    assert answer.status == 400
    assert isinstance(error_for(answer, "batch"), Permanent)


async def test_the_fake_expands_only_the_asked_extended_property(
    client: GraphClient, provider: GraphProvider, mailbox: str
) -> None:
    await provider.create(spec(1, "batch-x"))
    params = {"$expand": f"singleValueExtendedProperties($filter=id eq '{PROP_BATCH}')"}

    answer = await client.send("GET", client.url(f"/users/{mailbox}/events", params))

    [event] = answer.body["value"]
    assert event["singleValueExtendedProperties"] == [{"id": PROP_BATCH, "value": "batch-x"}]


async def test_the_fake_needs_a_window_for_calendar_view(client: GraphClient, mailbox: str) -> None:
    answer = await client.send("GET", client.url(f"/users/{mailbox}/calendarView"))

    assert (answer.status, answer.body["error"]["code"]) == (400, "ErrorInvalidParameter")


# --- errors -------------------------------------------------------------------------------------


async def test_a_body_graph_rejects_is_permanent(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    wrong_type = spec(1, reminder_minutes="15")

    with pytest.raises(Permanent, match="RequestBodyRead"):
        await provider.create(wrong_type)
    assert fake.mailbox_events(mailbox) == []


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"colour": "red"}, 400, "RequestBodyRead"),
        ({"subject": 7}, 400, "RequestBodyRead"),
        ({"showAs": "sleeping"}, 400, "RequestBodyRead"),
        ({"body": {"contentType": "text", "content": "x", "extra": 1}}, 400, "RequestBodyRead"),
        (
            {"start": {"dateTime": "16/06/2027 09:00", "timeZone": "UTC"}},
            400,
            "UnableToDeserializePostBody",
        ),
        (
            {"start": {"dateTime": "2027-06-16T09:00:00", "timeZone": "Mars/Olympus"}},
            400,
            "TimeZoneNotSupportedException",
        ),
        (
            {"end": {"dateTime": "2027-06-16T08:00:00", "timeZone": "UTC"}},
            400,
            "ErrorInvalidRequest",
        ),
        ({"isAllDay": True}, 400, "ErrorPropertyValidationFailure"),
        ({"subject": None}, 201, None),
        (
            {
                "start": {
                    "dateTime": "2027-06-16T09:00:00.0000000",
                    "timeZone": "W. Europe Standard Time",
                }
            },
            201,
            None,
        ),
    ],
)
async def test_the_fake_validates_bodies_like_graph(
    client: GraphClient, mailbox: str, change: dict[str, object], status: int, code: str | None
) -> None:
    body: dict[str, object] = {
        "subject": "x",
        "start": {"dateTime": "2027-06-16T09:00:00", "timeZone": "UTC"},
        "end": {"dateTime": "2027-06-16T10:00:00", "timeZone": "UTC"},
        **change,
    }

    answer = await client.send("POST", client.url(f"/users/{mailbox}/calendar/events"), body)

    assert answer.status == status
    if code is not None:
        assert answer.body["error"]["code"] == code


async def test_over_the_mailbox_window_is_throttled_until_retry_after(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    fake.reset_throttling(ThrottleLimits(requests=2, window_s=600))
    await provider.create(spec(1))
    await provider.create(spec(2))

    with pytest.raises(Throttled, match="ApplicationThrottled") as caught:
        await provider.create(spec(3))
    assert caught.value.retry_after_s == 600
    # Calling again during the penalty is refused too, and the fake notices the early call.
    with pytest.raises(Throttled):
        await provider.find("k")
    stats = fake.stats(mailbox)
    assert (stats.accepted, stats.throttled, stats.early) == (2, 2, 1)


async def test_a_fifth_concurrent_request_is_throttled(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    fake.reset_throttling(ThrottleLimits(latency_s=0.2, concurrency_retry_after_s=1))

    outcomes = await asyncio.gather(
        *(provider.create(spec(n)) for n in range(6)), return_exceptions=True
    )

    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(errors) == 2
    assert all(isinstance(e, Throttled) and e.retry_after_s == 1 for e in errors)
    assert "MailboxConcurrency" in str(errors[0])
    assert fake.stats(mailbox).max_concurrency == 4


@pytest.mark.parametrize(
    ("fault", "error", "retry_after_s"),
    [
        (Fault(status=503, retry_after_s=7), Throttled, 7.0),
        (Fault(status=504, retry_after_s=3), Throttled, 3.0),
        (Fault(status=503, retry_after_s=None), Transient, None),
        (Fault(status=500, retry_after_s=None), Transient, None),
    ],
)
async def test_server_trouble_maps_onto_our_errors(
    fake: FakeGraph,
    provider: GraphProvider,
    mailbox: str,
    fault: Fault,
    error: type[Exception],
    retry_after_s: float | None,
) -> None:
    fake.script_faults(mailbox, fault)

    with pytest.raises(error) as caught:
        await provider.create(spec(1))

    assert type(caught.value) is error
    assert getattr(caught.value, "retry_after_s", None) == retry_after_s


async def test_a_share_of_failing_calls_is_injected_and_counted(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    fake.set_faults(FaultPlan(fraction=0.3, fault=Fault(status=503, retry_after_s=2), seed=7))
    try:
        outcomes = [await _outcome(provider.find(f"k{n}")) for n in range(20)]
    finally:
        fake.set_faults(FaultPlan())

    failures = [o for o in outcomes if isinstance(o, Throttled)]
    assert 0 < len(failures) < 20
    assert len(failures) == fake.stats(mailbox).faults
    assert {f.retry_after_s for f in failures} == {2.0}


async def _outcome(call: Awaitable[object]) -> object:
    try:
        return await call
    except Throttled as exc:
        return exc


async def test_a_hanging_call_times_out_as_transient(fake: FakeGraph, mailbox: str) -> None:
    graph = new_client(fake, timeout_s=0.3)
    fake.script_faults(mailbox, Fault(hang_s=2.0))
    try:
        with pytest.raises(Transient, match="timed out"):
            await graph.mailbox(mailbox).create(spec(1))
    finally:
        await graph.aclose()


@pytest.mark.parametrize(
    ("status", "headers", "error"),
    [
        (401, {}, AuthFailed),
        (403, {}, AuthFailed),
        (404, {}, ProviderNotFound),
        (409, {}, ProviderConflict),
        (412, {}, ProviderConflict),
        (429, {}, Throttled),
        (400, {}, Permanent),
        (502, {}, Transient),
    ],
)
def test_error_mapping(status: int, headers: dict[str, str], error: type[Exception]) -> None:
    body = {"error": {"code": "SomeCode", "message": "why"}}

    mapped = error_for(GraphAnswer(status, headers, body), "op")

    assert isinstance(mapped, error)
    assert "SomeCode" in str(mapped)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Wed, 21 Oct 2026 07:28:30 GMT", now_s=1792567700.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# --- time off and busy time ---------------------------------------------------------------------


async def test_time_off_from_oof_days_and_scheduled_automatic_replies(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    # Away Mon 5 July 08:00 to Fri 9 July 17:00 CEST (06:00Z–15:00Z): the core hours of all
    # five days are covered.
    fake.set_automatic_replies(
        mailbox,
        "scheduled",
        dt.datetime(2027, 7, 5, 6, 0, tzinfo=UTC),
        dt.datetime(2027, 7, 9, 15, 0, tzinfo=UTC),
    )
    # An all-day out-of-office item for the 12th and 13th (end date exclusive).
    fake.add_foreign_event(
        mailbox, "Ferie", dt.date(2027, 7, 12), dt.date(2027, 7, 14), show_as="oof"
    )
    # Two hours out of office is no day off; nor is a busy all-day item.
    fake.add_foreign_event(
        mailbox,
        "Tandlæge",
        dt.datetime(2027, 7, 15, 10, 0, tzinfo=CPH),
        dt.datetime(2027, 7, 15, 12, 0, tzinfo=CPH),
        show_as="oof",
    )
    fake.add_foreign_event(mailbox, "Messe", dt.date(2027, 7, 2), dt.date(2027, 7, 3))

    time_off = await provider.time_off(dt.date(2027, 7, 1), dt.date(2027, 7, 15))

    assert time_off.days == frozenset({dt.date(2027, 7, d) for d in (5, 6, 7, 8, 9, 12, 13)})
    # The range is inclusive and clips what lies outside it.
    clipped = await provider.time_off(dt.date(2027, 7, 9), dt.date(2027, 7, 12))
    assert clipped.days == frozenset({dt.date(2027, 7, 9), dt.date(2027, 7, 12)})


async def test_automatic_replies_that_are_not_scheduled_are_no_time_off(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    fake.set_automatic_replies(
        mailbox,
        "alwaysEnabled",
        dt.datetime(2027, 7, 5, 0, 0, tzinfo=UTC),
        dt.datetime(2027, 7, 9, 0, 0, tzinfo=UTC),
    )

    time_off = await provider.time_off(dt.date(2027, 7, 1), dt.date(2027, 7, 15))

    assert time_off.days == frozenset()


async def test_busy_comes_from_get_schedule_without_free_items(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    def at(hour: int, minute: int = 0) -> dt.datetime:
        return dt.datetime(2027, 6, 15, hour, minute, tzinfo=CPH)

    fake.add_foreign_event(mailbox, "Kunde", at(8), at(9, 30))
    fake.add_foreign_event(mailbox, "Måske", at(11), at(12), show_as="tentative")
    fake.add_foreign_event(mailbox, "Frokost", at(12), at(13), show_as="free")
    fake.add_foreign_event(mailbox, "Læge", at(14), at(15), show_as="oof")
    fake.add_foreign_event(
        mailbox, "Næste uge", at(8) + dt.timedelta(days=7), at(9) + dt.timedelta(days=7)
    )
    own = spec(0, start=at(15), end=at(16))
    await provider.create(own)

    busy = await provider.busy(at(0), at(0) + dt.timedelta(days=1))

    assert busy == [
        BusyInterval(at(8), at(9, 30)),
        BusyInterval(at(11), at(12)),
        BusyInterval(at(14), at(15)),
        BusyInterval(at(15), at(16)),
    ]


async def test_an_update_resends_attendees_only_when_they_changed(
    fake: FakeGraph, provider: GraphProvider, mailbox: str
) -> None:
    """Exchange mails every attendee when the list is sent again: a retitle must not send it."""
    guests = (EventAttendee("Ada", "ada@brewery.example"), EventAttendee("Bo", "bo@x.example"))
    meeting = spec(1, attendees=guests)
    ref = await provider.create(meeting)
    fake.patch_bodies.clear()

    await provider.update(ref, replace(meeting, subject="Besøg igen"))
    # The same people, in another order and with the address in other case.
    reordered = (EventAttendee("Bo", "BO@x.example"), guests[0])
    await provider.update(ref, replace(meeting, subject="Besøg 3", attendees=reordered))
    assert [("attendees" in body, body["subject"]) for _, body in fake.patch_bodies] == [
        (False, "Besøg igen"),
        (False, "Besøg 3"),
    ]

    await provider.update(ref, replace(meeting, attendees=guests[:1]))
    assert fake.patch_bodies[-1][1]["attendees"] == [
        {"emailAddress": {"address": "ada@brewery.example", "name": "Ada"}, "type": "required"}
    ]
    (event,) = fake.mailbox_events(mailbox)
    assert event.subject == meeting.subject
    assert [a["emailAddress"]["address"] for a in event.props["attendees"]] == [
        "ada@brewery.example"
    ]
