"""PostgreSQL's due-mailbox table (``queue/due.py``) gives the dispatcher what grouping the
outbox gives, and no race between a settling worker and new work can hide that work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
import pytest_asyncio
from sqlalchemy import delete, select, update

from syncsvc.queue.due import Due, by_grouping, by_table, settle, sweep
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from syncsvc.store.models import Operation, QueueMailbox
from syncsvc.store.types import utcnow
from tests.servers.postgres import PostgresServer

SLOTS = 16


@pytest_asyncio.fixture
async def db(postgres_server: PostgresServer) -> AsyncIterator[Database]:
    database = Database(await postgres_server.create_database())
    await database.migrate()
    try:
        yield database
    finally:
        await database.aclose()


def _op(tenant: str, mailbox: str, not_before: datetime, lane: str = "bulk") -> Operation:
    return Operation(
        tenant_id=tenant,
        kind="create",
        mailbox=mailbox,
        lane=lane,
        state="pending",
        attempts=0,
        not_before=not_before,
        payload={},
    )


async def _both(db: Database, now: datetime) -> tuple[set[Due], set[Due]]:
    async with db.session() as s:
        return set(await by_table(s, now, SLOTS, 4 * SLOTS)), set(
            await by_grouping(s, now, SLOTS, 4 * SLOTS)
        )


async def _row(db: Database, tenant: str, mailbox: str) -> QueueMailbox | None:
    async with db.session() as s:
        return await s.get(QueueMailbox, (tenant, mailbox))


async def test_the_table_answers_what_grouping_the_outbox_answers(db: Database) -> None:
    tenant, _ = await create_tenant(db, "due")
    now = utcnow()
    later = now + timedelta(minutes=5)
    async with db.session() as s, s.begin():
        s.add_all([_op(tenant.id, "caldav:a", now) for _ in range(3)])
        s.add(_op(tenant.id, "caldav:b", later, lane="interactive"))
        s.add(_op(tenant.id, "caldav:c", now))
    table, grouped = await _both(db, now)
    assert (
        table == grouped == {Due(tenant.id, "caldav:a", False), Due(tenant.id, "caldav:c", False)}
    )
    table, grouped = await _both(db, later)
    assert table == grouped and Due(tenant.id, "caldav:b", True) in table

    # a's work is done: it may still look due (a lower bound) until its cycle settles it.
    async with db.session() as s, s.begin():
        await s.execute(
            update(Operation).where(Operation.mailbox == "caldav:a").values(state="done")
        )
        await settle(s, tenant.id, "caldav:a")
    assert await _row(db, tenant.id, "caldav:a") is None
    # c's operation failed and waits for its backoff (a later not_before): due again then.
    retry_at = now + timedelta(seconds=90)
    async with db.session() as s, s.begin():
        await s.execute(
            update(Operation)
            .where(Operation.mailbox == "caldav:c")
            .values(state="pending", not_before=retry_at)
        )
        await settle(s, tenant.id, "caldav:c")
    for moment in (now, retry_at, later):
        table, grouped = await _both(db, moment)
        assert table == grouped, moment
    assert Due(tenant.id, "caldav:c", False) not in (await _both(db, now))[0]
    # A dead operation retried from ops (dead → pending) is due at once.
    async with db.session() as s, s.begin():
        await s.execute(
            update(Operation)
            .where(Operation.mailbox == "caldav:c")
            .values(state="dead", not_before=now)
        )
        await settle(s, tenant.id, "caldav:c")
        await s.execute(
            update(Operation).where(Operation.mailbox == "caldav:c").values(state="pending")
        )
    assert Due(tenant.id, "caldav:c", False) in (await _both(db, now))[0]


@pytest.mark.timeout(60)
async def test_a_settle_racing_new_work_never_hides_it(db: Database) -> None:
    """Work stored while a worker settles the mailbox (uncommitted when the settle reads the
    outbox, committed after) keeps the mailbox due."""
    tenant, _ = await create_tenant(db, "race")
    now = utcnow()
    async with db.session() as s, s.begin():
        s.add(_op(tenant.id, "caldav:r", now))
    async with db.session() as s, s.begin():
        await s.execute(update(Operation).values(state="done"))  # drained; not settled yet

    async with db.session() as writer:
        await writer.begin()
        writer.add(_op(tenant.id, "caldav:r", now + timedelta(seconds=1)))
        await writer.flush()  # the trigger has run; nothing is committed

        async def settling() -> None:
            async with db.session() as s, s.begin():
                await settle(s, tenant.id, "caldav:r")

        settler = asyncio.create_task(settling())
        await asyncio.sleep(0.5)  # it waits for the writer's lock on the mailbox's row
        await writer.commit()
        await settler
    row = await _row(db, tenant.id, "caldav:r")
    assert row is not None and row.due_at <= now + timedelta(seconds=1)
    later = now + timedelta(seconds=2)
    assert Due(tenant.id, "caldav:r", False) in (await _both(db, later))[0]


async def test_the_sweep_restores_a_lost_row(db: Database) -> None:
    tenant, _ = await create_tenant(db, "sweep")
    now = utcnow()
    async with db.session() as s, s.begin():
        s.add(_op(tenant.id, "caldav:s", now, lane="interactive"))
    async with db.session() as s, s.begin():
        await s.execute(delete(QueueMailbox))
    assert (await _both(db, now))[0] == set()
    async with db.session() as s, s.begin():
        await sweep(s)
        await sweep(s)  # a second sweep finds nothing earlier
    table, grouped = await _both(db, now)
    assert table == grouped == {Due(tenant.id, "caldav:s", True)}
    async with db.session() as s:
        versions = (await s.scalars(select(QueueMailbox.version))).all()
    assert len(versions) == 1


async def test_deeper_picks_for_a_tenant_with_many_mailboxes(db: Database) -> None:
    """One tenant's many due mailboxes beside two tenants with one each: the table reads
    deeper into the big tenant until the dispatcher's rows are there, in the order grouping
    the outbox gives (each tenant's first, then the big one's second, ...)."""
    big, _ = await create_tenant(db, "big")
    small = [(await create_tenant(db, f"small{i}"))[0] for i in range(2)]
    now = utcnow()
    async with db.session() as s, s.begin():
        for i in range(12):
            lane = "interactive" if i in (7, 9, 10) else "bulk"  # more than the first pick
            s.add(_op(big.id, f"caldav:big-{i}", now - timedelta(seconds=60 - i), lane=lane))
        for i, tenant in enumerate(small):
            s.add(_op(tenant.id, f"caldav:small-{i}", now - timedelta(seconds=30 + i)))
    for per_tenant, limit in ((4, 7), (16, 7), (16, 3), (16, 64), (1, 64), (64, 14)):
        async with db.session() as s:
            table = await by_table(s, now, per_tenant, limit)
            grouped = await by_grouping(s, now, per_tenant, limit)
        assert table == grouped, (per_tenant, limit)
    # The interactive mailboxes are the big tenant's first, though others waited longer.
    assert table[0] == Due(big.id, "caldav:big-7", True)
    bigs = [d for d in table if d.tenant == big.id]
    assert [d.mailbox for d in bigs[:3]] == ["caldav:big-7", "caldav:big-9", "caldav:big-10"]
    assert [d.interactive for d in bigs[:4]] == [True, True, True, False]
    assert len(table) == 14


async def test_one_sweep_at_a_time(db: Database) -> None:
    """A worker that finds another sweeping skips the grouping."""
    async with db.session() as first, first.begin():
        assert await sweep(first)
        async with db.session() as second, second.begin():
            assert not await sweep(second)
    async with db.session() as s, s.begin():
        assert await sweep(s)  # the lock went with the first transaction
