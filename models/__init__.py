"""SQLAlchemy 2.0 typed models; no Flask, no HTTP."""

from models.base import Base
from models.bulk import BulkAction, BulkActionRun
from models.runs import (
    RUN_STATUSES,
    STEP_STATUSES,
    TRIGGER_TYPES,
    Run,
    StepAttempt,
    StepRun,
)
from models.secrets import Secret
from models.states import BulkItemState, BulkKind, BulkStatus, RunStatus, StepStatus, TriggerType
from models.tenancy import ApiKey, Company
from models.triggers import Schedule, WebhookDelivery
from models.workflows import Workflow, WorkflowVersion

__all__ = [
    "RUN_STATUSES",
    "STEP_STATUSES",
    "TRIGGER_TYPES",
    "ApiKey",
    "Base",
    "BulkAction",
    "BulkActionRun",
    "BulkItemState",
    "BulkKind",
    "BulkStatus",
    "Company",
    "Run",
    "RunStatus",
    "Schedule",
    "Secret",
    "StepAttempt",
    "StepRun",
    "StepStatus",
    "TriggerType",
    "WebhookDelivery",
    "Workflow",
    "WorkflowVersion",
]
