"""What ``avoid_busy`` costs ``POST /v1/plans``: the users' calendars read through Graph.

Previews 1,000 targets over 10 Outlook users (the Graph fake over https on 127.0.0.1, each
mailbox holding 100 busy hours of its own) three ways: without ``avoid_busy``; with it and a
cold cache (every preview reads every calendar: the first preview of a plan); with it and a
warm cache (the commit after a preview). Prints median and p95 per request and the calendar
reads per preview.

    python -m bench.busy [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import os
import tempfile
import uuid
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp.test_utils import TestClient, TestServer

from bench.api import PLAN_TARGETS, USERS, body, summary, timed
from syncsvc.api.plans import CALENDARS
from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.providers.registry import ProviderRegistry
from syncsvc.service.plans import CalendarBusy
from syncsvc.service.tenants import create_tenant
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import User
from tests.fakes.graph import running_fake_graph

CPH = ZoneInfo("Europe/Copenhagen")
BUSY_HOURS_PER_USER = 100
SECRET_KEY = "bench-secret-key-" + "b" * 30


def plan_body(avoid_busy: bool) -> dict[str, Any]:
    raw = body(PLAN_TARGETS)
    raw["schedule"] = {**raw["schedule"], "avoid_busy": avoid_busy}
    return raw


async def bench(runs: int) -> None:
    async with running_fake_graph() as graph:
        assert graph.ca_bundle is not None
        os.environ["SSL_CERT_FILE"] = os.environ["REQUESTS_CA_BUNDLE"] = str(graph.ca_bundle)
        with tempfile.TemporaryDirectory() as folder:
            settings = Settings(
                database_url=f"sqlite:///{folder}/bench.db",
                secret_key=SECRET_KEY,
                graph_api_url=graph.graph_url,
                graph_authority_url=graph.authority_url,
                graph_client_id=graph.client_id,
                graph_client_secret=graph.client_secret,
                graph_tenant_id=graph.tenant_id,
            )
            db = Database(settings.database_url)
            await db.migrate()
            tenant, key = await create_tenant(db, "bench")
            first_day = dt.datetime(2031, 1, 6, 9, tzinfo=CPH)
            async with db.session() as session:
                for i in range(USERS):
                    mailbox = f"u{i}-{uuid.uuid4().hex[:6]}@contoso.example"
                    graph.add_mailbox(mailbox, "Europe/Copenhagen")
                    for n in range(BUSY_HOURS_PER_USER):  # every other day, 09:00 or 14:00
                        start = first_day + dt.timedelta(days=2 * (n // 2), hours=5 * (n % 2))
                        graph.add_foreign_event(
                            mailbox, "Busy", start, start + dt.timedelta(hours=1)
                        )
                    session.add(
                        User(
                            tenant_id=tenant.id,
                            id=f"u{i}",
                            name=f"User {i}",
                            timezone="Europe/Copenhagen",
                            calendar_provider="graph",
                            calendar_config={"mailbox": mailbox},
                        )
                    )
                await session.commit()
            registry = ProviderRegistry(settings, SecretBox(SECRET_KEY))
            cold = CalendarBusy(registry, ttl_s=0.0)
            warm = CalendarBusy(registry)
            headers = {"Authorization": f"Bearer {key}"}
            blind, aware = plan_body(False), plan_body(True)
            for label, reader in (("blind", None), ("cold", cold), ("warm", warm)):
                app = build_app(settings, db)
                if reader is not None:
                    app[CALENDARS] = reader
                async with TestClient(TestServer(app)) as client:

                    async def preview(raw: dict[str, Any]) -> None:
                        response = await client.post("/v1/plans", json=raw, headers=headers)
                        assert response.status == 200, await response.text()
                        answer = await response.json()
                        assert not [w for w in answer["warnings"] if w["code"] == "busy_unread"]

                    raw = blind if reader is None else aware
                    await preview(raw)  # warm caches (holidays, zones, imports, tokens)
                    samples = await timed(runs, functools.partial(preview, raw))
                    print(summary(f"POST /v1/plans {PLAN_TARGETS} {label}", samples))
                    if reader is not None:
                        print(f"  calendar reads per preview: {reader.reads / (runs + 1):.1f}")
            await registry.aclose()
            await db.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    asyncio.run(bench(parser.parse_args().runs))


if __name__ == "__main__":
    main()
