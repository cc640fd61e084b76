"""GoogleProvider with the real google-api-python-client and google-auth against the local fake."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httplib2
import pytest
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError

from syncsvc.config import Settings
from syncsvc.errors import AuthFailed, Permanent, ProviderNotFound, Throttled, Transient
from syncsvc.providers.base import BusyInterval, EventRef, EventSpec
from syncsvc.providers.google import (
    GoogleOptions,
    GoogleProvider,
    event_id_for,
    map_http_error,
    seconds_until_midnight,
    service_account_credentials,
    user_oauth_credentials,
)
from syncsvc.service.connections import UserProviders
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import User
from tests.fakes.google import (
    JWT_BEARER_GRANT,
    FailureMode,
    FakeGoogle,
    FakeGoogleConfig,
    running_fake,
)

CPH = ZoneInfo("Europe/Copenhagen")
DOMAIN = "brewery.example"


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeGoogle]:
    async with running_fake() as server:
        yield server


@pytest.fixture(autouse=True)
def _restore_config(fake: FakeGoogle) -> Iterator[None]:
    yield
    fake.config = FakeGoogleConfig()
    fake.failure = None


@pytest.fixture(scope="module")
def sa_info(fake: FakeGoogle) -> dict[str, str]:
    return fake.new_service_account(
        "syncsvc@proj.iam.gserviceaccount.com", delegated_domains=frozenset({DOMAIN})
    )


def new_user() -> str:
    return f"u{uuid.uuid4().hex[:10]}@{DOMAIN}"


def provider_for(
    fake: FakeGoogle, sa_info: dict[str, str], user: str, **options: Any
) -> GoogleProvider:
    creds = service_account_credentials(sa_info, user, fake.token_url)
    return GoogleProvider(creds, user, GoogleOptions(api_url=fake.api_url, **options))


def meeting(key: str, *, batch: str | None = "b1", hour: int = 9, **extra: Any) -> EventSpec:
    start = datetime(2027, 6, 16, hour, 0, tzinfo=CPH)
    fields: dict[str, Any] = {
        "key": key,
        "activity_id": f"act-{key}",
        "batch_id": batch,
        "subject": f"Visit {key}",
        "start": start,
        "end": start + timedelta(hours=1),
        "timezone": "Europe/Copenhagen",
        "reminder_minutes": 15,
    }
    fields.update(extra)
    return EventSpec(**fields)


@pytest.fixture
async def user_and_provider(
    fake: FakeGoogle, sa_info: dict[str, str]
) -> AsyncIterator[tuple[str, GoogleProvider]]:
    user = new_user()
    provider = provider_for(fake, sa_info, user)
    yield user, provider
    await provider.aclose()


# -- authentication ------------------------------------------------------------------------


async def test_service_account_acts_as_the_delegated_user(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    user, provider = user_and_provider
    ref = await provider.create(meeting("a1"))
    assert fake.token_grants[-1].grant_type == JWT_BEARER_GRANT
    assert fake.token_grants[-1].client == "syncsvc@proj.iam.gserviceaccount.com"
    assert fake.token_grants[-1].subject == user
    [event] = fake.events(user)
    assert event["id"] == ref.event_id
    assert event["creator"]["email"] == user


async def test_delegation_outside_the_allowed_domain_is_auth_failed(
    fake: FakeGoogle, sa_info: dict[str, str]
) -> None:
    provider = provider_for(fake, sa_info, "someone@other.example")
    with pytest.raises(AuthFailed):
        await provider.create(meeting("a1"))


async def test_user_oauth_refreshes_and_refreshes_again_after_expiry(fake: FakeGoogle) -> None:
    user = new_user()
    fake.register_oauth_client("crm-client", "s3cret")
    refresh_token = fake.issue_refresh_token("crm-client", user)
    creds = user_oauth_credentials(refresh_token, "crm-client", "s3cret", fake.token_url)
    provider = GoogleProvider(creds, "primary", GoogleOptions(api_url=fake.api_url))
    await provider.create(meeting("o1"))
    fake.expire_access_tokens()  # the next call meets a 401 and must refresh once more
    await provider.create(meeting("o2", hour=11))
    grants = [g for g in fake.token_grants if g.subject == user]
    assert [g.grant_type for g in grants] == ["refresh_token", "refresh_token"]
    assert sorted(e["summary"] for e in fake.events(user)) == ["Visit o1", "Visit o2"]
    fake.revoke_refresh_token(refresh_token)
    fake.expire_access_tokens()
    with pytest.raises(AuthFailed):
        await provider.find("o1")


async def test_providers_built_from_settings(fake: FakeGoogle, sa_info: dict[str, str]) -> None:
    settings = Settings(google_api_url=fake.api_url, google_token_url=fake.token_url)
    user = new_user()
    delegated = GoogleProvider.with_service_account(settings, user, info=sa_info)
    await delegated.create(meeting("s1"))
    fake.register_oauth_client("crm-client", "s3cret")
    oauth = GoogleProvider.with_user_oauth(
        settings,
        "primary",
        refresh_token=fake.issue_refresh_token("crm-client", user),
        client_id="crm-client",
        client_secret="s3cret",
    )
    found = await oauth.find("s1")
    assert found is not None and found.event_id == event_id_for("s1")
    with pytest.raises(AuthFailed):
        GoogleProvider.with_service_account(settings, user)  # no key file configured


async def test_concurrent_calls_on_one_provider(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    user, provider = user_and_provider
    refs = await asyncio.gather(*(provider.create(meeting(f"c{i:02}")) for i in range(20)))
    assert sorted(r.event_id for r in refs) == sorted(event_id_for(f"c{i:02}") for i in range(20))
    assert len(fake.events(user)) == 20
    assert [g.subject for g in fake.token_grants].count(user) == 1  # one refresh, shared


async def test_the_registry_impersonates_the_calendar_never_the_free_email_field(
    fake: FakeGoogle, sa_info: dict[str, str], tmp_path: Path
) -> None:
    """A tenant setting a user's ``email`` to someone else's address must not make the service
    account act as that person (issue 10): delegation impersonates the calendar's address."""
    key_file = tmp_path / "sa.json"
    key_file.write_text(json.dumps(sa_info), encoding="utf-8")
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'sync.db'}",
        secret_key="k" * 40,
        google_api_url=fake.api_url,
        google_token_url=fake.token_url,
        google_service_account_file=str(key_file),
    )
    calendar, victim = new_user(), new_user()
    user = User(
        tenant_id="ten_x",
        id="u1",
        email=victim,
        timezone="Europe/Copenhagen",
        calendar_provider="google",
        calendar_config={"calendar_id": calendar},
    )
    db = Database(settings.database_url)  # the tenant's connections are read from it
    await db.migrate()
    registry = UserProviders(settings, SecretBox(settings.secret_key), db)
    try:
        await (await registry(user)).create(meeting("r1"))
    finally:
        await registry.aclose()
        await db.aclose()
    assert fake.token_grants[-1].subject == calendar
    assert len(fake.events(calendar)) == 1 and fake.events(victim) == []


