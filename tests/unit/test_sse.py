"""The SSE text of run events, event ids, payload shapes and the run-state tracking (no I/O)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from api.events import HEARTBEAT, RunState, parse_event_id, sse_comment, sse_event
from app import events
from app.errors import ValidationError
from models.states import StepStatus


def test_an_event_is_id_event_data_and_a_blank_line() -> None:
    text = sse_event("1700000000000-0", "run", '{"runId":"run_x","status":"running"}')
    assert text == 'id: 1700000000000-0\nevent: run\ndata: {"runId":"run_x","status":"running"}\n\n'


def test_a_multi_line_payload_is_several_data_lines() -> None:
    assert sse_event("1-2", "step", "a\nb") == "id: 1-2\nevent: step\ndata: a\ndata: b\n\n"


def test_comments_and_the_heartbeat_are_colon_lines() -> None:
    assert sse_comment("connected") == ": connected\n\n"
    assert HEARTBEAT == ": heartbeat\n\n"


def test_payload_json_is_one_line_even_with_newlines_in_values() -> None:
    data = events.step_data("run_x", "a", StepStatus.ERROR, 1, error={"code": "E", "message": "two\nlines"})
    text = events.encode(data)
    assert "\n" not in text
    assert sse_event("5-0", "step", text).count("data: ") == 1


@pytest.mark.parametrize(
    "value,expected", [(None, None), ("", None), ("0-1", (0, 1)), ("1700000000000-12", (1700000000000, 12))]
)
def test_event_ids_parse_to_comparable_pairs(value: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_event_id(value) == expected


@pytest.mark.parametrize("value", ["x", "1", "1-", "-1", "1-2-3", "1-2\n", " 1-2", "1" * 21 + "-0"])
def test_anything_else_is_a_validation_error(value: str) -> None:
    with pytest.raises(ValidationError) as raised:
        parse_event_id(value)
    assert raised.value.details == {"Last-Event-ID": ["An event id as sent in `id:` (digits-digits)"]}


def test_step_payloads_have_the_contract_fields_and_timestamps() -> None:
    started = datetime(2024, 1, 15, 10, 30, tzinfo=timezone.utc)
    done = datetime(2024, 1, 15, 10, 30, 1, 250_000, tzinfo=timezone.utc)
    data = events.step_data("run_x", "a", StepStatus.SUCCESS, 2, started, done, 1250, None)
    assert data == {
        "runId": "run_x",
        "stepId": "a",
        "status": "success",
        "attempt": 2,
        "startedAt": "2024-01-15T10:30:00.000Z",
        "completedAt": "2024-01-15T10:30:01.250Z",
        "durationMs": 1250,
        "error": None,
    }


def test_a_step_queued_for_a_retry_shows_the_attempt_it_made() -> None:
    # The row's attempt already names the next attempt; GET /runs/:id shows the one made, and so do events.
    assert events.step_data("run_x", "a", StepStatus.QUEUED, 3)["attempt"] == 2
    assert events.step_data("run_x", "a", StepStatus.QUEUED, 1)["attempt"] == 1


def test_run_state_is_done_when_final_and_no_step_executes() -> None:
    state = RunState()
    state.see("run", {"status": "running"})
    state.see("step", {"stepId": "a", "status": "running"})
    state.see("run", {"status": "cancelled"})
    assert state.final and not state.done  # step a still executes: its result is still to come
    state.see("step", {"stepId": "a", "status": "success"})
    assert state.done


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled", "timeout"])
def test_every_terminal_run_status_is_final(status: str) -> None:
    assert events.is_final("run", {"status": status})
    assert not events.is_final("step", {"status": status})


@pytest.mark.parametrize("status", ["pending", "running", "suspended"])
def test_live_run_statuses_are_not_final(status: str) -> None:
    assert not events.is_final("run", {"status": status})
