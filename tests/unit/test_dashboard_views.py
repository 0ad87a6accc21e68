"""Dashboard pieces without a database: the waterfall's layout, durations, chart scales."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from api.dashboard import charts, timeline
from api.dashboard.queries import Overview

T0 = datetime(2024, 1, 15, 10, 30, tzinfo=timezone.utc)


def _at(ms: int) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def _attempt(step_id: str, attempt: int, status: str, start: int, end: int) -> SimpleNamespace:
    return SimpleNamespace(
        step_id=step_id,
        attempt=attempt,
        status=status,
        started_at=_at(start),
        completed_at=_at(end),
        error=None,
    )


def _row(step_id: str, status: str, attempt: int, reused: bool = False) -> SimpleNamespace:
    return SimpleNamespace(step_id=step_id, status=status, attempt=attempt, reused=reused, started_at=None)


def test_each_attempt_is_a_bar_placed_by_its_start_and_duration() -> None:
    run = SimpleNamespace(started_at=_at(0), created_at=_at(0), completed_at=_at(1000))
    attempts = [
        _attempt("a", 1, "success", 0, 100),
        _attempt("b", 1, "error", 100, 200),
        _attempt("b", 2, "error", 700, 1000),
    ]
    rows = [_row("a", "success", 1), _row("b", "error", 2), _row("c", "skipped", 0)]
    steps = [
        {"id": "a", "action": "transform"},
        {"id": "b", "action": "fail"},
        {"id": "c", "action": "transform"},
    ]
    laid = timeline.build(run, rows, attempts, steps)
    assert [r.step_id for r in laid.rows] == ["a", "b", "c"]
    a, b, c = laid.rows
    assert [(bar.left, bar.width) for bar in a.bars] == [(0.0, 10.0)]
    assert [(bar.attempt, bar.left, bar.width, bar.status) for bar in b.bars] == [
        (1, 10.0, 10.0, "error"),
        (2, 70.0, 30.0, "error"),
    ]
    assert b.attempts == 2 and c.bars == [] and c.status == "skipped"
    assert laid.span_ms == 1000 and laid.ticks[-1] == (100, "+1.0 s")


def test_reused_steps_draw_no_bar_on_the_new_runs_axis() -> None:
    run = SimpleNamespace(started_at=_at(5000), created_at=_at(5000), completed_at=_at(6000))
    rows = [_row("a", "success", 1, reused=True), _row("b", "success", 1)]
    attempts = [_attempt("a", 1, "success", 0, 100), _attempt("b", 1, "success", 5000, 6000)]
    laid = timeline.build(run, rows, attempts, [{"id": "a"}, {"id": "b"}])
    assert laid.rows[0].reused and laid.rows[0].bars == []
    assert [(bar.left, bar.width) for bar in laid.rows[1].bars] == [(0.0, 100.0)]


def test_a_fan_out_step_draws_its_own_attempt_not_each_item() -> None:
    run = SimpleNamespace(started_at=_at(0), created_at=_at(0), completed_at=_at(1000))
    items = [
        SimpleNamespace(**vars(_attempt("fan", 1, "success", i * 10, i * 10 + 5)), item_index=i)
        for i in range(3)
    ]
    attempts = [*items, _attempt("fan", 1, "success", 0, 1000)]
    laid = timeline.build(
        run, [_row("fan", "success", 1)], attempts, [{"id": "fan", "action": "http.request"}]
    )
    assert [(bar.left, bar.width) for bar in laid.rows[0].bars] == [(0.0, 100.0)]


def test_durations_read_as_people_write_them() -> None:
    assert [timeline.human_ms(v) for v in (None, 5, 999, 1500, 61_000, 3_723_000)] == [
        "–",
        "5 ms",
        "999 ms",
        "1.5 s",
        "1 min 1 s",
        "1 h 2 min",
    ]


def test_axis_tops_are_round_numbers() -> None:
    assert [charts._nice_max(v) for v in (0.5, 1, 3, 7, 11, 230, 5000)] == [1, 1, 5, 10, 20, 500, 5000]


def test_failure_rate_counts_failed_and_timed_out_over_finished_runs() -> None:
    figures = Overview(
        since=T0,
        until=_at(3_600_000),
        bucket=timedelta(minutes=20),
        buckets=[T0, _at(1_200_000), _at(2_400_000)],
        per_status={"completed": [3, 0, 1], "failed": [1, 0, 0], "timeout": [0, 0, 1], "running": [0, 2, 0]},
        durations=[],
    )
    assert figures.failure_rates() == [0.25, None, 0.5]
    assert (figures.total, figures.finished, figures.failed) == (8, 6, 2)
    svg = charts.failure_line(figures.buckets, figures.bucket, figures.failure_rates())
    assert svg.count("<circle") == 2 and "25% failed" in svg


def test_charts_escape_what_users_named() -> None:
    svg = charts.duration_bars([("wf_x", 10.0, 20.0, 2)], {"wf_x": "<script>alert(1)</script>"})
    assert "<script>" not in svg and "&lt;script&gt;" in svg
