"""Per-tenant Standard Webhooks signatures on callbacks, checked as a CRM checks them: with the
``standardwebhooks`` verifier and the secret the tenant was shown (issue 10).

Callbacks are delivered by the real handler to a real local CRM endpoint, on SQLite and on
PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import update
from standardwebhooks import Webhook, WebhookVerificationError

from syncsvc.config import Settings
from syncsvc.queue.worker import TaskContext
from syncsvc.service import signing
from syncsvc.service.callbacks import deliver_callback
from syncsvc.service.connections import UserProviders
from syncsvc.service.tenants import create_tenant, create_tenant_with_secret
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import Operation, Tenant


@dataclass
class Crm:
    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        return web.Response(status=204)


@pytest_asyncio.fixture
async def crm() -> AsyncIterator[Crm]:
    endpoint = Crm()
    app = web.Application()
    app.router.add_post("/hook", endpoint.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        endpoint.url = str(server.make_url("/hook"))
        yield endpoint


@dataclass(frozen=True)
class Made:
    id: str
    key: str
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


async def make(db: Database, settings: Settings, name: str, crm: Crm) -> Made:
    tenant, key, secret = await create_tenant_with_secret(db, name, SecretBox(settings.secret_key))
    async with db.session() as s, s.begin():
        await s.execute(update(Tenant).where(Tenant.id == tenant.id).values(callback_url=crm.url))
    return Made(tenant.id, key, secret)


_next_op = iter(range(1, 1_000_000))


async def deliver(db: Database, settings: Settings, tenant_id: str, **extra: str) -> Operation:
    """One callback operation of the tenant through the real delivery handler."""
    op = Operation(
        id=next(_next_op),
        tenant_id=tenant_id,
        kind="callback",
        mailbox=f"crm:{tenant_id}",
        payload={"type": "activity.deleted", "activity_id": "act_1", **extra},
    )
    ctx = TaskContext(settings, db, UserProviders(settings, SecretBox(settings.secret_key), db))
    await deliver_callback(ctx, op)
    return op


async def test_a_callback_verifies_with_its_tenants_secret_and_not_with_anothers(
    db: Database, settings: Settings, crm: Crm
) -> None:
    a = await make(db, settings, "Tenant A", crm)
    b = await make(db, settings, "Tenant B", crm)
    assert a.secret.startswith("whsec_") and a.secret != b.secret

    op = await deliver(db, settings, a.id)
    [(headers, body)] = crm.received
    payload = Webhook(a.secret).verify(body, headers)
    assert payload == {"type": "activity.deleted", "activity_id": "act_1", "tenant_id": a.id}
    assert headers["webhook-id"] == f"op_{op.id}"
    assert len(headers["webhook-signature"].split(" ")) == 1
    with pytest.raises(WebhookVerificationError):
        Webhook(b.secret).verify(body, headers)  # B cannot forge, nor accept, A's callbacks

    # A body claiming to be B's, signed with A's secret, does not pass B's check either.
    forged = body.replace(a.id.encode(), b.id.encode())
    with pytest.raises(WebhookVerificationError):
        Webhook(b.secret).verify(forged, headers)


async def test_the_trace_a_callback_was_queued_in_is_its_header_not_its_body(
    db: Database, settings: Settings, crm: Crm
) -> None:
    a = await make(db, settings, "Tenant A", crm)
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await deliver(db, settings, a.id, traceparent=trace)
    [(headers, body)] = crm.received
    assert Webhook(a.secret).verify(body, headers) == {
        "type": "activity.deleted",
        "activity_id": "act_1",
        "tenant_id": a.id,
    }
    assert headers["traceparent"].split("-")[1] == trace.split("-")[1]


async def test_a_replayed_or_retimed_callback_fails(
    db: Database, settings: Settings, crm: Crm
) -> None:
    a = await make(db, settings, "Tenant A", crm)
    await deliver(db, settings, a.id)
    [(headers, body)] = crm.received

    # Moving the timestamp forward to dodge the 5-minute window breaks the signature.
    retimed = {**headers, "webhook-timestamp": str(int(datetime.now(UTC).timestamp()) + 1)}
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(a.secret).verify(body, retimed)

    # The same message as it was signed six minutes ago: too old to be accepted.
    box = SecretBox(settings.secret_key)
    then = datetime.now(UTC) - timedelta(minutes=6)
    async with db.session() as s:
        secrets = await signing.signing_secrets(s, box, a.id, then)
    old = signing.signed_headers(secrets, headers["webhook-id"], body.decode(), then)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(a.secret).verify(body, old)


async def test_rotation_signs_with_both_secrets_for_a_day_then_only_the_new_one(
    db: Database,
    settings: Settings,
    crm: Crm,
    client: TestClient[web.Request, web.Application],
) -> None:
    a = await make(db, settings, "Tenant A", crm)
    b = await make(db, settings, "Tenant B", crm)

    answer = await client.post("/v1/tenant/signing-secret/rotate", headers=a.headers)
    assert answer.status == 200, await answer.text()
    rotated: dict[str, Any] = await answer.json()
    new = rotated["signing_secret"]
    assert new.startswith("whsec_") and new != a.secret
    until = datetime.fromisoformat(rotated["previous_valid_until"])
    assert timedelta(hours=23) < until - datetime.now(UTC) <= timedelta(hours=24)

    await deliver(db, settings, a.id)
    headers, body = crm.received[-1]
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(new).verify(body, headers)["tenant_id"] == a.id
    assert Webhook(a.secret).verify(body, headers)["tenant_id"] == a.id  # the CRM not yet switched

    # B's secret is untouched by A's rotation.
    await deliver(db, settings, b.id)
    headers, body = crm.received[-1]
    assert Webhook(b.secret).verify(body, headers)["tenant_id"] == b.id

    # A day later the old secret no longer signs.
    async with db.session() as s, s.begin():
        await s.execute(
            update(Tenant)
            .where(Tenant.id == a.id)
            .values(previous_signing_secret_until=datetime.now(UTC) - timedelta(seconds=1))
        )
    await deliver(db, settings, a.id)
    headers, body = crm.received[-1]
    assert len(headers["webhook-signature"].split(" ")) == 1
    Webhook(new).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(a.secret).verify(body, headers)


async def test_rotation_needs_the_tenants_key_and_a_tenant_without_a_secret_gets_one(
    db: Database,
    settings: Settings,
    crm: Crm,
    client: TestClient[web.Request, web.Application],
) -> None:
    answer = await client.post("/v1/tenant/signing-secret/rotate")
    assert answer.status == 401

    # A tenant made before secrets existed: its first rotation shows its first secret.
    tenant, key = await create_tenant(db, "Legacy")
    async with db.session() as s, s.begin():
        await s.execute(update(Tenant).where(Tenant.id == tenant.id).values(callback_url=crm.url))
    answer = await client.post(
        "/v1/tenant/signing-secret/rotate", headers={"Authorization": f"Bearer {key}"}
    )
    secret = (await answer.json())["signing_secret"]
    await deliver(db, settings, tenant.id)
    headers, body = crm.received[-1]
    assert len(headers["webhook-signature"].split(" ")) == 1
    assert Webhook(secret).verify(body, headers)["tenant_id"] == tenant.id
