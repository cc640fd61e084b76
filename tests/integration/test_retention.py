"""Retention prunes exactly the history older than its age, on SQLite and PostgreSQL, and keeps
everything still needed: queued and dead operations, ledger rows whose event may still exist,
deleted activities that still have ledger rows, the newest row of a table with rowids."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from syncsvc.config import ConfigError, Settings
from syncsvc.runtime import supervised
from syncsvc.service.idempotency import ANSWER_TTL
from syncsvc.service.retention import (
    DELETED_ACTIVITY_MIN_AGE,
    RetentionPolicy,
    prune,
    run_retention,
)
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from syncsvc.store.models import (
    Activity,
    Batch,
    ExternalEvent,
    IdempotencyKey,
    Operation,
    Schedule,
    ScheduleRun,
    SyncCycle,
    User,
)
from syncsvc.store.types import utcnow
from tests.servers.postgres import PostgresServer

NOW = utcnow()
#: Older than every default age, and younger than every one.
OLD = NOW - timedelta(days=60)
YOUNG = NOW - timedelta(hours=1)
POLICY = RetentionPolicy()
SETTLE_TIMEOUT_S = 60.0


@dataclass(slots=True)
class Rows:
    """What a scenario inserted, by label; ``keep`` is what must survive."""

    db: Database
    tenant_id: str
    keep: dict[str, set[str]]
    gone: dict[str, set[str]]


async def _tenant(db: Database) -> str:
    tenant, _key = await create_tenant(db, "retention")
    async with db.session() as s, s.begin():
        s.add(User(tenant_id=tenant.id, id="u1", timezone="UTC"))
        s.add(Batch(id="b1", tenant_id=tenant.id, created_by="test", state="deleted"))
        s.add(
            Schedule(
                id="s1",
                tenant_id=tenant.id,
                name="weekly",
                cron="0 6 * * mon",
                timezone="UTC",
                targets_url="https://crm.example/targets",
                next_run_at=NOW + timedelta(days=1),
            )
        )
    return tenant.id


def _op(tenant_id: str, label: str, state: str, created: datetime, updated: datetime) -> Operation:
    return Operation(
        tenant_id=tenant_id,
        kind="callback",
        mailbox="crm:t",
        state=state,
        not_before=created,
        payload={"label": label},
        created_at=created,
        updated_at=updated,
    )


def _activity(tenant_id: str, label: str, *, deleted: bool, updated: datetime) -> Activity:
    return Activity(
        id=label,
        tenant_id=tenant_id,
        batch_id="b1",
        target_id="t",
        user_id="u1",
        kind="meeting",
        deleted=deleted,
        created_at=OLD - timedelta(days=1),
        updated_at=updated,
    )


def _ledger(tenant_id: str, activity: str, label: str, state: str, updated: datetime) -> Any:
    return ExternalEvent(
        tenant_id=tenant_id,
        activity_id=activity,
        batch_id="b1",
        user_id="u1",
        provider="caldav",
        calendar=label,
        state=state,
        created_at=OLD - timedelta(days=1),
        updated_at=updated,
    )


async def _scenario(db: Database) -> Rows:
    """One row of each kind on each side of its age, inserted in the order time makes them
    (ids grow with ``created_at``, as they do in service)."""
    t = await _tenant(db)
    keep: dict[str, set[str]] = {}
    gone: dict[str, set[str]] = {}

    def mark(table: str, label: str, stays: bool) -> str:
        (keep if stays else gone).setdefault(table, set()).add(label)
        return label

    async with db.session() as s, s.begin():
        # Activities and their ledger rows (ledger label = its calendar).
        for label, deleted, updated, ledger, stays in (
            ("a-gone", True, OLD, [("l-gone", "deleted", OLD, False)], False),
            ("a-no-ledger", True, OLD, [], False),
            (
                "a-two-rows",
                True,
                OLD,
                [("l-two-1", "deleted", OLD, False), ("l-two-2", "deleted", OLD, False)],
                False,
            ),
            ("a-failed", True, OLD, [("l-failed", "failed", OLD, True)], True),
            ("a-pending", True, OLD, [("l-pending", "pending_delete", OLD, True)], True),
            ("a-synced", True, OLD, [("l-synced", "synced", OLD, True)], True),
            ("a-young-row", True, OLD, [("l-young", "deleted", YOUNG, True)], True),
            ("a-op-dead", True, OLD, [("l-op-dead", "deleted", OLD, True)], True),
            ("a-op-young", True, OLD, [("l-op-young", "deleted", OLD, True)], True),
            ("a-young", True, YOUNG, [("l-of-young", "deleted", OLD, True)], True),
            # Deleted in the user's calendar, still live here: its row stops a recreate.
            ("a-live", False, OLD, [("l-live", "deleted", OLD, True)], True),
        ):
            s.add(_activity(t, mark("activities", label, stays), deleted=deleted, updated=updated))
            await s.flush()
            for row_label, state, row_updated, row_stays in ledger:
                s.add(_ledger(t, label, mark("ledger", row_label, row_stays), state, row_updated))
        await s.flush()
        ledger_ids = {row.calendar: row.id for row in await s.scalars(select(ExternalEvent))}
        # Operations (label in the payload), oldest first.
        for label, state, created, updated, stays in (
            ("o-done-1", "done", OLD, OLD, False),
            ("o-done-2", "done", OLD, OLD + timedelta(minutes=1), False),
            ("o-done-3", "done", OLD, OLD + timedelta(minutes=2), False),
            ("o-pending", "pending", OLD, OLD, True),
            ("o-running", "running", OLD, OLD, True),
            ("o-dead", "dead", OLD, OLD, True),
            ("o-done-4", "done", OLD, OLD + timedelta(minutes=3), False),
            ("o-done-late", "done", OLD, YOUNG, True),  # created long ago, finished now
            ("o-done-young", "done", YOUNG, YOUNG, True),
            ("o-pending-young", "pending", YOUNG, YOUNG, True),
        ):
            s.add(_op(t, mark("operations", label, stays), state, created, updated))
        for label, state, updated in (
            ("o-ledger-dead", "dead", OLD),
            ("o-ledger-young", "done", YOUNG),
        ):
            op = _op(t, mark("operations", label, True), state, YOUNG, updated)
            op.ledger_id = ledger_ids["l-op-dead" if state == "dead" else "l-op-young"]
            op.kind = "delete"
            s.add(op)
        # Sync cycles (label = mailbox).
        for label, started, stays in (
            ("c-old-1", OLD, False),
            ("c-old-2", OLD, False),
            ("c-old-3", OLD + timedelta(seconds=1), False),
            ("c-young", YOUNG, True),
        ):
            s.add(
                SyncCycle(
                    provider="caldav", mailbox=mark("cycles", label, stays), started_at=started
                )
            )
        # Idempotency records: expired after ANSWER_TTL, whatever their status.
        for label, created, status, stays in (
            ("k-old", NOW - ANSWER_TTL - timedelta(minutes=1), 201, False),
            ("k-old-reserved", OLD, 0, False),
            ("k-old-2", OLD, 201, False),
            ("k-young", NOW - ANSWER_TTL + timedelta(minutes=1), 201, True),
        ):
            s.add(
                IdempotencyKey(
                    tenant_id=t,
                    key=mark("keys", label, stays),
                    method="POST",
                    path="/v1/batches",
                    request_hash="0" * 64,
                    status=status,
                    response={},
                    created_at=created,
                )
            )
        # Schedule runs: only finished ones, by their end.
        for n, (label, state, finished, stays) in enumerate(
            (
                ("r-ok", "ok", OLD, False),
                ("r-failed", "failed", OLD, False),
                ("r-ok-2", "ok", OLD, False),
                ("r-running", "running", None, True),
                ("r-retrying", "retrying", None, True),
                ("r-young", "ok", YOUNG, True),
            )
        ):
            s.add(
                ScheduleRun(
                    id=mark("runs", label, stays),
                    tenant_id=t,
                    schedule_id="s1",
                    occurrence=OLD + timedelta(days=n),
                    state=state,
                    started_at=OLD,
                    finished_at=finished,
                )
            )
    return Rows(db, t, keep, gone)


async def _labels(db: Database) -> dict[str, set[str]]:
    async with db.session() as s:
        return {
            "activities": set(await s.scalars(select(Activity.id))),
            "ledger": set(await s.scalars(select(ExternalEvent.calendar))),
            "operations": {p["label"] for p in await s.scalars(select(Operation.payload))},
            "cycles": set(await s.scalars(select(SyncCycle.mailbox))),
            "keys": set(await s.scalars(select(IdempotencyKey.key))),
            "runs": set(await s.scalars(select(ScheduleRun.id))),
        }


@pytest.mark.parametrize("batch_rows", [2, 1000])
async def test_prunes_exactly_what_is_older_than_its_age_and_no_longer_needed(
    db: Database, batch_rows: int
) -> None:
    rows = await _scenario(db)
    removed = await prune(db, POLICY, NOW, batch_rows=batch_rows, pause_s=0)
    assert await _labels(db) == rows.keep
    assert removed == {
        "operations": 4,
        "sync_cycles": 3,
        "idempotency_keys": 3,
        "schedule_runs": 3,
        "activities": 3,
        "external_events": 3,
    }
    # A second pass finds nothing more.
    assert await prune(db, POLICY, NOW, batch_rows=batch_rows, pause_s=0) == {}


async def test_ages_of_zero_keep_everything(db: Database) -> None:
    rows = await _scenario(db)
    settings = Settings(
        retain_done_operations_days=0,
        retain_cycles_days=0,
        retain_schedule_runs_days=0,
        retain_deleted_activities_days=0,
    )
    policy = RetentionPolicy.from_settings(settings)
    assert await prune(db, policy, NOW, pause_s=0) == {"idempotency_keys": 3}
    everything = {t: rows.keep.get(t, set()) | rows.gone.get(t, set()) for t in rows.keep}
    everything["keys"] = rows.keep["keys"]
    assert await _labels(db) == everything


async def test_an_idle_queue_keeps_its_newest_operation_and_cycle(db: Database) -> None:
    """SQLite hands the next row max(id) + 1: a pruned newest id would come back, and a
    callback's ``op_<id>`` would name two deliveries."""
    t = await _tenant(db)
    async with db.session() as s, s.begin():
        for n in range(5):
            s.add(_op(t, f"o{n}", "done", OLD + timedelta(minutes=n), OLD + timedelta(minutes=n)))
            s.add(SyncCycle(provider="caldav", mailbox=f"c{n}", started_at=OLD))
    await prune(db, POLICY, NOW, batch_rows=2, pause_s=0)
    labels = await _labels(db)
    assert labels["operations"] == {"o4"}
    assert labels["cycles"] == {"c4"}


