"""Index on runs.restarted_from_run_id (a run's children in GET /runs/:id)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_runs_restarted_from", "runs", ["restarted_from_run_id"])


def downgrade() -> None:
    op.drop_index("ix_runs_restarted_from", table_name="runs")
