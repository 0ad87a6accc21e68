"""Built-in step actions. ``from workers.actions import StepError, action`` keeps working for
users' action modules (the registry itself is ``app.actions``)."""

from __future__ import annotations

from app.actions import ActionContext, Park, StepError, action, get, load, names
from workers.actions import builtin, waiting  # noqa: F401  (register on import)

__all__ = ["ActionContext", "Park", "StepError", "action", "get", "load", "names"]