async def test_two_pruners_at_once_do_the_work_once_between_them(db: Database) -> None:
    rows = await _scenario(db)
    other = Database(db.url.render_as_string(hide_password=False))
    try:
        await asyncio.gather(
            prune(db, POLICY, NOW, batch_rows=2, pause_s=0),
            prune(other, POLICY, NOW, batch_rows=2, pause_s=0),
        )
        await prune(db, POLICY, NOW, batch_rows=2, pause_s=0)  # whoever skipped, now done
    finally:
        await other.aclose()
    assert await _labels(db) == rows.keep


def test_settings_read_the_ages_and_refuse_negative_ones() -> None:
    settings = Settings.from_env(
        {"SYNCSVC_RETAIN_DONE_OPERATIONS_DAYS": "3", "SYNCSVC_RETAIN_CYCLES_DAYS": "0"}
    )
    policy = RetentionPolicy.from_settings(settings)
    assert policy.done_operations == timedelta(days=3)
    assert policy.cycles is None
    assert policy.schedule_runs == timedelta(days=30)
    assert policy.deleted_activities == DELETED_ACTIVITY_MIN_AGE
    assert policy.idempotency == ANSWER_TTL
    # The feed shows deleted activities as cancelled for a month: never pruned sooner.
    short = Settings(retain_deleted_activities_days=2)
    assert RetentionPolicy.from_settings(short).deleted_activities == DELETED_ACTIVITY_MIN_AGE
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"SYNCSVC_RETAIN_SCHEDULE_RUNS_DAYS": "-1"})
    assert refused.value.details[0].loc == ("SYNCSVC_RETAIN_SCHEDULE_RUNS_DAYS",)


@pytest.mark.timeout(120)
async def test_the_retention_loop_rides_out_a_database_outage(own_postgres: PostgresServer) -> None:
    db = Database(await own_postgres.create_database())
    await db.migrate()
    try:
        async with db.session() as s, s.begin():
            for n in range(3):
                s.add(SyncCycle(provider="caldav", mailbox=f"c{n}", started_at=OLD))
        own_postgres.crash()
        stop = asyncio.Event()
        policy = RetentionPolicy(done_operations=None, idempotency=None)
        loop = asyncio.create_task(
            supervised(
                "retention", lambda s: run_retention(db, policy, s, interval_s=0.1), db, stop
            )
        )
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while db.outage.since is None:  # the loop has met the outage
            assert time.monotonic() < deadline and not loop.done()
            await asyncio.sleep(0.05)
        own_postgres.start()
        while (await _labels(db))["cycles"] != {"c2"}:
            assert time.monotonic() < deadline and not loop.done()
            await asyncio.sleep(0.1)
        assert db.outage.since is None
        stop.set()
        await loop
    finally:
        await db.aclose()