# -- single events -------------------------------------------------------------------------


async def test_create_writes_the_event_google_expects(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    user, provider = user_and_provider
    ref = await provider.create(meeting("k1", batch="batch-7"))
    assert ref.event_id == event_id_for("k1")
    assert len(ref.event_id) == 52 and set(ref.event_id) <= set("0123456789abcdefghijklmnopqrstuv")
    [event] = fake.events(user)
    assert event["start"] == {
        "dateTime": "2027-06-16T09:00:00+02:00",
        "timeZone": "Europe/Copenhagen",
    }
    assert event["end"]["dateTime"] == "2027-06-16T10:00:00+02:00"
    assert event["extendedProperties"]["private"] == {
        "syncsvcBatch": "batch-7",
        "syncsvcActivity": "act-k1",
    }
    assert event["reminders"] == {
        "useDefault": False,
        "overrides": [{"method": "popup", "minutes": 15}],
    }
    assert event["status"] == "confirmed"
    assert ref.etag == event["etag"]


async def test_task_becomes_an_all_day_event_on_its_due_date(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    user, provider = user_and_provider
    spec = meeting("t1", kind="task", start=None, end=None, due=date(2027, 6, 30))
    await provider.create(spec)
    [event] = fake.events(user)
    assert event["start"] == {"date": "2027-06-30"}
    assert event["end"] == {"date": "2027-07-01"}  # exclusive end
    assert event["transparency"] == "transparent"


async def test_update_moves_and_renames(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    user, provider = user_and_provider
    ref = await provider.create(meeting("u1"))
    moved = meeting("u1", hour=13, subject="Visit moved")
    new_ref = await provider.update(ref, moved)
    [event] = fake.events(user)
    assert event["summary"] == "Visit moved"
    assert event["start"]["dateTime"] == "2027-06-16T13:00:00+02:00"
    assert new_ref.event_id == ref.event_id and new_ref.etag != ref.etag


async def test_update_of_an_event_the_user_deleted_is_not_found(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    _, provider = user_and_provider
    ref = await provider.create(meeting("u2"))
    await provider.delete(ref)
    with pytest.raises(ProviderNotFound):
        await provider.update(ref, meeting("u2", subject="again"))
    with pytest.raises(ProviderNotFound):
        await provider.update(EventRef("unknown00000"), meeting("u2"))


async def test_delete_twice_and_unknown_are_done(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    user, provider = user_and_provider
    ref = await provider.create(meeting("d1"))
    await provider.delete(ref)
    await provider.delete(ref)  # 410 deleted at Google: done
    await provider.delete(EventRef("neverexisted1"))  # 404: done
    [event] = fake.events(user)
    assert event["status"] == "cancelled"
    assert await provider.find("d1") is None


async def test_find_and_find_batch(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    user, provider = user_and_provider
    refs = [await provider.create(meeting(f"f{i}", batch="A", hour=8 + i)) for i in range(3)]
    other = await provider.create(meeting("g1", batch="B"))
    gone = await provider.create(meeting("f9", batch="A"))
    await provider.delete(gone)
    fake.add_event(
        user,
        {
            "summary": "Lunch",
            "start": {"dateTime": "2027-06-16T12:00:00+02:00"},
            "end": {"dateTime": "2027-06-16T13:00:00+02:00"},
            "extendedProperties": {"private": {"syncsvcBatch": "C"}},
        },
    )
    found = await provider.find_batch("A")
    assert sorted(r.event_id for r in found) == sorted(r.event_id for r in refs)
    assert [r.event_id for r in await provider.find_batch("B")] == [other.event_id]
    assert await provider.find_batch("nothing") == []
    hit = await provider.find("f1")
    assert hit is not None and hit.event_id == refs[1].event_id
    assert await provider.find("missing") is None


async def test_repeated_create_adopts_the_existing_event(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    user, provider = user_and_provider
    first = await provider.create(meeting("i1"))
    before = fake.stats(user).requests
    second = await provider.create(meeting("i1"))
    assert second.event_id == first.event_id
    assert len(fake.events(user)) == 1
    # insert → 409, one get, and one patch to the spec as it is now (edits since must land)
    assert fake.stats(user).requests - before == 3


async def test_create_after_delete_brings_the_event_back(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    user, provider = user_and_provider
    ref = await provider.create(meeting("r1"))
    await provider.delete(ref)
    again = await provider.create(meeting("r1", subject="Visit again"))
    assert again.event_id == ref.event_id
    [event] = fake.events(user)
    assert (event["status"], event["summary"]) == ("confirmed", "Visit again")
    assert await provider.find("r1") == again


async def test_cancelling_an_activity_removes_its_event_until_it_is_created_again(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    user, provider = user_and_provider
    ref = await provider.create(meeting("c1"))
    cancelled = await provider.update(ref, meeting("c1", status="cancelled"))
    assert cancelled.event_id == ref.event_id
    assert [e["status"] for e in fake.events(user)] == ["cancelled"]
    assert await provider.find("c1") is None
    with pytest.raises(ProviderNotFound):  # a plain edit does not resurrect it
        await provider.update(ref, meeting("c1", subject="edited"))
    await provider.create(meeting("c1", subject="un-cancelled"))
    assert [(e["status"], e["summary"]) for e in fake.events(user)] == [
        ("confirmed", "un-cancelled")
    ]


# -- batches -------------------------------------------------------------------------------


async def test_batch_of_120_creates_uses_three_round_trips(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    user, provider = user_and_provider
    specs = [meeting(f"m{i:03}", hour=8 + i % 8) for i in range(120)]
    await provider.create(specs[7])  # already there: the batch must adopt it
    before = fake.stats(user)
    http_before, calls_before = before.http_requests, before.requests
    results = await provider.create_many(specs)
    assert [r.key for r in results] == [s.key for s in specs]
    assert all(r.error is None and r.ref is not None for r in results)
    assert [r.ref.event_id for r in results if r.ref] == [event_id_for(s.key) for s in specs]
    events = fake.events(user)
    assert len(events) == 120
    stats = fake.stats(user)
    # ceil(120 / 50) = 3 batches, plus one get and one patch for the adopted duplicate.
    assert stats.http_requests - http_before == 5
    assert stats.requests - calls_before == 122


async def test_batch_stops_after_throttling_and_reports_the_rest_throttled(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    user, provider = user_and_provider
    fake.config.quota_requests = 60
    results = await provider.create_many([meeting(f"q{i:03}") for i in range(120)])
    created = [r for r in results if r.ref is not None]
    throttled = [r for r in results if isinstance(r.error, Throttled)]
    assert (len(created), len(throttled)) == (60, 60)
    assert all(r.error.retry_after_s is None for r in throttled if isinstance(r.error, Throttled))
    stats = fake.stats(user)
    assert stats.http_requests == 2  # the third chunk was never sent
    assert stats.throttled == 40
    assert len(fake.events(user)) == 60


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason"),
    [(403, "rateLimitExceeded"), (403, "userRateLimitExceeded"), (429, "rateLimitExceeded")],
)
async def test_rate_limits_are_throttled_without_retry_after(
    fake: FakeGoogle, sa_info: dict[str, str], status: int, reason: str
) -> None:
    user = new_user()
    provider = provider_for(fake, sa_info, user)
    fake.config.quota_requests = 2
    fake.config.throttle_status = status
    fake.config.throttle_reason = reason
    await provider.create(meeting("x1"))
    await provider.create(meeting("x2"))
    with pytest.raises(Throttled) as caught:
        await provider.create(meeting("x3"))
    assert caught.value.retry_after_s is None
    assert reason in caught.value.message
    assert fake.stats(user).throttled == 1


async def test_daily_quota_waits_for_midnight_pacific(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    _, provider = user_and_provider
    fake.config.project_daily_requests = 0
    with pytest.raises(Throttled) as caught:
        await provider.find("anything")
    wait = caught.value.retry_after_s
    expected = seconds_until_midnight("America/Los_Angeles")
    assert wait is not None and abs(wait - expected) < 60


def test_seconds_until_midnight_pacific() -> None:
    # 2027-06-16 20:00 UTC is 13:00 PDT: 11 hours to midnight.
    now = datetime(2027, 6, 16, 20, 0, tzinfo=UTC)
    assert seconds_until_midnight("America/Los_Angeles", now) == 11 * 3600


async def test_server_errors_and_hangs_are_transient(
    fake: FakeGoogle, sa_info: dict[str, str]
) -> None:
    user = new_user()
    provider = provider_for(fake, sa_info, user, timeout_s=0.3)
    fake.failure = FailureMode(fraction=1.0, status=503)
    with pytest.raises(Transient):
        await provider.create(meeting("e1"))
    fake.failure = FailureMode(fraction=1.0, status=500)
    with pytest.raises(Transient):
        await provider.find("e1")
    fake.failure = FailureMode(fraction=1.0, hang_s=1.0)
    with pytest.raises(Transient):
        await provider.find("e1")
    fake.failure = None
    assert await provider.find("e1") is None


async def test_end_before_start_is_permanent(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    _, provider = user_and_provider
    start = datetime(2027, 6, 16, 10, 0, tzinfo=CPH)
    with pytest.raises(Permanent, match="time range is empty"):
        await provider.create(meeting("p1", start=start, end=start - timedelta(minutes=30)))


def raw_service(fake: FakeGoogle, sa_info: dict[str, str], user: str) -> Any:
    """The real client, unwrapped, for bodies our provider would never send."""
    import google_auth_httplib2

    creds = service_account_credentials(sa_info, user, fake.token_url)
    http = google_auth_httplib2.AuthorizedHttp(creds, http=httplib2.Http(timeout=5))
    return build(
        "calendar",
        "v3",
        http=http,
        static_discovery=True,
        cache_discovery=False,
        client_options={"api_endpoint": fake.api_url},
    )


async def run(request: Any) -> Any:
    """Executes a raw client request off the loop (the fake serves on this loop)."""
    return await asyncio.to_thread(request.execute)


GOOD_TIMES = {
    "start": {"dateTime": "2027-06-16T09:00:00+02:00"},
    "end": {"dateTime": "2027-06-16T10:00:00+02:00"},
}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({**GOOD_TIMES, "colour": "red"}, 'Unknown name "colour"'),
        ({**GOOD_TIMES, "summary": 5}, "expected a string"),
        ({**GOOD_TIMES, "reminders": {"useDefault": "no"}}, "expected bool"),
        ({**GOOD_TIMES, "id": "UPPER_case"}, "Invalid resource id"),
        ({**GOOD_TIMES, "id": "abcd"}, "Invalid resource id"),
        (
            {"start": {"dateTime": "2027-06-16 09:00"}, "end": GOOD_TIMES["end"]},
            "RFC 3339",
        ),
        (
            {
                "start": {"dateTime": "2027-06-16T09:00:00", "timeZone": "Mars/Olympus"},
                "end": {"dateTime": "2027-06-16T10:00:00", "timeZone": "Mars/Olympus"},
            },
            "Invalid time zone",
        ),
        (
            {"start": {"dateTime": "2027-06-16T09:00:00"}, "end": GOOD_TIMES["end"]},
            "Missing time zone",
        ),
        ({"summary": "no times"}, "Missing start time"),
    ],
)
async def test_fake_rejects_what_google_rejects_and_we_call_it_permanent(
    fake: FakeGoogle, sa_info: dict[str, str], body: dict[str, Any], message: str
) -> None:
    service = raw_service(fake, sa_info, new_user())
    with pytest.raises(HttpError) as caught:
        await run(service.events().insert(calendarId="primary", body=body))
    assert caught.value.resp.status == 400
    assert message in caught.value.reason
    assert isinstance(map_http_error(caught.value), Permanent)


async def test_fake_incremental_sync_and_full_sync_required(
    fake: FakeGoogle, sa_info: dict[str, str]
) -> None:
    user = new_user()
    service = raw_service(fake, sa_info, user)
    events = service.events()
    await run(events.insert(calendarId="primary", body={**GOOD_TIMES, "id": "aaaaa1"}))
    first = await run(events.list(calendarId="primary"))
    assert [e["id"] for e in first["items"]] == ["aaaaa1"]
    await run(events.insert(calendarId="primary", body={**GOOD_TIMES, "id": "bbbbb2"}))
    await run(events.delete(calendarId="primary", eventId="aaaaa1"))
    changes = await run(events.list(calendarId="primary", syncToken=first["nextSyncToken"]))
    assert {(e["id"], e["status"]) for e in changes["items"]} == {
        ("aaaaa1", "cancelled"),
        ("bbbbb2", "confirmed"),
    }
    fake.invalidate_sync_tokens(user)
    with pytest.raises(HttpError) as caught:
        await run(events.list(calendarId="primary", syncToken=changes["nextSyncToken"]))
    assert caught.value.resp.status == 410
    assert caught.value.error_details[0]["reason"] == "fullSyncRequired"
    with pytest.raises(HttpError) as dup:
        await run(events.insert(calendarId="primary", body={**GOOD_TIMES, "id": "bbbbb2"}))
    assert dup.value.resp.status == 409


# -- time off and busy time ----------------------------------------------------------------


async def test_time_off_from_out_of_office_events(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    user, provider = user_and_provider
    ooo = {"eventType": "outOfOffice", "summary": "Away"}
    fake.add_event(
        user,
        {
            **ooo,
            "start": {"dateTime": "2027-06-18T00:00:00", "timeZone": "Europe/Copenhagen"},
            "end": {"dateTime": "2027-06-20T00:00:00", "timeZone": "Europe/Copenhagen"},
        },
    )
    fake.add_event(
        user,
        {
            **ooo,
            "start": {"dateTime": "2027-06-22T13:00:00+02:00"},
            "end": {"dateTime": "2027-06-22T17:00:00+02:00"},
        },
    )
    fake.add_event(  # an ordinary meeting is not time off
        user,
        {
            "summary": "Board",
            "start": {"dateTime": "2027-06-24T09:00:00+02:00"},
            "end": {"dateTime": "2027-06-24T10:00:00+02:00"},
        },
    )
    off = await provider.time_off(date(2027, 6, 14), date(2027, 6, 30))
    assert off.days == {date(2027, 6, 18), date(2027, 6, 19), date(2027, 6, 22)}
    clipped = await provider.time_off(date(2027, 6, 19), date(2027, 6, 21))
    assert clipped.days == {date(2027, 6, 19)}


async def test_busy_via_freebusy(
    fake: FakeGoogle, user_and_provider: tuple[str, GoogleProvider]
) -> None:
    user, provider = user_and_provider
    await provider.create(meeting("b1", hour=9))  # 09-10
    await provider.create(meeting("b2", hour=10))  # 10-11, touches the first: merged
    gone = await provider.create(meeting("b3", hour=14))
    await provider.delete(gone)  # cancelled: not busy
    await provider.create(meeting("b4", kind="task", start=None, end=None, due=date(2027, 6, 16)))
    fake.add_event(
        user,
        {
            "summary": "Late",
            "start": {"dateTime": "2027-06-16T15:30:00+02:00"},
            "end": {"dateTime": "2027-06-16T18:00:00+02:00"},
        },
    )
    window_start = datetime(2027, 6, 16, 8, 0, tzinfo=CPH)
    window_end = datetime(2027, 6, 16, 17, 0, tzinfo=CPH)
    busy = await provider.busy(window_start, window_end)
    assert busy == [
        BusyInterval(
            datetime(2027, 6, 16, 7, 0, tzinfo=UTC), datetime(2027, 6, 16, 9, 0, tzinfo=UTC)
        ),
        BusyInterval(
            datetime(2027, 6, 16, 13, 30, tzinfo=UTC), datetime(2027, 6, 16, 15, 0, tzinfo=UTC)
        ),
    ]
