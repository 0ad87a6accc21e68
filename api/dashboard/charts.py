"""Server-rendered SVG charts for the overview (no script, no external asset)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from markupsafe import Markup, escape

from api.dashboard.timeline import human_ms

# Status colours, shared with the stylesheet (keep the two in step).
COLORS = {
    "completed": "#1f9d55",
    "failed": "#d64545",
    "timeout": "#c2410c",
    "cancelled": "#8a94a6",
    "running": "#2f6fdb",
    "pending": "#b8c2d3",
    "suspended": "#d69e2e",
    "queued": "#8fb3f0",
    "waiting": "#d69e2e",
}
STACK_ORDER = ("completed", "failed", "timeout", "cancelled", "suspended", "running", "pending")


def _svg(width: int, height: int, body: list[str], label: str) -> Markup:
    head = (
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}" '
        f'preserveAspectRatio="xMidYMid meet">'
    )
    return Markup(head + "".join(body) + "</svg>")


def _empty(x: float, y: float, text: str) -> str:
    return f'<text class="empty" x="{x}" y="{y}" text-anchor="middle">{escape(text)}</text>'


def _nice_max(value: float) -> int:
    """The smallest 1, 2 or 5 × 10^n at or above ``value`` (the axis top)."""
    magnitude = 1
    while True:
        for factor in (1, 2, 5):
            if factor * magnitude >= value:
                return factor * magnitude
        magnitude *= 10


def _tick_label(moment: datetime, bucket: timedelta) -> str:
    return moment.strftime("%H:%M") if bucket < timedelta(hours=6) else moment.strftime("%d %b %H:%M")


def _grid(left: int, width: int, top: int, plot_h: float, label: Callable[[float], str]) -> list[str]:
    """Horizontal grid lines at 0, 50 and 100 % of the plot's height, each labelled on the axis."""
    body = []
    for frac in (0, 0.5, 1):
        y = top + plot_h - frac * plot_h
        body.append(f'<line class="grid" x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}"/>')
        body.append(
            f'<text class="axis" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{label(frac)}</text>'
        )
    return body


