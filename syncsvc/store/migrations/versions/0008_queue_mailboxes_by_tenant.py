"""queue_mailboxes indexed by tenant: the dispatcher picks each tenant's first due mailboxes
from an index range instead of intersecting a scan of every due mailbox per tenant

Revision ID: 0008
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INTERACTIVE = "interactive_at IS NOT NULL"


def upgrade() -> None:
    op.drop_index("ix_queue_mailboxes_due", table_name="queue_mailboxes")
    op.create_index("ix_queue_mailboxes_tenant_due", "queue_mailboxes", ["tenant_id", "due_at"])
    op.create_index(
        "ix_queue_mailboxes_tenant_interactive",
        "queue_mailboxes",
        ["tenant_id", "due_at"],
        postgresql_where=sa.text(INTERACTIVE),
        sqlite_where=sa.text(INTERACTIVE),
    )


def downgrade() -> None:
    op.drop_index("ix_queue_mailboxes_tenant_interactive", table_name="queue_mailboxes")
    op.drop_index("ix_queue_mailboxes_tenant_due", table_name="queue_mailboxes")
    op.create_index("ix_queue_mailboxes_due", "queue_mailboxes", ["due_at"])
