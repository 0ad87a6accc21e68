"""runs.concurrency_key and runs.slot: a workflow's concurrency limit, per key, held in the run rows

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("concurrency_key", sa.Text(), nullable=True))
    op.add_column("runs", sa.Column("slot", sa.String(length=8), nullable=True))
    # A key's held slots and its waiting runs in arrival order; only runs that hold or wait are in it.
    op.create_index(
        "ix_runs_slots",
        "runs",
        ["concurrency_key", "slot", "created_at", "id"],
        postgresql_where=sa.text("slot IS NOT NULL"),
        sqlite_where=sa.text("slot IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_runs_slots", table_name="runs")
    op.drop_column("runs", "slot")
    op.drop_column("runs", "concurrency_key")
