"""Step actions: built-ins plus Python actions registered with ``@action``.

This package imports no broker, so the API can validate action names against it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

ActionFunc = Callable[["ActionContext", Any], Any]
_REGISTRY: dict[str, ActionFunc] = {}


class StepError(Exception):
    """Raised by an action: a code, a message, whether a retry may help, and an optional delay."""

    def __init__(
        self, code: str, message: str, *, retriable: bool = False, retry_after_ms: int | None = None
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retriable = retriable
        self.retry_after_ms = retry_after_ms

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class ActionContext:
    """What an action may know about the step it runs for."""

    run_id: str
    step_id: str
    attempt: int
    timeout_s: float


def action(name: str) -> Callable[[ActionFunc], ActionFunc]:
    """Register ``func(ctx, input) -> JSON`` as the action ``name``."""

    def register(func: ActionFunc) -> ActionFunc:
        _REGISTRY[name] = func
        return func

    return register


def get(name: str) -> ActionFunc | None:
    return _REGISTRY.get(name)


def names() -> list[str]:
    return sorted(_REGISTRY)


def load(modules: Iterable[str] = ()) -> None:
    """Import the built-ins and the modules named in ``BATON_ACTION_MODULES``."""
    from workers.actions import builtin  # noqa: F401  (registers on import)

    for module in modules:
        importlib.import_module(module)


load()
