"""Graph change notifications end to end: the service on a real 127.0.0.1 port, its workers,
the fake Graph over https (which validates, notifies and answers delta queries), and a local
CRM that receives the signed callbacks.

Times are Europe/Copenhagen in June 2027 (CEST, UTC+2). The batch books 3 one-hour meetings
on Monday 7 June from 09:00 with no gap: 09:00, 10:00, 11:00 local = 07:00, 08:00, 09:00 UTC.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from sqlalchemy import func, select, update
from standardwebhooks import Webhook

from syncsvc.app import build_app
from syncsvc.changes.apply import ExternalChange, apply_external_changes
from syncsvc.changes.graph import enqueue_subscription_checks
from syncsvc.config import Settings
from syncsvc.queue.worker import MAX_ATTEMPTS
from syncsvc.runtime import run_workers
from syncsvc.service.tenants import create_tenant_with_secret
from syncsvc.store.crypto import SecretBox, hash_token
from syncsvc.store.db import Database
from syncsvc.store.models import Activity, ExternalEvent, Operation, Subscription, User
from syncsvc.store.states import OpKind
from tests.fakes.graph import FakeGraph, running_fake_graph
from tests.servers.postgres import free_port

CPH = ZoneInfo("Europe/Copenhagen")
SECRET_KEY = "webhook-test-secret-key-" + "w" * 20
WAIT_S = 30.0
#: Graph drops endpoints slower than 3 s (its own rule, the bound asserted); ours answers
#: from one indexed read and an insert, far sooner (``bench/webhooks.py``).
ACK_MAX_S = 3.0


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeGraph]:
    async with running_fake_graph() as server:
        yield server


@dataclass
class Crm:
    """The tenant's callback endpoint: records every delivery, fails the first ``fail`` ones."""

    url: str = ""
    fail: int = 0
    retry_after: str = "1"
    received: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = 503 if self.fail > 0 else 200
        self.fail -= 1
        self.received.append((status, dict(request.headers), body))
        headers = {"Retry-After": self.retry_after} if status != 200 else {}
        return web.Response(status=status, headers=headers)

    def acknowledged(self) -> list[dict[str, Any]]:
        return [json.loads(body) for status, _, body in self.received if status == 200]


@dataclass
class Service:
    http: ClientSession
    base: str
    db: Database
    headers: dict[str, str]
    crm: Crm
    mailbox: str
    signing_secret: str
    tenant_id: str

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(
            method, self.base + path, headers=self.headers, **kwargs
        ) as answer:
            text = await answer.text()
            return answer.status, json.loads(text) if text else None


async def eventually(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def service(
    fake: FakeGraph, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Service]:
    """The service on SQLite and on PostgreSQL (row locks, SKIP LOCKED claims)."""
    assert fake.ca_bundle is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(fake.ca_bundle))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(fake.ca_bundle))
    port = free_port()
    settings = Settings(
        database_url=database_url,
        secret_key=SECRET_KEY,
        public_base_url=f"http://127.0.0.1:{port}",
        graph_api_url=fake.graph_url,
        graph_authority_url=fake.authority_url,
        graph_client_id=fake.client_id,
        graph_client_secret=fake.client_secret,
        graph_tenant_id=fake.tenant_id,
    )
    db = Database(settings.database_url)
    await db.migrate()
    tenant, key, signing_secret = await create_tenant_with_secret(db, "acme", SecretBox(SECRET_KEY))
    crm = Crm()
    crm_app = web.Application()
    crm_app.router.add_post("/crm/hook", crm.handle)
    mailbox = f"sales-{port}@contoso.example"
    fake.add_mailbox(mailbox, "Europe/Copenhagen")
    stop = asyncio.Event()
    async with (
        TestServer(build_app(settings, db), host="127.0.0.1", port=port) as api,
        TestServer(crm_app, host="127.0.0.1") as crm_server,
        ClientSession() as http,
    ):
        crm.url = str(crm_server.make_url("/crm/hook"))
        workers = asyncio.create_task(run_workers(settings, db, stop))
        svc = Service(
            http,
            str(api.make_url("")).rstrip("/"),
            db,
            {"Authorization": f"Bearer {key}"},
            crm,
            mailbox,
            signing_secret,
            tenant.id,
        )
        try:
            yield svc
        finally:
            stop.set()
            await workers
    await db.aclose()


