"""activities, external_events and operations without foreign keys: on PostgreSQL each key is a
per-row trigger that made up half of a batch commit's COPY (bench/commit.py); every row of
these tables is written with its parents checked or written in the same transaction, and no
parent (tenant, user, batch) is ever deleted

Revision ID: 0009
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: (table, constraint, columns, referred table, referred columns), children first.
KEYS = (
    (
        "operations",
        "fk_operations_ledger_id_external_events",
        ["ledger_id"],
        "external_events",
        ["id"],
    ),
    ("operations", "fk_operations_tenant_id_tenants", ["tenant_id"], "tenants", ["id"]),
    (
        "external_events",
        "fk_external_events_activity_id_activities",
        ["activity_id"],
        "activities",
        ["id"],
    ),
    ("external_events", "fk_external_events_tenant_id_tenants", ["tenant_id"], "tenants", ["id"]),
    ("activities", "fk_activities_batch_id_batches", ["batch_id"], "batches", ["id"]),
    ("activities", "fk_activities_tenant_id_tenants", ["tenant_id"], "tenants", ["id"]),
    (
        "activities",
        "fk_activities_tenant_id_user_id_users",
        ["tenant_id", "user_id"],
        "users",
        ["tenant_id", "id"],
    ),
)
#: SQLite cannot drop a constraint: the table is copied without it (Alembic's batch mode).
_TABLES = ("operations", "external_events", "activities")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, name, *_ in KEYS:
            op.drop_constraint(name, table, type_="foreignkey")
        return
    for table in _TABLES:
        with op.batch_alter_table(table, recreate="always") as batch:
            for owner, name, *_ in KEYS:
                if owner == table:
                    batch.drop_constraint(name, type_="foreignkey")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, name, columns, referred, referred_columns in reversed(KEYS):
            op.create_foreign_key(name, table, referred, columns, referred_columns)
        return
    for table in reversed(_TABLES):
        with op.batch_alter_table(table, recreate="always") as batch:
            for owner, name, columns, referred, referred_columns in KEYS:
                if owner == table:
                    batch.create_foreign_key(name, referred, columns, referred_columns)