def status_bars(buckets: list[datetime], bucket: timedelta, per_status: dict[str, list[int]]) -> Markup:
    """Runs created per time bucket, stacked by status."""
    width, height, left, bottom, top = 720, 220, 40, 28, 10
    plot_w, plot_h = width - left - 10, height - bottom - top
    totals = [sum(per_status.get(s, [0] * len(buckets))[i] for s in per_status) for i in range(len(buckets))]
    y_max = _nice_max(max(totals, default=0) or 1)
    slot = plot_w / max(len(buckets), 1)
    body = _grid(left, width, top, plot_h, lambda frac: str(int(y_max * frac)))
    for i, moment in enumerate(buckets):
        x = left + i * slot + slot * 0.12
        y = top + plot_h
        for status in STACK_ORDER:
            count = per_status.get(status, [0] * len(buckets))[i]
            if not count:
                continue
            h = count / y_max * plot_h
            y -= h
            title = f"{_tick_label(moment, bucket)}: {count} {status}"
            body.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.76:.1f}" height="{h:.1f}" '
                f'fill="{COLORS[status]}"><title>{escape(title)}</title></rect>'
            )
        if i % max(len(buckets) // 6, 1) == 0:
            label = escape(_tick_label(moment, bucket))
            body.append(f'<text class="axis" x="{x:.1f}" y="{height - 8}">{label}</text>')
    return _svg(width, height, body, "Runs per status over time")


def failure_line(buckets: list[datetime], bucket: timedelta, rates: list[float | None]) -> Markup:
    """Failure rate per bucket (failed or timed out over finished), 0–100 %."""
    width, height, left, bottom, top = 720, 160, 40, 28, 10
    plot_w, plot_h = width - left - 10, height - bottom - top
    slot = plot_w / max(len(buckets), 1)
    body = _grid(left, width, top, plot_h, lambda frac: f"{int(frac * 100)}%")
    points = []
    for i, rate in enumerate(rates):
        if rate is None:
            continue
        x, y = left + (i + 0.5) * slot, top + plot_h - rate * plot_h
        points.append(f"{x:.1f},{y:.1f}")
        title = f"{_tick_label(buckets[i], bucket)}: {rate * 100:.0f}% failed"
        body.append(
            f'<circle class="dot" cx="{x:.1f}" cy="{y:.1f}" r="3.5"><title>{escape(title)}</title></circle>'
        )
    if len(points) > 1:
        body.insert(0, f'<polyline class="line" points="{" ".join(points)}"/>')
    for i, moment in enumerate(buckets):
        if i % max(len(buckets) // 6, 1) == 0:
            x = left + i * slot + slot * 0.12
            label = escape(_tick_label(moment, bucket))
            body.append(f'<text class="axis" x="{x:.1f}" y="{height - 8}">{label}</text>')
    if not points:
        body.append(_empty(width / 2, height / 2, "No finished runs"))
    return _svg(width, height, body, "Failure rate over time")


def duration_bars(durations: list[tuple[str, float, float, int]], names: dict[str, str]) -> Markup:
    """Per workflow: the median duration as a bar, the 95th percentile as its lighter extension."""
    row_h, left, width = 30, 180, 720
    height = max(len(durations), 1) * row_h + 30
    x_max = max((p95 for _, _, p95, _ in durations), default=1.0) or 1.0
    plot_w = width - left - 90
    body = []
    for i, (workflow_id, p50, p95, count) in enumerate(durations):
        y = 8 + i * row_h
        shown = names.get(workflow_id) or workflow_id
        name = escape(shown if len(shown) <= 24 else shown[:23] + "…")
        body.append(f'<text class="label" x="{left - 8}" y="{y + 15}" text-anchor="end">{name}</text>')
        w95, w50 = p95 / x_max * plot_w, p50 / x_max * plot_w
        title = escape(f"{workflow_id}: p50 {human_ms(p50)}, p95 {human_ms(p95)} over {count} runs")
        for css, w in (("p95", w95), ("p50", w50)):
            body.append(
                f'<rect class="{css}" x="{left}" y="{y + 3}" width="{max(w, 2):.1f}" height="16" rx="3">'
                f"<title>{title}</title></rect>"
            )
        text = escape(f"{human_ms(p50)} · {human_ms(p95)}")
        body.append(f'<text class="value" x="{left + max(w95, 2) + 6:.1f}" y="{y + 15}">{text}</text>')
    if not durations:
        body.append(_empty(width / 2, 24, "No completed runs"))
    legend_y = height - 8
    body.append(f'<rect class="p50" x="{left}" y="{legend_y - 9}" width="10" height="10"/>')
    body.append(f'<text class="axis" x="{left + 14}" y="{legend_y}">p50</text>')
    body.append(f'<rect class="p95" x="{left + 50}" y="{legend_y - 9}" width="10" height="10"/>')
    body.append(f'<text class="axis" x="{left + 64}" y="{legend_y}">p95</text>')
    return _svg(width, height, body, "Run duration p50 and p95 per workflow")


def queue_bar(step_states: dict[str, int]) -> Markup:
    """The company's steps right now: queued, running and parked (waiting), as one stacked bar."""
    width, height = 720, 58
    total = sum(step_states.values())
    body = [f'<rect class="track" x="0" y="6" width="{width}" height="22" rx="4"/>']
    x = 0.0
    for status in ("queued", "running", "waiting"):
        count = step_states.get(status, 0)
        if not count:
            continue
        w = count / total * width
        body.append(
            f'<rect x="{x:.1f}" y="6" width="{w:.1f}" height="22" fill="{COLORS[status]}">'
            f"<title>{count} {status}</title></rect>"
        )
        x += w
    legend_x = 0
    for status in ("queued", "running", "waiting"):
        body.append(f'<rect x="{legend_x}" y="40" width="10" height="10" fill="{COLORS[status]}"/>')
        body.append(
            f'<text class="axis" x="{legend_x + 14}" y="49">{status} {step_states.get(status, 0)}</text>'
        )
        legend_x += 140
    return _svg(width, height, body, "Steps queued, running and waiting")
