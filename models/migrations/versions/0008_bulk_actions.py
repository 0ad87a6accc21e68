"""bulk actions (POST /runs/bulk/cancel|retry) and the runs each one selected

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from models.base import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "bulk_actions",
        sa.Column("id", sa.String(length=48), nullable=False),
        sa.Column("company_id", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("request", JSON, nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("next_position", sa.Integer(), nullable=False),
        sa.Column("error", JSON, nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.Column("lease_token", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("idempotency_hash", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["company_id"],
            ["companies.id"],
            name=op.f("fk_bulk_actions_company_id_companies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bulk_actions")),
        sa.UniqueConstraint(
            "company_id", "idempotency_key", name=op.f("uq_bulk_actions_company_id_idempotency_key")
        ),
    )
    op.create_index("ix_bulk_actions_status_updated", "bulk_actions", ["status", "updated_at"])
    op.create_table(
        "bulk_action_runs",
        sa.Column("bulk_action_id", sa.String(length=48), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=48), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("result_run_id", sa.String(length=48), nullable=True),
        sa.Column("error", JSON, nullable=True),
        sa.ForeignKeyConstraint(
            ["bulk_action_id"],
            ["bulk_actions.id"],
            name=op.f("fk_bulk_action_runs_bulk_action_id_bulk_actions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("bulk_action_id", "position", name=op.f("pk_bulk_action_runs")),
    )


def downgrade() -> None:
    op.drop_table("bulk_action_runs")
    op.drop_index("ix_bulk_actions_status_updated", table_name="bulk_actions")
    op.drop_table("bulk_actions")
