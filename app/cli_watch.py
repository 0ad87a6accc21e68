"""``baton runs watch``: a run's steps as they happen, from the API's event stream or by polling."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import IO, Any

import click

from app.cli_format import clock, duration, error_text
from app.client import ApiClient, ApiError, ClientError
from models.states import RunStatus, StepStatus

# The statuses a step ends in (a retried step leaves ERROR for a new attempt).
STEP_DONE = frozenset({StepStatus.SUCCESS, StepStatus.ERROR, StepStatus.SKIPPED})
RUN_FINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMEOUT})
# `watch` exits 0 on completed, 1 on failed, 2 on cancelled or timeout (checked from outside).
EXIT_CODES = {RunStatus.COMPLETED: 0, RunStatus.FAILED: 1, RunStatus.CANCELLED: 2, RunStatus.TIMEOUT: 2}
EXIT_GAVE_UP = 2
STREAM_READ_TIMEOUT_S = 45.0  # the API sends a heartbeat every 15 s; three missed means a dead link
STREAM_RETRIES = 3


class GaveUp(Exception):
    """The watch's own ``--timeout`` passed before the run ended."""


@dataclass
class WatchView:
    """One line per step change; on a terminal, a progress bar under the lines."""

    out: IO[str]
    step_ids: list[str]
    tty: bool
    seen: set[tuple[str, str, int]] = field(default_factory=set)
    latest: dict[str, str] = field(default_factory=dict)
    bar_shown: bool = False

    @property
    def total(self) -> int:
        return max(len(self.step_ids), len(self.latest))

    @property
    def done(self) -> int:
        return sum(1 for status in self.latest.values() if status in STEP_DONE)

    def step(self, step: dict[str, Any]) -> None:
        """Show a step's change once, however many times the stream or a poll reports it."""
        step_id, status, attempt = step.get("stepId", "?"), step.get("status", "?"), step.get("attempt") or 1
        if (step_id, status, attempt) in self.seen:
            return
        self.seen.add((step_id, status, attempt))
        self.latest[step_id] = status
        if step_id not in self.step_ids:
            self.step_ids.append(step_id)
        width = max(len(s) for s in self.step_ids)
        when = clock(step.get("completedAt") if status in STEP_DONE else step.get("startedAt"))
        line = f"{when if when != '-' else ' ' * 8}  {step_id.ljust(width)}  {status:<8}  attempt {attempt}"
        if status in STEP_DONE:
            line += f"  {duration(step.get('durationMs'))}"
            if step.get("reused"):
                line += "  (reused)"
            if not self.tty:
                line += f"  [{self.done}/{self.total}]"
        if step.get("error"):
            line += f"  {error_text(step['error'], 100)}"
        self.line(line)

    def line(self, text: str) -> None:
        self._clear_bar()
        click.echo(text, file=self.out)
        if self.tty:
            self.out.write(self._bar())
            self.out.flush()
            self.bar_shown = True

    def _bar(self, width: int = 30) -> str:
        filled = width * self.done // self.total if self.total else 0
        return f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} steps"

    def _clear_bar(self) -> None:
        if self.bar_shown:
            self.out.write("\r\x1b[K")
            self.bar_shown = False

    def close(self) -> None:
        self._clear_bar()
        self.out.flush()


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise GaveUp()
    return left


def follow_events(client: ApiClient, run_id: str, view: WatchView, deadline: float | None) -> bool:
    """Show the run's events until its final one; False when the API has no event stream."""
    last_id: str | None = None
    failures = 0
    while True:
        left = _remaining(deadline)
        read_timeout = min(STREAM_READ_TIMEOUT_S, left) if left is not None else STREAM_READ_TIMEOUT_S
        try:
            events = client.events(f"/api/v1/runs/{run_id}/events", last_id, read_timeout)
            if events is None:
                return False
            for event in events:
                last_id = event.id or last_id
                if _show_event(view, event.event, event.data):
                    return True
                failures = 0
        except ClientError:
            _remaining(deadline)  # a read that timed out at the deadline is the watch's timeout
            failures += 1
            if failures > STREAM_RETRIES:
                raise
        # The stream ended before the run did (a restarted API process): resume after the last event.
        if client.call("GET", f"/api/v1/runs/{run_id}")["data"]["status"] in RUN_FINAL:
            return True
        time.sleep(min(0.2 * 2**failures, 2.0))


def _show_event(view: WatchView, kind: str, raw: str) -> bool:
    """Show one event; True when it is the run's final one."""
    try:
        data = json.loads(raw)
    except ValueError:
        return False
    if kind == "step":
        view.step(data)
    elif kind == "run":
        status = data.get("status")
        if status == RunStatus.SUSPENDED:
            view.line(
                f"run suspended: waiting for approval (baton runs resume {data.get('runId')} --approve)"
            )
        return status in RUN_FINAL
    return False


def poll(client: ApiClient, run_id: str, view: WatchView, deadline: float | None, interval_s: float) -> None:
    """Show the run's step changes by reading it every ``interval_s`` until it ends."""
    suspended_said = False
    while True:
        run = client.call("GET", f"/api/v1/runs/{run_id}")["data"]
        for step in run.get("stepResults") or []:
            view.step(step)
        if run["status"] in RUN_FINAL:
            return
        if run["status"] == RunStatus.SUSPENDED and not suspended_said:
            suspended_said = True
            view.line(f"run suspended: waiting for approval (baton runs resume {run_id} --approve)")
        left = _remaining(deadline)
        time.sleep(min(interval_s, left) if left is not None else interval_s)


def step_ids_of(client: ApiClient, run: dict[str, Any]) -> list[str]:
    """The workflow's step ids, to size the progress bar (the run lists only steps that started)."""
    ids = [s["stepId"] for s in run.get("stepResults") or []]
    try:
        workflow = client.call("GET", f"/api/v1/workflows/{run['workflowId']}")["data"]
    except ApiError:
        return ids  # a deleted workflow: its runs stay readable, its definition does not
    defined = [s.get("id") for s in workflow.get("steps") or [] if isinstance(s, dict)]
    return [*defined, *(i for i in ids if i not in defined)]


def summary(run: dict[str, Any], view: WatchView) -> str:
    """The closing line: the outcome, how long it took, how many steps ended, and the error."""
    took = duration(run.get("durationMs"))
    text = f"run {run['status']}" + (f" in {took}" if took != "-" else "")
    text += f" ({view.done}/{view.total} steps)"
    if run.get("error"):
        text += f": {error_text(run['error'], 200)}"
    return text
