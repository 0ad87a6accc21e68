"""Run and step statuses: the only place their names are spelled (the transition table is in
``app.engine.states``)."""

from __future__ import annotations

from enum import Enum


class _Status(str, Enum):
    """A status that is its own JSON/SQL text (``str(RunStatus.PENDING) == "pending"``)."""

    def __str__(self) -> str:
        return self.value


class RunStatus(_Status):
    PENDING = "pending"
    RUNNING = "running"
    SUSPENDED = "suspended"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"


class StepStatus(_Status):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCESS = "success"
    ERROR = "error"
    SKIPPED = "skipped"


class TriggerType(_Status):
    API = "api"
    WEBHOOK = "webhook"
    SCHEDULE = "schedule"
    MANUAL = "manual"


class BulkKind(_Status):
    """What a bulk action does to each of its runs."""

    CANCEL = "cancel"
    RETRY = "retry"


class BulkStatus(_Status):
    """A bulk action: ``running`` until it has gone through every run it selected."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class BulkItemState(_Status):
    """One run of a bulk action: not reached yet, acted on, or not acted on (with the reason)."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
