"""What the execution functions pass around: a claim on a step, an attempt's outcome, what's next."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from app.actions import Park
from app.engine.graph import graph
from models.states import StepStatus


@dataclass
class Outcome:
    """What executing one attempt produced (``status``: success, error, skipped or waiting)."""

    status: StepStatus
    input: Any = None
    output: Any = None
    error: dict[str, str] | None = None
    retriable: bool = False
    retry_after_ms: int | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    park: Park | None = None  # waiting only


@dataclass
class Claim:
    """A step this worker now owns: enough to render and run it without another query."""

    run_id: str
    company_id: str
    workflow_id: str
    trigger_type: str
    run_input: Any
    definition: dict[str, Any]
    position: int
    attempt: int
    started_at: datetime
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Set when the step was a waiting delay that is now due: it completes without running again.
    resumed_input: Any = None
    waited_since: datetime | None = None
    # When the run started (its duration is counted from it when the run ends).
    run_started_at: datetime | None = None
    # A pure step's claim not committed yet (``hotpath.claim_queued``): its result commits it.
    tx: Any = field(default=None, repr=False, compare=False)
    # The company step slot (``app.slots``) of the message this chain started from, if any.
    slot: str | None = field(default=None, compare=False)

    @classmethod
    def of_run(cls, run: Any, definition: dict[str, Any], position: int, attempt: int, **rest: Any) -> Claim:
        """A claim on the step at ``position`` of ``run`` (a loaded ``models.Run``)."""
        return cls(
            run_id=run.id,
            company_id=run.company_id,
            workflow_id=run.workflow_id,
            trigger_type=run.trigger_type,
            run_input=run.input,
            definition=definition,
            position=position,
            attempt=attempt,
            run_started_at=run.started_at,
            **rest,
        )

    def following(self, started_at: datetime) -> Claim:
        """A claim on the next step, attempt 1, sharing this run's results (chaining)."""
        return replace(
            self,
            position=self.position + 1,
            attempt=1,
            started_at=started_at,
            resumed_input=None,
            waited_since=None,
            tx=None,
        )

    @property
    def step(self) -> dict[str, Any]:
        return self.definition["steps"][self.position]

    @property
    def step_id(self) -> str:
        return self.step["id"]

    @property
    def is_last(self) -> bool:
        return self.position + 1 >= len(self.definition["steps"])

    @property
    def key(self) -> tuple[str, str, int]:
        """(run, step, attempt): what a lease is held on."""
        return (self.run_id, self.step_id, self.attempt)

    def template_context(self) -> dict[str, Any]:
        """What the run's ``output`` mapping sees: every finished step."""
        return self._context(self.results)

    def step_context(self) -> dict[str, Any]:
        """What the step's ``if`` and ``input`` see: the steps it needs, directly or not (in a
        chain, every step before it)."""
        shape = graph(self.definition)
        if shape.linear:
            return self._context(self.results)
        needed = shape.needed_ids(self.position)
        return self._context({k: v for k, v in self.results.items() if k in needed})

    def _context(self, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {
            "input": self.run_input,
            "steps": results,
            "run": {"id": self.run_id, "workflowId": self.workflow_id, "triggerType": self.trigger_type},
            "secrets": {},
        }


@dataclass
class Next:
    """What the worker does after recording a result."""

    claim: Claim | None = None  # run this next step inline, now
    sends: list[tuple[str, str, int, int]] = field(default_factory=list)  # (run, step, attempt, delay_ms)