async def setup_batch(svc: Service, fake: FakeGraph) -> tuple[str, list[str]]:
    """Tenant callback URL, one Graph user, a synced batch of three meetings, and the user's
    subscription with its first (full) delta done. Returns the batch id and activity ids."""
    status, tenant = await svc.call("PATCH", "/v1/tenant", json={"callback_url": svc.crm.url})
    assert status == 200, tenant
    assert tenant["callback_url"] == svc.crm.url
    status, body = await svc.call(
        "PUT",
        "/v1/users/u0",
        json={
            "name": "Ulla",
            "timezone": "Europe/Copenhagen",
            "country": "DK",
            "calendar": {"provider": "graph", "mailbox": svc.mailbox},
        },
    )
    assert status == 200, body
    plan = {
        "targets": [{"id": f"t{i}", "name": f"Brewery {i}"} for i in range(3)],
        "template": {"kind": "meeting", "subject": "Visit $account-name$"},
        "schedule": {"start_date": "2027-06-07", "duration": "01:00"},
        "assignment": {"mode": "users", "users": ["u0"]},
    }
    status, batch = await svc.call("POST", "/v1/batches", json=plan)
    assert status == 201, batch

    async def synced() -> bool:
        _, got = await svc.call("GET", f"/v1/batches/{batch['id']}")
        return bool(got["state"] == "synced")

    await eventually(synced, "the batch to sync")
    assert await enqueue_subscription_checks(svc.db) == 1
    await eventually(lambda: _subscription(svc.db), "the subscription")
    await eventually(lambda: _synced_once(svc.db), "the first delta")
    async with svc.db.session() as s:
        ids = (
            await s.execute(
                select(Activity.id).where(Activity.batch_id == batch["id"]).order_by(Activity.seq)
            )
        ).scalars()
        return batch["id"], list(ids)


async def _subscription(db: Database) -> Subscription | None:
    async with db.session() as s:
        found: Subscription | None = await s.scalar(select(Subscription))
        return found


async def _synced_once(db: Database) -> bool:
    sub = await _subscription(db)
    return (
        sub is not None and sub.sync_token is not None and not await _pending(db, OpKind.GRAPH_SYNC)
    )


async def _pending(db: Database, kind: str) -> int:
    async with db.session() as s:
        count = await s.scalar(
            select(func.count())
            .select_from(Operation)
            .where(Operation.kind == kind, Operation.state.in_(("pending", "running")))
        )
        return int(count or 0)


async def _ops(db: Database, kind: str) -> int:
    async with db.session() as s:
        return int(
            await s.scalar(
                select(func.count()).select_from(Operation).where(Operation.kind == kind)
            )
            or 0
        )


async def _event_id(db: Database, activity_id: str) -> str:
    async with db.session() as s:
        ledger = await s.scalar(
            select(ExternalEvent).where(ExternalEvent.activity_id == activity_id)
        )
        assert ledger is not None and ledger.event_id is not None
        return ledger.event_id


