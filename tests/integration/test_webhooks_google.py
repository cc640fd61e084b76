"""Google push end to end: channels opened at the fake point at the real app on a real port;
notifications are verified and acknowledged fast; the worker's incremental sync records what
the user did in their calendar; channels are renewed and stopped."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from syncsvc.errors import Permanent
from syncsvc.providers import google as google_module
from syncsvc.providers.google import (
    FullSyncRequired,
    GoogleOptions,
    GoogleProvider,
    service_account_credentials,
)
from tests.fakes.google import FakeGoogle, running_fake

DOMAIN = "brewery.example"
SA_EMAIL = "syncsvc@proj.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeGoogle]:
    async with running_fake() as server:
        yield server


@pytest.fixture(scope="module")
def sa_info(fake: FakeGoogle) -> dict[str, str]:
    return fake.new_service_account(SA_EMAIL, delegated_domains=frozenset({DOMAIN}))


def new_user() -> str:
    return f"u{uuid.uuid4().hex[:10]}@{DOMAIN}"


def provider_for(fake: FakeGoogle, sa_info: dict[str, str], user: str) -> GoogleProvider:
    creds = service_account_credentials(sa_info, user, fake.token_url)
    return GoogleProvider(creds, user, GoogleOptions(api_url=fake.api_url))


def timed_event(day: int, hour: int, summary: str = "Own") -> dict[str, Any]:
    start = datetime(2027, 6, day, hour, tzinfo=UTC)
    return {
        "summary": summary,
        "start": {"dateTime": start.isoformat()},
        "end": {"dateTime": (start + timedelta(hours=1)).isoformat()},
    }


class Receiver:
    """A plain HTTP endpoint on a real port that records what arrives, as Google's target."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        return web.Response(status=200)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.close()


# -- the provider's push methods against the fake --------------------------------------------


async def test_watch_sends_sync_then_exists_and_stop_silences_the_channel(
    fake: FakeGoogle, sa_info: dict[str, str], receiver: Receiver
) -> None:
    user = new_user()
    provider = provider_for(fake, sa_info, user)
    asked = datetime.now(UTC) + timedelta(days=2)
    channel = await provider.watch("chan-1-" + uuid.uuid4().hex[:8], receiver.url, "tok", asked)
    assert abs((channel.expires_at - asked).total_seconds()) < 0.01
    await fake.settle()
    [(sync_headers, sync_body)] = receiver.received
    assert sync_body == b""
    assert sync_headers["X-Goog-Resource-State"] == "sync"
    assert sync_headers["X-Goog-Channel-ID"] == channel.channel_id
    assert sync_headers["X-Goog-Channel-Token"] == "tok"
    assert sync_headers["X-Goog-Resource-ID"] == channel.resource_id
    assert sync_headers["X-Goog-Message-Number"] == "1"
    assert sync_headers["X-Goog-Resource-URI"].endswith("/events?alt=json")
    assert sync_headers["X-Goog-Channel-Expiration"].endswith(" GMT")

    event = fake.add_event(user, timed_event(7, 9))
    fake.user_patch_event(user, event["id"], {"summary": "Moved"})  # coalesces with the add
    await fake.settle()
    states = [h["X-Goog-Resource-State"] for h, _ in receiver.received]
    assert states == ["sync", "exists"]
    assert receiver.received[1][0]["X-Goog-Message-Number"] == "2"

    await provider.stop(channel.channel_id, channel.resource_id)
    await provider.stop(channel.channel_id, channel.resource_id)  # gone already: still done
    fake.user_delete_event(user, event["id"])
    await fake.settle()
    assert len(receiver.received) == 2
    await provider.aclose()


async def test_changes_pages_reports_cancellations_and_asks_for_a_full_sync_after_410(
    fake: FakeGoogle, sa_info: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(google_module, "LIST_PAGE_SIZE", 2)
    user = new_user()
    provider = provider_for(fake, sa_info, user)
    ids = [fake.add_event(user, timed_event(7 + n, 9, f"E{n}"))["id"] for n in range(5)]
    full = await provider.changes(None)
    assert full.full and sorted(e.subject or "" for e in full.events) == [f"E{n}" for n in range(5)]
    assert fake.stats(user).requests == 3  # 2 + 2 + 1 per page

    fake.user_patch_event(
        user,
        ids[1],
        {
            "start": {"dateTime": "2027-06-08T13:00:00+02:00", "timeZone": "Europe/Copenhagen"},
            "end": {"dateTime": "2027-06-08T14:00:00+02:00", "timeZone": "Europe/Copenhagen"},
        },
    )
    fake.user_delete_event(user, ids[3])
    since = await provider.changes(full.next_sync_token)
    assert not since.full
    by_id = {e.event_id: e for e in since.events}
    assert set(by_id) == {ids[1], ids[3]}
    assert by_id[ids[1]].start == datetime(2027, 6, 8, 11, tzinfo=UTC)
    assert not by_id[ids[1]].cancelled and by_id[ids[3]].cancelled

    quiet = await provider.changes(since.next_sync_token)
    assert quiet.events == ()
    fake.invalidate_sync_tokens(user)
    with pytest.raises(FullSyncRequired):
        await provider.changes(quiet.next_sync_token)
    await provider.aclose()


async def test_watch_refuses_what_google_refuses(
    fake: FakeGoogle, sa_info: dict[str, str], receiver: Receiver
) -> None:
    user = new_user()
    provider = provider_for(fake, sa_info, user)
    soon = datetime.now(UTC) + timedelta(hours=1)
    with pytest.raises(Permanent):
        await provider.watch("ok-id", "http://example.org/hook", "t", soon)  # not https
    await provider.watch("dup-" + user[:8], receiver.url, "t", soon)
    with pytest.raises(Permanent):
        await provider.watch("dup-" + user[:8], receiver.url, "t", soon)  # id not unique
    await provider.aclose()
