"""The run detail's waterfall: one row per step, one bar per attempt, placed on the run's time axis."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.engine.states import attempt_made
from app.timeutil import as_utc, utcnow

# Statuses whose attempt is still going: their bar runs up to "now".
OPEN = ("running", "waiting")


@dataclass
class Bar:
    attempt: int
    status: str
    left: float  # percent of the axis
    width: float
    label: str
    title: str

    @property
    def narrow(self) -> bool:
        """Too thin for its label inside: the label goes beside it."""
        return self.width < 12

    @property
    def flip(self) -> bool:
        """Near the right edge: a label beside the bar goes on its left."""
        return self.left + self.width > 80


@dataclass
class Row:
    step_id: str
    action: str
    status: str
    attempts: int
    reused: bool
    bars: list[Bar] = field(default_factory=list)


@dataclass
class Timeline:
    rows: list[Row]
    span_ms: int
    ticks: list[tuple[float, str]]


def human_ms(ms: float | None) -> str:
    """A duration as a person reads it: 840 ms, 3.2 s, 4 min 10 s, 2 h 5 min."""
    if ms is None:
        return "–"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _ms(start: datetime, end: datetime) -> float:
    return (as_utc(end) - as_utc(start)).total_seconds() * 1000


def _spans(step_rows: list[Any], attempts: list[Any], now: datetime) -> dict[str, list[tuple[Any, datetime]]]:
    """Per step: its attempts as (row, end), the attempt in progress ending now."""
    spans: dict[str, list[tuple[Any, datetime]]] = {}
    for a in attempts:
        # A forEach item's attempts are in the logs; the waterfall draws the step's own attempt.
        if a.started_at is not None and getattr(a, "item_index", None) is None:
            spans.setdefault(a.step_id, []).append((a, a.completed_at or a.started_at))
    for r in step_rows:
        if str(r.status) in OPEN and r.started_at is not None and not r.reused:
            spans.setdefault(r.step_id, []).append((r, now))
    return spans


def build(run: Any, step_rows: list[Any], attempts: list[Any], steps: list[dict[str, Any]]) -> Timeline:
    """Lay out every step of the definition (in its order) on the run's own time axis."""
    now = utcnow()
    spans = _spans(step_rows, attempts, now)
    own = [(row, end) for sid, items in spans.items() for row, end in items if not _reused(step_rows, sid)]
    origin = run.started_at or run.created_at
    starts = [as_utc(row.started_at) for row, _ in own] + [as_utc(origin)]
    origin = min(starts)
    finish = max([as_utc(end) for _, end in own] + [as_utc(run.completed_at or (now if own else origin))])
    span = max(_ms(origin, finish), 1.0)
    by_id = {r.step_id: r for r in step_rows}
    rows = []
    for step in steps:
        current = by_id.get(step["id"])
        row = Row(
            step_id=step["id"],
            action=step.get("action", ""),
            status=str(current.status) if current is not None else "pending",
            attempts=attempt_made(current.status, current.attempt) if current is not None else 0,
            reused=bool(current is not None and current.reused),
        )
        if not row.reused:
            for item, end in spans.get(step["id"], []):
                row.bars.append(_bar(item, end, origin, span))
        rows.append(row)
    ticks = [(pct, "0" if pct == 0 else "+" + human_ms(span * pct / 100)) for pct in (0, 25, 50, 75, 100)]
    return Timeline(rows, int(span), ticks)


def _reused(step_rows: list[Any], step_id: str) -> bool:
    return any(r.step_id == step_id and r.reused for r in step_rows)


def _bar(item: Any, end: datetime, origin: datetime, span: float) -> Bar:
    status = str(item.status)
    duration = _ms(item.started_at, end)
    left = _ms(origin, item.started_at) / span * 100
    width = max(duration / span * 100, 0.6)
    left = min(left, 100 - width)
    error = item.error or {}
    title = f"attempt {item.attempt}: {status}, {human_ms(duration)}"
    if error:
        title += f" — {error.get('code', '')}: {error.get('message', '')}"
    return Bar(
        item.attempt, status, round(left, 3), round(width, 3), f"#{item.attempt} {human_ms(duration)}", title
    )
