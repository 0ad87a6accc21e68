"""Two runs of one workflow compared step by step: status, duration, and which JSON paths of each
step's input, output and error differ (``GET /runs/:id/diff?against=``).

Paths start at ``input``, ``output`` or ``error`` and go down with ``.key`` for keys that are
identifiers (``[A-Za-z_][A-Za-z0-9_]*``), ``["key"]`` (a JSON string) for any other key, and
``[n]`` for list items: ``output.body.items[2].id``, ``input.headers["Content-Type"]``. A change is
reported at the deepest path where the two differ: a key present in one and not the other, items
past the end of the shorter list, or values of different JSON types (an object against a number)
are one change at that path. A key absent on one side shows as null there; a missing key and a
null are not told apart. Numbers compare by value (``1`` equals ``1.0``); ``true`` is not ``1``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from app import engine
from app.errors import NotFound, ValidationError
from app.ids import RUN_ID
from models import StepRun

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_CHANGES = 200  # per step; past it the step says changesTruncated
COMPARED = ("input", "output", "error")


def json_path(parts: tuple[str | int, ...]) -> str:
    """``("output", "body", "items", 2)`` → ``output.body.items[2]``."""
    head, *rest = parts
    path = str(head)
    for part in rest:
        if isinstance(part, int):
            path += f"[{part}]"
        elif IDENTIFIER.fullmatch(part):
            path += f".{part}"
        else:
            path += f"[{json.dumps(part, ensure_ascii=False)}]"
    return path


def _leaf_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


@dataclass
class Changes:
    """The changed paths of one step, up to ``limit``."""

    limit: int = MAX_CHANGES
    items: list[dict[str, Any]] = field(default_factory=list)
    truncated: bool = False

    def add(self, parts: tuple[str | int, ...], before: Any, after: Any) -> bool:
        """Note one change; False once the limit is reached (the walk stops)."""
        if len(self.items) >= self.limit:
            self.truncated = True
            return False
        self.items.append({"path": json_path(parts), "before": before, "after": after})
        return True


def compare(root: str, before: Any, after: Any, changes: Changes) -> None:
    """Walk both values side by side (iteratively: a deep document cannot exhaust the stack)."""
    stack: list[tuple[tuple[str | int, ...], Any, Any]] = [((root,), before, after)]
    while stack:
        parts, b, a = stack.pop()
        if isinstance(b, dict) and isinstance(a, dict):
            keys = list(b) + [k for k in a if k not in b]
            stack.extend(((*parts, k), b.get(k), a.get(k)) for k in reversed(keys))
        elif isinstance(b, list) and isinstance(a, list):
            n = max(len(b), len(a))
            stack.extend(
                ((*parts, i), b[i] if i < len(b) else None, a[i] if i < len(a) else None)
                for i in reversed(range(n))
            )
        elif not _leaf_equal(b, a) and not changes.add(parts, b, a):
            return


def step_diff(step_id: str, this: StepRun | None, against: StepRun | None) -> dict[str, Any]:
    """One step's entry: ``[this run, against run]`` pairs; ``before`` is the against run's value."""
    changes = Changes()
    for name in COMPARED:
        compare(
            name,
            getattr(against, name) if against is not None else None,
            getattr(this, name) if this is not None else None,
            changes,
        )
    entry: dict[str, Any] = {
        "stepId": step_id,
        "status": [str(r.status) if r is not None else None for r in (this, against)],
        "durationMs": [r.duration_ms if r is not None else None for r in (this, against)],
        "changes": changes.items,
    }
    if changes.truncated:
        entry["changesTruncated"] = True  # only when it is, so the usual entry keeps its exact shape
    return entry


def diff_runs(session: Session, company_id: str, run_id: str, against_id: str) -> dict[str, Any]:
    """``run_id`` compared with ``against_id``, steps in the first run's order (steps only the
    other run has, from another workflow version, after them); 404 for an unknown or another
    company's run, 400 when the two runs are not of one workflow."""
    if not RUN_ID.match(run_id) or not RUN_ID.match(against_id):
        raise NotFound("Run not found")
    this = engine.get_run(session, company_id, run_id)
    other = engine.get_run(session, company_id, against_id)
    if this.workflow_key != other.workflow_key:
        raise ValidationError(
            f"Runs belong to different workflows ({this.workflow_id} and {other.workflow_id}); "
            "compare two runs of one workflow",
            details={"against": ["Not a run of the same workflow."]},
        )
    mine = {row.step_id: row for row in engine.step_runs(session, this.id)}
    theirs = {row.step_id: row for row in engine.step_runs(session, other.id)}
    order = list(mine) + [step_id for step_id in theirs if step_id not in mine]
    return {
        "runId": this.id,
        "againstRunId": other.id,
        "steps": [step_diff(step_id, mine.get(step_id), theirs.get(step_id)) for step_id in order],
    }
