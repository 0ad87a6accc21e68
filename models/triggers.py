"""What arrives from outside: webhook deliveries (the delivery log) and cron schedules."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, JSONType, UTCDateTime


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_workflow_received", "workflow_key", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    company_id: Mapped[str] = mapped_column(ForeignKey("companies.id", ondelete="CASCADE"))
    workflow_key: Mapped[str] = mapped_column(ForeignKey("workflows.key", ondelete="CASCADE"))
    workflow_id: Mapped[str] = mapped_column(String(80))
    # "created_at" so the shared keyset cursor pages deliveries like runs.
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivery_id: Mapped[str | None] = mapped_column(String(255))
    verified: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(String(500))
    run_id: Mapped[str | None] = mapped_column(String(48))
    duplicate: Mapped[bool] = mapped_column(Boolean, default=False)
    status_code: Mapped[int] = mapped_column(Integer)


class Schedule(Base):
    __tablename__ = "schedules"
    __table_args__ = (Index("ix_schedules_next_run_at", "next_run_at"),)

    workflow_key: Mapped[str] = mapped_column(
        ForeignKey("workflows.key", ondelete="CASCADE"), primary_key=True
    )
    company_id: Mapped[str] = mapped_column(ForeignKey("companies.id", ondelete="CASCADE"))
    cron: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64))
    input: Mapped[Any] = mapped_column(JSONType)
    next_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_fire_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
