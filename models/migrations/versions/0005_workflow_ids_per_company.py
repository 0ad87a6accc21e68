"""Workflow ids unique per company, and reusable once deleted

A workflow row gets a surrogate primary key, ``key``; the public ``id`` is unique only among a
company's live workflows (a partial unique index). Versions, schedules, runs and webhook deliveries
point at the key, so a run keeps the exact workflow (and versions) it started with even after its
id is deleted and reused. Existing rows keep ``key = id`` (ids were globally unique until now).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

KEY = sa.String(length=48)


def _point_at_key(table: str, *, keep_id: bool) -> None:
    """Give ``table`` a workflow_key equal to its workflow_id, and drop the FK to workflows.id."""
    with op.batch_alter_table(table) as batch_op:
        batch_op.drop_constraint(f"fk_{table}_workflow_id_workflows", type_="foreignkey")
        if keep_id:
            batch_op.add_column(sa.Column("workflow_key", KEY, nullable=True))
        else:
            batch_op.alter_column("workflow_id", new_column_name="workflow_key", type_=KEY)
    if keep_id:
        op.execute(f"UPDATE {table} SET workflow_key = workflow_id")
        with op.batch_alter_table(table) as batch_op:
            batch_op.alter_column("workflow_key", existing_type=KEY, nullable=False)


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch_op:
        batch_op.drop_constraint("uq_runs_company_id_workflow_id_idempotency_key", type_="unique")
    with op.batch_alter_table("workflow_versions") as batch_op:
        batch_op.drop_constraint("uq_workflow_versions_workflow_id_version", type_="unique")
    with op.batch_alter_table("schedules") as batch_op:
        batch_op.drop_constraint("pk_schedules", type_="primary")
    _point_at_key("runs", keep_id=True)
    _point_at_key("webhook_deliveries", keep_id=True)
    _point_at_key("workflow_versions", keep_id=False)
    _point_at_key("schedules", keep_id=False)

    with op.batch_alter_table("workflows") as batch_op:
        batch_op.add_column(sa.Column("key", KEY, nullable=True))
    op.execute("UPDATE workflows SET key = id")
    with op.batch_alter_table("workflows") as batch_op:
        batch_op.drop_constraint("pk_workflows", type_="primary")
        batch_op.alter_column("key", existing_type=KEY, nullable=False)
        batch_op.create_primary_key("pk_workflows", ["key"])
    op.create_index(
        "uq_workflows_company_live_id",
        "workflows",
        ["company_id", "id"],
        unique=True,
        postgresql_where=sa.text("deleted_at IS NULL"),
        sqlite_where=sa.text("deleted_at IS NULL"),
    )

    for table in ("runs", "webhook_deliveries", "workflow_versions", "schedules"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.create_foreign_key(
                f"fk_{table}_workflow_key_workflows",
                "workflows",
                ["workflow_key"],
                ["key"],
                ondelete="CASCADE",
            )
    with op.batch_alter_table("schedules") as batch_op:
        batch_op.create_primary_key("pk_schedules", ["workflow_key"])
    with op.batch_alter_table("workflow_versions") as batch_op:
        batch_op.create_unique_constraint(
            "uq_workflow_versions_workflow_key_version", ["workflow_key", "version"]
        )
    with op.batch_alter_table("runs") as batch_op:
        batch_op.create_unique_constraint(
            "uq_runs_workflow_key_idempotency_key", ["workflow_key", "idempotency_key"]
        )
    with op.batch_alter_table("webhook_deliveries") as batch_op:
        batch_op.drop_index("ix_webhook_deliveries_workflow_received")
        batch_op.create_index(
            "ix_webhook_deliveries_workflow_received", ["workflow_key", "created_at", "id"], unique=False
        )


def downgrade() -> None:
    raise NotImplementedError("workflow ids may now repeat across companies; there is no way back")
