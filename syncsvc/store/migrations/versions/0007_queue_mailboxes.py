"""due mailboxes without grouping the outbox: queue_mailboxes, kept by a statement trigger on
operations (PostgreSQL), and a partial index that finds a mailbox's next open operation

Revision ID: 0007
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = "state IN ('pending', 'running')"

#: Rows of the statement that became due, or due earlier, lower their mailbox's ``due_at`` and
#: raise its ``version`` (see ``syncsvc.queue.due``). ``least`` skips NULLs.
_UPSERT = """
  INSERT INTO queue_mailboxes AS q (tenant_id, mailbox, due_at, interactive_at, version)
  SELECT n.tenant_id, n.mailbox, min(n.not_before),
         min(n.not_before) FILTER (WHERE n.lane = 'interactive'), 1
  FROM {rows}
  GROUP BY n.tenant_id, n.mailbox
  ON CONFLICT (tenant_id, mailbox) DO UPDATE
  SET due_at = least(q.due_at, excluded.due_at),
      interactive_at = least(q.interactive_at, excluded.interactive_at),
      version = q.version + 1;
"""
_INSERTED = "new_rows n WHERE n.state IN ('pending', 'running')"
_UPDATED = (
    "new_rows n JOIN old_rows o ON o.id = n.id WHERE n.state IN ('pending', 'running') "
    "AND (o.state NOT IN ('pending', 'running') OR n.not_before < o.not_before "
    "OR (n.lane = 'interactive' AND o.lane <> 'interactive'))"
)


def _function(name: str, rows: str) -> str:
    body = _UPSERT.format(rows=rows)
    return (
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ "
        f"BEGIN {body} RETURN NULL; END $$"
    )


def upgrade() -> None:
    op.create_table(
        "queue_mailboxes",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("mailbox", sa.Text(), nullable=False),
        sa.Column("due_at", sa.DateTime(), nullable=False),
        sa.Column("interactive_at", sa.DateTime(), nullable=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "mailbox"),
    )
    op.create_index("ix_queue_mailboxes_due", "queue_mailboxes", ["due_at"])
    op.create_index(
        "ix_operations_open",
        "operations",
        ["tenant_id", "mailbox", "not_before"],
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite's dispatcher groups the outbox itself
    op.execute(_function("queue_mailboxes_inserted", _INSERTED))
    op.execute(_function("queue_mailboxes_updated", _UPDATED))
    op.execute(
        "CREATE TRIGGER operations_due_inserted AFTER INSERT ON operations "
        "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
        "EXECUTE FUNCTION queue_mailboxes_inserted()"
    )
    op.execute(
        "CREATE TRIGGER operations_due_updated AFTER UPDATE ON operations "
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT "
        "EXECUTE FUNCTION queue_mailboxes_updated()"
    )
    op.execute(
        "INSERT INTO queue_mailboxes (tenant_id, mailbox, due_at, interactive_at, version) "
        "SELECT tenant_id, mailbox, min(not_before), "
        "min(not_before) FILTER (WHERE lane = 'interactive'), 1 "
        f"FROM operations WHERE {OPEN} GROUP BY tenant_id, mailbox"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER operations_due_updated ON operations")
        op.execute("DROP TRIGGER operations_due_inserted ON operations")
        op.execute("DROP FUNCTION queue_mailboxes_updated()")
        op.execute("DROP FUNCTION queue_mailboxes_inserted()")
    op.drop_index("ix_operations_open", table_name="operations")
    op.drop_index("ix_queue_mailboxes_due", table_name="queue_mailboxes")
    op.drop_table("queue_mailboxes")
