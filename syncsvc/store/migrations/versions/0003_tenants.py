"""tenants as a boundary: per-tenant signing secrets, mailbox ownership, domains

Revision ID: 0003
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("signing_secret", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("previous_signing_secret", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("previous_signing_secret_until", sa.DateTime(), nullable=True))
    op.create_table(
        "mailbox_owners",
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("provider", "address"),
    )
    op.create_table(
        "tenant_domains",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("domain", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("tenant_id", "provider", "domain"),
    )
    _claim_existing_mailboxes()


def _claim_existing_mailboxes() -> None:
    """Mailboxes registered before ownership go to the tenant whose user named them first."""
    fields = {"graph": "mailbox", "google": "calendar_id"}
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(
            "SELECT tenant_id, calendar_provider, calendar_config FROM users "
            "WHERE calendar_provider IN ('graph', 'google') ORDER BY created_at, tenant_id, id"
        )
    )
    owners: dict[tuple[str, str], str] = {}
    for tenant_id, provider, config in rows:
        config = json.loads(config) if isinstance(config, str) else (config or {})
        address = str(config.get(fields[provider]) or "").strip().lower()
        if address:
            owners.setdefault((provider, address), tenant_id)
    table = sa.table(
        "mailbox_owners",
        sa.column("provider"),
        sa.column("address"),
        sa.column("tenant_id"),
        sa.column("created_at"),
    )
    now = datetime.now(UTC).replace(tzinfo=None)
    if owners:
        op.bulk_insert(
            table,
            [
                {"provider": p, "address": a, "tenant_id": t, "created_at": now}
                for (p, a), t in owners.items()
            ],
        )


def downgrade() -> None:
    op.drop_table("tenant_domains")
    op.drop_table("mailbox_owners")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("previous_signing_secret_until")
        batch.drop_column("previous_signing_secret")
        batch.drop_column("signing_secret")
