"""The action registry: what a step's ``action`` names, and what an action may return or raise.

Built-in actions live in ``workers.actions`` (the composition root imports them); users' Python
actions register from the modules named in ``BATON_ACTION_MODULES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.config import Config

ActionFunc = Callable[["ActionContext", Any], Any]
_PURE: set[str] = set()
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
class Park:
    """Returned by an action whose step waits in the database, holding no worker thread.

    ``until``: when the step is due again (a delay; an approval's timeout), or None.
    ``suspend``: the run is suspended until an operator answers (an approval).
    """

    until: datetime | None
    suspend: bool = False

    def __post_init__(self) -> None:
        if self.until is None and not self.suspend:
            # A step waiting for nothing would have no owner (nobody would ever bring it back).
            raise ValueError("Park needs `until` (when the step is due) or `suspend=True`")


@dataclass(frozen=True)
class ActionContext:
    """What an action may know about the step it runs for."""

    run_id: str
    step_id: str
    attempt: int
    timeout_s: float
    started_at: datetime | None = None
    config: Config | None = None  # the process's settings (outbound policy, limits)
    # A ``forEach`` step's item (its position in the list); ``attempt`` is then the item's attempt.
    item_index: int | None = None


def action(name: str, *, pure: bool = False) -> Callable[[ActionFunc], ActionFunc]:
    """Register ``func(ctx, input) -> JSON | Park`` as the action ``name``.

    ``pure``: the action has no effect outside Baton (it computes its output from its input, like
    ``transform``). A worker may then run it inside the transaction that claims its step and commit
    the claim together with the result: one commit fewer per message, and a crash in between leaves
    the step queued, as if it never ran (there is nothing to undo).
    """

    def register(func: ActionFunc) -> ActionFunc:
        _REGISTRY[name] = func
        if pure:
            _PURE.add(name)
        else:
            _PURE.discard(name)
        return func

    return register


def get(name: str) -> ActionFunc | None:
    return _REGISTRY.get(name)


def is_pure(name: str) -> bool:
    return name in _PURE


def names() -> list[str]:
    return sorted(_REGISTRY)


def load(modules: Iterable[str] = ()) -> None:
    """Import the modules named in ``BATON_ACTION_MODULES`` (they register on import)."""
    for module in modules:
        importlib.import_module(module)
