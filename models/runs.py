"""Runs, the current state of each of their steps, and every attempt."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import (
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, JSONType, UTCDateTime
from models.states import RunStatus, StepStatus, TriggerType

RUN_STATUSES = tuple(s.value for s in RunStatus)
STEP_STATUSES = tuple(s.value for s in StepStatus)
TRIGGER_TYPES = tuple(t.value for t in TriggerType)


class StatusType(TypeDecorator):
    """A status column: stored as its text, loaded as the enum member."""

    impl = String(16)
    cache_ok = True

    def __init__(self, enum: type[Enum]) -> None:
        super().__init__()
        self.enum = enum

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: str | None, dialect: Any) -> Any:
        return None if value is None else self.enum(value)


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        # Keyset pagination, newest first (a B-tree scans backwards), with and without each filter.
        Index("ix_runs_company_created", "company_id", "created_at", "id"),
        Index("ix_runs_company_workflow_created", "company_id", "workflow_id", "created_at", "id"),
        Index("ix_runs_company_status_created", "company_id", "status", "created_at", "id"),
        Index("ix_runs_company_trigger_created", "company_id", "trigger_type", "created_at", "id"),
        UniqueConstraint("workflow_key", "idempotency_key"),
        # A run's restart lineage: the runs retried or restarted from it (GET /runs/:id).
        Index("ix_runs_restarted_from", "restarted_from_run_id"),
        # A concurrency key's held slots and waiting runs, in arrival order (app.engine.concurrency).
        Index(
            "ix_runs_slots",
            "concurrency_key",
            "slot",
            "created_at",
            "id",
            postgresql_where=text("slot IS NOT NULL"),
            sqlite_where=text("slot IS NOT NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    company_id: Mapped[str] = mapped_column(ForeignKey("companies.id", ondelete="CASCADE"))
    # The workflow row (its public id may be reused once deleted) and its public id, for the API.
    workflow_key: Mapped[str] = mapped_column(ForeignKey("workflows.key", ondelete="CASCADE"))
    workflow_id: Mapped[str] = mapped_column(String(80))
    workflow_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[RunStatus] = mapped_column(StatusType(RunStatus))
    trigger_type: Mapped[str] = mapped_column(String(16))
    input: Mapped[Any] = mapped_column(JSONType)
    output: Mapped[Any | None] = mapped_column(JSONType)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    restarted_from_run_id: Mapped[str | None] = mapped_column(String(48))
    restart_from_step_id: Mapped[str | None] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # SHA-256 of the triggering request, to tell a repeat from a different request with the same key.
    idempotency_hash: Mapped[str | None] = mapped_column(String(64))
    # The workflow's concurrency group (workflow key and rendered key) and the run's place in it:
    # "waiting" (pending, nothing queued), "held" (a slot), or NULL (none, or freed when it ended).
    concurrency_key: Mapped[str | None] = mapped_column(Text)
    slot: Mapped[str | None] = mapped_column(String(8))


class StepRun(Base):
    __tablename__ = "step_runs"
    __table_args__ = (
        UniqueConstraint("run_id", "step_id"),
        # Recovery sweeps look for steps stuck in one status.
        Index("ix_step_runs_status_queued", "status", "queued_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step_id: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)
    status: Mapped[StepStatus] = mapped_column(StatusType(StepStatus))
    # Number of the current (or last) attempt; 0 before the first one is claimed.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    input: Mapped[Any | None] = mapped_column(JSONType)
    output: Mapped[Any | None] = mapped_column(JSONType)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Copied unchanged from the run this one was restarted from.
    reused: Mapped[bool] = mapped_column(Boolean, default=False)


class StepAttempt(Base):
    __tablename__ = "step_attempts"
    __table_args__ = (Index(None, "run_id", "position", "attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step_id: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    status: Mapped[StepStatus] = mapped_column(StatusType(StepStatus))
    input: Mapped[Any | None] = mapped_column(JSONType)
    output: Mapped[Any | None] = mapped_column(JSONType)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    # A forEach step's item (its position in the list) for an item's attempt; null for a step's own.
    item_index: Mapped[int | None] = mapped_column(Integer)
