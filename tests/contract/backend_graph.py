"""Contract backend: ``GraphProvider`` with the real MSAL against the fake Graph, over https.

The harness reads the fake's own state (``FakeGraph.mailbox_events``), not Graph answers, so
the suite checks what is really stored. Each test gets a fresh mailbox on one shared fake.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from syncsvc.providers.graph import GraphClient, GraphProvider
from tests.contract.harness import ServerEvent
from tests.fakes.graph import FakeEvent, FakeGraph, running_fake_graph

__all__ = ["contract_fake_graph", "harness_graph"]

MAILBOX_TIMEZONE = "Europe/Copenhagen"


def _server_event(event: FakeEvent) -> ServerEvent:
    cancelled = (event.extended_value("syncsvcStatus") or "") == "cancelled"
    return ServerEvent(
        event_id=event.id,
        subject=event.subject,
        start=None if event.is_all_day else event.start,
        end=None if event.is_all_day else event.end,
        status="cancelled" if cancelled else "confirmed",
        batch_id=event.extended_value("syncsvcBatch"),
    )


@dataclass
class GraphHarness:
    provider: GraphProvider
    fake: FakeGraph
    mailbox: str

    async def server_events(self) -> list[ServerEvent]:
        return [_server_event(e) for e in self.fake.mailbox_events(self.mailbox)]

    async def server_reminder_minutes(self, event_id: str) -> int | None:
        for event in self.fake.mailbox_events(self.mailbox):
            if event.id == event_id:
                if not event.props.get("isReminderOn"):
                    return None
                return int(event.props["reminderMinutesBeforeStart"])
        raise AssertionError(f"no event {event_id}")

    async def add_foreign_event(
        self, subject: str, start: dt.datetime, end: dt.datetime, *, all_day_off: bool = False
    ) -> None:
        if all_day_off:
            last = max(end.date(), start.date() + dt.timedelta(days=1))
            self.fake.add_foreign_event(self.mailbox, subject, start.date(), last, show_as="oof")
        else:
            self.fake.add_foreign_event(self.mailbox, subject, start, end)


@pytest.fixture(scope="session")
async def contract_fake_graph() -> AsyncIterator[FakeGraph]:
    async with running_fake_graph() as fake:
        yield fake


@pytest.fixture
async def harness_graph(contract_fake_graph: FakeGraph) -> AsyncIterator[GraphHarness]:
    fake = contract_fake_graph
    mailbox = f"user-{uuid.uuid4().hex[:8]}@contoso.example"
    fake.add_mailbox(mailbox, MAILBOX_TIMEZONE)
    assert fake.ca_bundle is not None
    client = GraphClient(
        tenant_id=fake.tenant_id,
        client_id=fake.client_id,
        client_secret=fake.client_secret,
        api_url=fake.graph_url,
        authority_url=fake.authority_url,
        ca_bundle=str(fake.ca_bundle),
    )
    try:
        yield GraphHarness(client.mailbox(mailbox, MAILBOX_TIMEZONE), fake, mailbox)
    finally:
        await client.aclose()
