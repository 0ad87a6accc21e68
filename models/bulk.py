"""Bulk actions (cancel or retry many runs) and the runs each one selected, with their outcomes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, JSONType, UTCDateTime
from models.runs import StatusType
from models.states import BulkItemState, BulkKind, BulkStatus


class BulkAction(Base):
    __tablename__ = "bulk_actions"
    __table_args__ = (
        UniqueConstraint("company_id", "idempotency_key"),
        # The sweep looks for running actions whose progress stalled (a lost message, a dead worker).
        Index("ix_bulk_actions_status_updated", "status", "updated_at"),
    )

    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    company_id: Mapped[str] = mapped_column(ForeignKey("companies.id", ondelete="CASCADE"))
    action: Mapped[BulkKind] = mapped_column(StatusType(BulkKind))
    status: Mapped[BulkStatus] = mapped_column(StatusType(BulkStatus))
    # What was asked: the filter or the run ids, and the retry's workflow version.
    request: Mapped[Any] = mapped_column(JSONType)
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    # Position of the first run not yet gone through (runs are taken in position order).
    next_position: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Moved on at every step forward; the sweep re-sends an action that stopped moving.
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # One message at a time goes through an action's runs: the holder of an unexpired lease.
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    idempotency_hash: Mapped[str | None] = mapped_column(String(64))


class BulkActionRun(Base):
    __tablename__ = "bulk_action_runs"

    bulk_action_id: Mapped[str] = mapped_column(
        ForeignKey("bulk_actions.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String(48))
    state: Mapped[BulkItemState] = mapped_column(StatusType(BulkItemState))
    # A retry's new run (linked to ``run_id`` by restartedFromRunId).
    result_run_id: Mapped[str | None] = mapped_column(String(48))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
