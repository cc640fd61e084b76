"""The migrations build exactly the schema the models describe, on SQLite and PostgreSQL,
and any number of processes may migrate the same database at once."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import datetime
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from syncsvc.store.db import Database
from syncsvc.store.migrate import alembic_config
from syncsvc.store.models import Base

SYNCSVC = str(Path(sys.executable).with_name("syncsvc"))
CONCURRENT_MIGRATIONS = 3


def _schema_diff(conn: Connection) -> list[object]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def _current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


async def _check_at_head(url: str) -> None:
    db = Database(url)
    try:
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_schema_diff) == []
            head = ScriptDirectory.from_config(alembic_config()).get_current_head()
            assert await conn.run_sync(_current_revision) == head
    finally:
        await db.aclose()


async def test_migrated_schema_equals_the_models(database_url: str) -> None:
    db = Database(database_url)
    try:
        await db.migrate()
        await db.migrate()  # a second run finds nothing to do
    finally:
        await db.aclose()
    await _check_at_head(database_url)


async def test_concurrent_migrate_processes_all_succeed(database_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "SYNCSVC_DATABASE_URL": database_url}
    processes = [
        await asyncio.create_subprocess_exec(
            SYNCSVC,
            "migrate",
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(CONCURRENT_MIGRATIONS)
    ]
    results = await asyncio.gather(*(p.communicate() for p in processes))
    for process, (_out, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err.decode()
    await _check_at_head(database_url)
    db = Database(database_url)
    try:
        async with db.engine.connect() as conn:
            versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
        assert len(versions) == 1
    finally:
        await db.aclose()


def _upgrade_with_shared_mailbox(conn: Connection) -> list[tuple[str, str, str]]:
    command.upgrade(alembic_config(conn), "0001")
    for tenant, at in (("ten_b", datetime(2026, 1, 2)), ("ten_a", datetime(2026, 1, 1))):
        conn.execute(
            text(
                "INSERT INTO tenants (id, name, api_key_hash, closing_days, created_at) "
                "VALUES (:t, :t, :t, '[]', :at)"
            ),
            {"t": tenant, "at": at},
        )
        conn.execute(
            text(
                "INSERT INTO users (tenant_id, id, name, email, mobile, timezone, days_off, "
                "provider_days_off, calendar_provider, calendar_config, created_at, updated_at) "
                "VALUES (:t, 'u', '', '', '', 'UTC', '[]', '[]', 'graph', :c, :at, :at)"
            ),
            {"t": tenant, "c": '{"mailbox": "MD@corp.example"}', "at": at},
        )
    command.upgrade(alembic_config(conn), "head")
    rows = conn.execute(text("SELECT provider, address, tenant_id FROM mailbox_owners"))
    return [tuple(r) for r in rows]


async def test_mailboxes_registered_before_ownership_go_to_the_first_tenant(
    database_url: str,
) -> None:
    db = Database(database_url)
    try:
        async with db.engine.begin() as conn:
            owners = await conn.run_sync(_upgrade_with_shared_mailbox)
    finally:
        await db.aclose()
    assert owners == [("graph", "md@corp.example", "ten_a")]


def _upgrade_with_a_synced_batch(conn: Connection) -> tuple[list[int], str]:
    """Rows of every table 0009 rebuilds on SQLite (drops keys of on PostgreSQL), then head."""
    command.upgrade(alembic_config(conn), "0008")
    at = datetime(2026, 1, 1)
    statements = (
        "INSERT INTO tenants (id, name, api_key_hash, closing_days, created_at) "
        "VALUES ('t', 't', 'h', '[]', :at)",
        "INSERT INTO users (tenant_id, id, name, email, mobile, timezone, days_off, "
        "provider_days_off, calendar_provider, calendar_config, created_at, updated_at) "
        "VALUES ('t', 'u', '', '', '', 'UTC', '[]', '[]', 'caldav', '{}', :at, :at)",
        "INSERT INTO batches (id, tenant_id, created_by, targetgroup_name, request, state, "
        "total, created_at, updated_at) VALUES ('b', 't', 'x', '', '{}', 'synced', 1, :at, :at)",
        "INSERT INTO activities (id, tenant_id, batch_id, seq, target_id, target_ids, user_id, "
        "kind, subject, description, location, status, priority, attendees, fields, phone, "
        "user_edited, version, deleted, created_at, updated_at) VALUES ('a', 't', 'b', 0, "
        "'x', '[]', 'u', 'meeting', 's', '', '', 'planned', 'normal', '[]', '{}', '', "
        "false, 1, false, :at, :at)",
        "INSERT INTO external_events (id, tenant_id, activity_id, batch_id, user_id, provider, "
        "calendar, event_id, state, attempts, created_at, updated_at) VALUES (7, 't', 'a', "
        "'b', 'u', 'caldav', 'c', 'e', 'synced', 0, :at, :at)",
        "INSERT INTO operations (tenant_id, kind, ledger_id, batch_id, mailbox, lane, state, "
        "attempts, not_before, payload, created_at, updated_at) VALUES ('t', 'create', 7, "
        "'b', 'caldav:c', 'bulk', 'done', 1, :at, '{}', :at, :at)",
    )
    for statement in statements:
        conn.execute(text(statement), {"at": at})
    command.upgrade(alembic_config(conn), "head")
    counts = [
        conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
        for table in ("activities", "external_events", "operations")
    ]
    if conn.dialect.name == "sqlite":
        sql = "SELECT sql FROM sqlite_master WHERE name = 'ix_operations_open'"
    else:
        sql = "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_operations_open'"
    return counts, str(conn.execute(text(sql)).scalar_one())


async def test_the_bulk_tables_keep_their_rows_and_indexes_without_foreign_keys(
    database_url: str,
) -> None:
    db = Database(database_url)
    try:
        async with db.engine.begin() as conn:
            counts, open_index = await conn.run_sync(_upgrade_with_a_synced_batch)
    finally:
        await db.aclose()
    assert counts == [1, 1, 1]
    assert "WHERE" in open_index and "pending" in open_index  # still partial
    await _check_at_head(database_url)
