"""A Graph mailbox or Google calendar belongs to at most one tenant, and only to a tenant whose
connection covers its domain (issue 10): the measured attack, tenant B registering tenant A's
managing director's mailbox, is refused and leaves nothing stored."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from syncsvc.service.mailboxes import add_domain
from syncsvc.store.db import Database
from tests.api.conftest import Tenants

Client = TestClient[web.Request, web.Application]


def user(calendar: dict[str, Any]) -> dict[str, Any]:
    return {"name": "Managing Director", "timezone": "Europe/Helsinki", "calendar": calendar}


GRAPH_MD = {"provider": "graph", "mailbox": "md@corp.example"}


async def test_another_tenants_mailbox_is_refused_with_409_and_nothing_is_stored(
    client: Client, tenants: Tenants
) -> None:
    put = await client.put("/v1/users/md", json=user(GRAPH_MD), headers=tenants.a.headers)
    assert put.status in (200, 201), await put.text()

    for mailbox in ("md@corp.example", "MD@Corp.Example"):
        calendar = {"provider": "graph", "mailbox": mailbox}
        put = await client.put("/v1/users/x", json=user(calendar), headers=tenants.b.headers)
        assert put.status == 409, await put.text()
        error = (await put.json())["error"]
        assert "md@corp.example" in error["message"]
        assert error["details"][0]["loc"] == ["body", "calendar", "mailbox"]
    # Nothing of B's attempt was stored, so B has no user whose days off it could read.
    assert (await client.get("/v1/users/x", headers=tenants.b.headers)).status == 404
    assert (await client.get("/v1/users/x/days-off", headers=tenants.b.headers)).status == 404

    # A's own second user of the same (shared) mailbox is fine.
    put = await client.put("/v1/users/md2", json=user(GRAPH_MD), headers=tenants.a.headers)
    assert put.status in (200, 201), await put.text()


async def test_a_mailbox_is_free_again_once_its_tenant_no_longer_uses_it(
    client: Client, tenants: Tenants
) -> None:
    google = {"provider": "google", "calendar_id": "sales@shop.example"}
    assert (await client.put("/v1/users/s", json=user(google), headers=tenants.a.headers)).ok
    refused = await client.put("/v1/users/s", json=user(google), headers=tenants.b.headers)
    assert refused.status == 409

    moved = {"provider": "google", "calendar_id": "sales2@shop.example"}
    assert (await client.put("/v1/users/s", json=user(moved), headers=tenants.a.headers)).ok
    taken = await client.put("/v1/users/s", json=user(google), headers=tenants.b.headers)
    assert taken.status in (200, 201), await taken.text()
    # ... and now it is B's.
    again = await client.put("/v1/users/t", json=user(google), headers=tenants.a.headers)
    assert again.status == 409


async def test_a_mailbox_outside_the_tenants_domains_is_refused_with_422(
    client: Client, tenants: Tenants, db: Database
) -> None:
    async with db.session() as session, session.begin():
        await add_domain(session, tenants.a.id, "google", "Alko.example")
    outside = {"provider": "google", "calendar_id": "ceo@competitor.example"}
    put = await client.put("/v1/users/u", json=user(outside), headers=tenants.a.headers)
    assert put.status == 422, await put.text()
    error = (await put.json())["error"]
    assert "ceo@competitor.example" in error["message"]
    assert error["details"][0]["loc"] == ["body", "calendar", "calendar_id"]
    assert (await client.get("/v1/users/u", headers=tenants.a.headers)).status == 404

    inside = {"provider": "google", "calendar_id": "aino@alko.example"}
    put = await client.put("/v1/users/u", json=user(inside), headers=tenants.a.headers)
    assert put.status in (200, 201), await put.text()
    # The domains are per provider: A's Graph mailboxes are not limited by its Google domains.
    graph = {"provider": "graph", "mailbox": "aino@alko-ms.example"}
    put = await client.put("/v1/users/g", json=user(graph), headers=tenants.a.headers)
    assert put.status in (200, 201), await put.text()
