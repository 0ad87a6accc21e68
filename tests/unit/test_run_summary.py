"""The runs list builds its entries by hand: they must equal what RunSummarySchema dumps."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from api.runs import run_summary
from api.schemas.runs import RunSummarySchema
from models import RunStatus

NOW = datetime(2026, 1, 15, 10, 30, 0, 123000, tzinfo=timezone.utc)


def row(**overrides: Any) -> SimpleNamespace:
    values = {
        "id": "run_1",
        "workflow_id": "wf_a",
        "status": RunStatus.COMPLETED,
        "trigger_type": "api",
        "started_at": NOW,
        "completed_at": NOW,
        "duration_ms": 12,
        "error": None,
        "created_at": NOW,
    }
    return SimpleNamespace(**(values | overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"status": RunStatus.PENDING, "started_at": None, "completed_at": None, "duration_ms": None},
        {"status": RunStatus.FAILED, "error": {"code": "STEP_ERROR", "message": "boom"}},
        {"status": RunStatus.FAILED, "error": {"code": "STEP_ERROR", "message": "m", "stepId": "x"}},
        {"status": RunStatus.TIMEOUT, "error": {"code": "RUN_TIMEOUT"}},
        {"status": RunStatus.FAILED, "error": {"code": 5, "message": None}},
        {"trigger_type": "webhook", "created_at": datetime(2026, 1, 15, 12, 30, tzinfo=timezone.utc)},
    ],
)
def test_a_list_entry_is_what_the_schema_dumps(overrides: dict[str, Any]) -> None:
    entry = row(**overrides)
    assert run_summary(entry) == RunSummarySchema().dump(entry)
