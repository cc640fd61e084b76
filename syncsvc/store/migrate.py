r"""Brings a database schema up to date (``alembic upgrade head``) from inside the service.

Every command runs this first, and several processes may start at once (``api`` and two
``worker`` containers), so the upgrade is serialised: on PostgreSQL by a transaction-scoped
advisory lock, on SQLite by taking the write lock up front (``BEGIN IMMEDIATE``; the others
wait out the busy timeout). Whoever comes second finds the schema at head and does nothing.
The whole upgrade is one transaction (both backends have transactional DDL), so a failed
migration leaves the schema as it was.

The Alembic config is built in code; the revisions live in ``syncsvc/store/migrations`` and
are installed with the package.

Writing revisions (repository root, venv active):

* Nothing is deployed yet, so after changing ``store/models.py`` regenerate the single
  initial revision with one command::

      (cd syncsvc/store/migrations && rm -f versions/0001_initial.py && \
        alembic revision --autogenerate --rev-id 0001 -m initial)

  then read the new file (autogenerate misses renames and server defaults) and run
  ``pytest tests/integration/test_migrations.py``, which fails while the migrated schema
  differs from the models.
* Once a release is deployed, add revisions instead: ``syncsvc migrate`` a scratch SQLite
  file, point ``sqlalchemy.url`` in ``migrations/alembic.ini`` at it and run
  ``alembic revision --autogenerate -m "what changed"`` in that folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
#: PostgreSQL advisory lock key held while migrating: the bytes of ``syncsvc!`` as an int64.
MIGRATION_LOCK_KEY = int.from_bytes(b"syncsvc!", "big")

log = logging.getLogger(__name__)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config without an ini file; ``connection`` is what env.py migrates."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


async def upgrade(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.run_sync(_upgrade_serialised)


def _upgrade_serialised(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    try:
        before = MigrationContext.configure(conn).get_current_revision()
        command.upgrade(alembic_config(conn), "head")
        after = MigrationContext.configure(conn).get_current_revision()
    except BaseException:
        conn.rollback()
        raise
    conn.commit()
    if after != before:
        log.info("event=db.migrated from=%s to=%s", before, after)
