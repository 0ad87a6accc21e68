"""SQLAlchemy 2.0 typed models; no Flask, no HTTP."""

from models.base import Base
from models.runs import (
    ACTIVE_RUN_STATUSES,
    RUN_STATUSES,
    STEP_STATUSES,
    TRIGGER_TYPES,
    Run,
    StepAttempt,
    StepRun,
)
from models.tenancy import ApiKey, Company
from models.triggers import Schedule, WebhookDelivery
from models.workflows import Workflow, WorkflowVersion

__all__ = [
    "ACTIVE_RUN_STATUSES",
    "RUN_STATUSES",
    "STEP_STATUSES",
    "TRIGGER_TYPES",
    "ApiKey",
    "Base",
    "Company",
    "Run",
    "Schedule",
    "StepAttempt",
    "StepRun",
    "WebhookDelivery",
    "Workflow",
    "WorkflowVersion",
]
