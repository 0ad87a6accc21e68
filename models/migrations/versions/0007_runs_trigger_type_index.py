"""Index on runs (company_id, trigger_type, created_at, id): GET /runs?triggerType= pages by keyset

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_runs_company_trigger_created", "runs", ["company_id", "trigger_type", "created_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_runs_company_trigger_created", table_name="runs")