def _verify(svc: Service, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The CRM's check: Standard Webhooks, with the tenant's own secret; the payload names the
    tenant. Returns the payload without that name."""
    payload: dict[str, Any] = Webhook(svc.signing_secret).verify(body, headers)
    assert payload.pop("tenant_id") == svc.tenant_id
    return payload


@pytest.mark.timeout(120)
async def test_user_edits_reach_the_activity_and_the_crm(service: Service, fake: FakeGraph) -> None:
    svc = service
    batch_id, (moved_id, deleted_id, other_id) = await setup_batch(svc, fake)

    # The subscription: validated against the real app, secret kept only as a hash.
    [sub] = fake.subscriptions(svc.mailbox)
    assert sub.notification_url == svc.base + "/webhooks/graph"
    assert sub.lifecycle_url == svc.base + "/webhooks/graph/lifecycle"
    assert sub.resource == f"/users/{svc.mailbox}/events"
    validations = [d for d in fake.deliveries if d.kind == "validation" and svc.base in d.url]
    assert [d.status for d in validations] == [200, 200]
    row = await _subscription(svc.db)
    assert row is not None and sub.client_state is not None
    assert row.client_state == hash_token(sub.client_state) != sub.client_state
    # The first full delta saw our own three events, untouched: nothing to report.
    assert svc.crm.received == []

    # The user drags meeting 1 from 09:00 to 14:30 local and renames it.
    new_start = datetime(2027, 6, 7, 14, 30, tzinfo=CPH)
    [note] = await fake.user_move_event(
        svc.mailbox,
        await _event_id(svc.db, moved_id),
        new_start,
        new_start + timedelta(hours=1),
        subject="Brewery 0 (moved by Ulla)",
    )
    assert note.status == 202 and note.elapsed_s < ACK_MAX_S

    async def moved() -> dict[str, Any] | None:
        _, got = await svc.call("GET", f"/v1/activities/{moved_id}")
        return got if got["user_edited"] else None

    activity = await eventually(moved, "the move to reach the activity")
    assert activity["start"] == "2027-06-07T14:30:00+02:00"
    assert activity["end"] == "2027-06-07T15:30:00+02:00"
    assert activity["subject"] == "Brewery 0 (moved by Ulla)"
    assert activity["version"] == 2

    await eventually(lambda: _acked(svc.crm, 1), "the callback")
    status, headers, body = svc.crm.received[-1]
    assert _verify(svc, headers, body) == {
        "type": "activity.changed",
        "activity_id": moved_id,
        "batch_id": batch_id,
        "changes": {
            "start": {"from": "2027-06-07T09:00:00+02:00", "to": "2027-06-07T14:30:00+02:00"},
            "end": {"from": "2027-06-07T10:00:00+02:00", "to": "2027-06-07T15:30:00+02:00"},
            "subject": {"from": "Visit Brewery 0", "to": "Brewery 0 (moved by Ulla)"},
        },
    }

    # A batch edit leaves the user's version alone...
    status, patched = await svc.call(
        "PATCH", f"/v1/batches/{batch_id}", json={"template": {"subject": "Tour $account-name$"}}
    )
    assert status == 200, patched
    assert (patched["updated"], patched["skipped_user_edited"]) == (2, 1)
    _, kept = await svc.call("GET", f"/v1/activities/{moved_id}")
    assert kept["subject"] == "Brewery 0 (moved by Ulla)"
    _, toured = await svc.call("GET", f"/v1/activities/{other_id}")
    assert toured["subject"] == "Tour Brewery 2"
    # ...and our own writes that follow (notified by Graph too) are not mistaken for edits.
    await eventually(lambda: _events_subjects(fake, svc.mailbox, {"Tour Brewery 2"}), "the edit")
    await fake.drain_notifications()
    await eventually(lambda: _idle(svc.db), "the syncs of our own writes")
    assert len(svc.crm.acknowledged()) == 1

    # The user deletes meeting 2: the activity is cancelled, the CRM told.
    [note] = await fake.user_delete_event(svc.mailbox, await _event_id(svc.db, deleted_id))
    assert note.status == 202
    await eventually(lambda: _acked(svc.crm, 2), "the delete callback")
    status, headers, body = svc.crm.received[-1]
    assert _verify(svc, headers, body) == {
        "type": "activity.deleted",
        "activity_id": deleted_id,
        "batch_id": batch_id,
        "changes": {"status": {"from": "planned", "to": "cancelled"}},
    }
    _, cancelled = await svc.call("GET", f"/v1/activities/{deleted_id}")
    assert (cancelled["status"], cancelled["user_edited"]) == ("cancelled", True)
    assert cancelled["external"]["state"] == "deleted"

    # With force the batch edit wins, and the user's flag is cleared.
    status, forced = await svc.call(
        "PATCH",
        f"/v1/batches/{batch_id}",
        json={"template": {"subject": "Final $account-name$"}, "force": True},
    )
    assert status == 200, forced
    _, overridden = await svc.call("GET", f"/v1/activities/{moved_id}")
    assert (overridden["subject"], overridden["user_edited"]) == ("Final Brewery 0", False)


async def _acked(crm: Crm, n: int) -> bool:
    return len(crm.acknowledged()) >= n


async def _events_subjects(fake: FakeGraph, mailbox: str, wanted: set[str]) -> bool:
    return wanted <= {e.subject for e in fake.mailbox_events(mailbox)}


async def _idle(db: Database) -> bool:
    """Nothing waiting, and nothing given up on (a failed sync would hide here)."""
    async with db.session() as s:
        states = set((await s.execute(select(Operation.state))).scalars())
    assert "dead" not in states
    return not states & {"pending", "running"}


@pytest.mark.timeout(60)
async def test_forged_notifications_are_refused_and_never_processed(
    service: Service, fake: FakeGraph
) -> None:
    svc = service
    await setup_batch(svc, fake)
    [sub] = fake.subscriptions(svc.mailbox)
    await eventually(lambda: _idle(svc.db), "quiet")
    syncs_before = await _ops(svc.db, OpKind.GRAPH_SYNC)

    def note(client_state: str | None, subscription_id: str = sub.id) -> dict[str, Any]:
        return {
            "subscriptionId": subscription_id,
            "clientState": client_state,
            "changeType": "updated",
            "resource": f"Users/{svc.mailbox}/Events/AAMk",
            "resourceData": {"id": "AAMk"},
        }

    url = svc.base + "/webhooks/graph"
    for forged in ([note("guess")], [note(None)], [note(sub.client_state, "no-such-subscription")]):
        async with svc.http.post(url, json={"value": forged}) as answer:
            assert answer.status == 403
    assert await _ops(svc.db, OpKind.GRAPH_SYNC) == syncs_before

    # A request mixing a valid item with a forged one: the valid one is taken, 202.
    async with svc.http.post(
        url, json={"value": [note("guess"), note(sub.client_state)]}
    ) as answer:
        assert answer.status == 202
    assert await _ops(svc.db, OpKind.GRAPH_SYNC) == syncs_before + 1

    # Not Graph's shape at all: 400.
    async with svc.http.post(
        url, data=b"{not json", headers={"Content-Type": "application/json"}
    ) as answer:
        assert answer.status == 400

    # The handshake echoes the (URL-decoded) token as text/plain.
    token = "Validation: Testing client application reachability Request-Id: 1&2"
    async with svc.http.post(url, params={"validationToken": token}) as answer:
        assert answer.status == 200
        assert answer.content_type == "text/plain"
        assert await answer.text() == token


@pytest.mark.timeout(90)
async def test_renewal_lifecycle_events_and_stale_delta(service: Service, fake: FakeGraph) -> None:
    svc = service
    _, (moved_id, _, _) = await setup_batch(svc, fake)
    [sub] = fake.subscriptions(svc.mailbox)

    # Renewal: a subscription within a day of its end is renewed by the next check.
    async with svc.db.session() as s, s.begin():
        await s.execute(
            update(Subscription).values(expires_at=datetime.now(UTC) + timedelta(hours=2))
        )
    assert await enqueue_subscription_checks(svc.db) == 1

    async def renewed() -> bool:
        row = await _subscription(svc.db)
        return row is not None and row.expires_at > datetime.now(UTC) + timedelta(days=6)

    await eventually(renewed, "the renewal")
    assert [s.renewals for s in fake.subscriptions(svc.mailbox)] == [1]
    # Renewal re-validated the URL, as Graph does.
    assert sum(1 for d in fake.deliveries if d.kind == "validation" and svc.base in d.url) == 3

    # reauthorizationRequired -> renewed again.
    delivery = await fake.send_lifecycle(sub.id, "reauthorizationRequired")
    assert delivery.status == 202
    await eventually(lambda: _renewals(fake, svc.mailbox, 2), "the reauthorization")

    # missed -> a full delta (no token), which reports nothing new.
    full_rounds = fake.full_delta_rounds
    assert (await fake.send_lifecycle(sub.id, "missed")).status == 202
    await eventually(lambda: _idle(svc.db), "the full delta")
    assert fake.full_delta_rounds == full_rounds + 1
    assert svc.crm.received == []

    # subscriptionRemoved -> a new subscription replaces it.
    assert (await fake.send_lifecycle(sub.id, "subscriptionRemoved")).status == 202
    fresh = await eventually(lambda: _new_subscription(svc.db, sub.id), "the re-creation")
    assert [s.id for s in fake.subscriptions(svc.mailbox)] == [fresh.external_id]
    await eventually(lambda: _idle(svc.db), "the catch-up delta")

    # A stale delta token (410 SyncStateNotFound) -> a full delta still finds the user's move.
    fake.expire_delta_tokens(svc.mailbox)
    stale, full_rounds = fake.stale_delta_answers, fake.full_delta_rounds
    new_start = datetime(2027, 6, 8, 13, 0, tzinfo=CPH)
    [note] = await fake.user_move_event(
        svc.mailbox, await _event_id(svc.db, moved_id), new_start, new_start + timedelta(hours=1)
    )
    assert note.status == 202

    async def moved() -> bool:
        _, got = await svc.call("GET", f"/v1/activities/{moved_id}")
        return bool(got["start"] == "2027-06-08T13:00:00+02:00")

    await eventually(moved, "the move after a 410")
    assert (fake.stale_delta_answers, fake.full_delta_rounds) == (stale + 1, full_rounds + 1)

    # An out-of-office day the user adds becomes one of their days off.
    fake.add_foreign_event(
        svc.mailbox,
        "Vacation",
        datetime(2027, 6, 9).date(),
        datetime(2027, 6, 10).date(),
        show_as="oof",
    )
    await fake.drain_notifications()

    async def day_off() -> bool:
        async with svc.db.session() as s:
            user = await s.scalar(select(User))
        return user is not None and "2027-06-09" in user.provider_days_off

    await eventually(day_off, "the day off")


async def _renewals(fake: FakeGraph, mailbox: str, n: int) -> bool:
    return any(s.renewals >= n for s in fake.subscriptions(mailbox))


async def _new_subscription(db: Database, old_id: str) -> Subscription | None:
    row = await _subscription(db)
    return row if row is not None and row.external_id != old_id else None


@pytest.mark.timeout(60)
async def test_callback_retried_until_acknowledged(service: Service, fake: FakeGraph) -> None:
    svc = service
    _, (moved_id, _, _) = await setup_batch(svc, fake)
    # Down for longer than an operation's attempts: a callback is never given up on.
    svc.crm.fail, svc.crm.retry_after = MAX_ATTEMPTS + 2, "0"
    start = datetime(2027, 6, 7, 16, 0, tzinfo=CPH)
    await fake.user_move_event(
        svc.mailbox, await _event_id(svc.db, moved_id), start, start + timedelta(hours=1)
    )
    await eventually(lambda: _acked(svc.crm, 1), "the acknowledged callback")
    assert [status for status, _, _ in svc.crm.received] == [503] * (MAX_ATTEMPTS + 2) + [200]
    deliveries = {headers["webhook-id"] for _, headers, _ in svc.crm.received}
    assert len(deliveries) == 1  # one delivery, retried: the CRM can tell repeats apart
    bodies = {body for _, _, body in svc.crm.received}
    assert len(bodies) == 1

    async def callbacks() -> list[tuple[str, int]]:
        async with svc.db.session() as s:
            rows = await s.execute(
                select(Operation.state, Operation.attempts).where(Operation.kind == "callback")
            )
            return [(state, attempts) for state, attempts in rows]

    # The worker records the acknowledgement once the CRM's answer is back: wait for it.
    await eventually(lambda: _settled(callbacks), "the acknowledged callback to be recorded")
    assert await callbacks() == [("done", 0)]  # no attempt spent on the CRM being down


async def _settled(rows: Callable[[], Awaitable[list[tuple[str, int]]]]) -> bool:
    return all(state not in ("pending", "running") for state, _ in await rows())


@pytest.mark.timeout(60)
async def test_tenant_settings_and_no_callback_url(service: Service, fake: FakeGraph) -> None:
    svc = service
    status, tenant = await svc.call("GET", "/v1/tenant")
    assert status == 200
    assert (tenant["name"], tenant["callback_url"], tenant["closing_days"]) == ("acme", None, [])
    status, error = await svc.call("PATCH", "/v1/tenant", json={"callback_url": "ftp://crm"})
    assert status == 422 and error["error"]["details"][0]["loc"] == ["body", "callback_url"]
    status, tenant = await svc.call(
        "PATCH", "/v1/tenant", json={"closing_days": ["2027-12-24", "2027-12-24", "2027-06-05"]}
    )
    assert status == 200 and tenant["closing_days"] == ["2027-06-05", "2027-12-24"]

    _, (moved_id, _, _) = await setup_batch(svc, fake)  # sets the callback URL
    status, tenant = await svc.call("PATCH", "/v1/tenant", json={"callback_url": None})
    assert status == 200 and tenant["callback_url"] is None
    assert tenant["closing_days"] == ["2027-06-05", "2027-12-24"]  # left alone

    # With nobody to tell, the user's change is still applied and its callback is done at once.
    start = datetime(2027, 6, 7, 12, 0, tzinfo=CPH)
    await fake.user_move_event(
        svc.mailbox, await _event_id(svc.db, moved_id), start, start + timedelta(hours=1)
    )

    async def delivered() -> bool:
        async with svc.db.session() as s:
            states = list(
                (
                    await s.execute(select(Operation.state).where(Operation.kind == "callback"))
                ).scalars()
            )
        return states == ["done"]

    await eventually(delivered, "the callback operation")
    assert svc.crm.received == []
    _, moved = await svc.call("GET", f"/v1/activities/{moved_id}")
    assert moved["start"] == "2027-06-07T12:00:00+02:00" and moved["user_edited"]


@pytest.mark.timeout(60)
async def test_what_is_not_a_user_edit(service: Service, fake: FakeGraph) -> None:
    """Our own writes, whether or not their etag is recorded yet, and events whose update is
    on its way, are never reported; a real move is, once."""
    svc = service
    _, (activity_id, _, _) = await setup_batch(svc, fake)
    event_id = await _event_id(svc.db, activity_id)
    async with svc.db.session() as s:
        ledger = await s.scalar(select(ExternalEvent).where(ExternalEvent.event_id == event_id))
        activity = await s.get(Activity, activity_id)
    assert ledger is not None and activity is not None and activity.start and activity.end
    later = activity.start + timedelta(hours=3)

    def change(**fields: Any) -> ExternalChange:
        return ExternalChange("graph", svc.mailbox, event_id, **fields)

    unknown = ExternalChange("graph", svc.mailbox, "AAMk-the-users-own", start=later)
    same_etag = change(start=later, etag=ledger.etag)
    same_values = change(
        start=activity.start, end=activity.end, subject=activity.subject, etag="new"
    )
    other_mailbox = ExternalChange("graph", "someone@else.example", event_id, start=later)
    assert (
        await apply_external_changes(svc.db, [unknown, same_etag, same_values, other_mailbox]) == 0
    )

    async with svc.db.session() as s, s.begin():
        await s.execute(
            update(ExternalEvent)
            .where(ExternalEvent.id == ledger.id)
            .values(state="pending_update")
        )
    assert await apply_external_changes(svc.db, [change(start=later, etag="moved")]) == 0
    async with svc.db.session() as s, s.begin():
        await s.execute(
            update(ExternalEvent).where(ExternalEvent.id == ledger.id).values(state="synced")
        )
    # Read before our last write of the event (its ledger row changed since): left alone.
    read_before = ledger.updated_at - timedelta(seconds=1)
    early = change(start=later, etag="moved")
    assert await apply_external_changes(svc.db, [early], read_at=read_before) == 0
    moved = change(start=later, end=later + timedelta(hours=1), etag="moved")
    assert await apply_external_changes(svc.db, [moved]) == 1
    assert await apply_external_changes(svc.db, [moved]) == 0  # the same notice again
    async with svc.db.session() as s:
        row = await s.get(Activity, activity_id)
        ledger_after = await s.get(ExternalEvent, ledger.id)
    assert row is not None and ledger_after is not None
    assert (row.start, row.user_edited, row.version, ledger_after.etag) == (later, True, 2, "moved")
