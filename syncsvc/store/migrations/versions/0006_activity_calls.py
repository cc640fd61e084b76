"""a call's direction and phone number (XS Office calls page); the tenant's activity list
walks (tenant, start, id) and (tenant, due, id) in order

Revision ID: 0006
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("activities") as batch:
        batch.add_column(sa.Column("direction", sa.String(length=16), nullable=True))
        batch.add_column(
            sa.Column("phone", sa.String(length=64), nullable=False, server_default="")
        )
    op.create_index("ix_activities_tenant_start", "activities", ["tenant_id", "start", "id"])
    op.create_index("ix_activities_tenant_due", "activities", ["tenant_id", "due", "id"])
    # Calls planned before directions existed were all placed by the CRM's users.
    op.execute("UPDATE activities SET direction = 'outgoing' WHERE kind = 'call'")


def downgrade() -> None:
    op.drop_index("ix_activities_tenant_due", table_name="activities")
    op.drop_index("ix_activities_tenant_start", table_name="activities")
    with op.batch_alter_table("activities") as batch:
        batch.drop_column("phone")
        batch.drop_column("direction")
