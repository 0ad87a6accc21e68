"""Log lines (app/logs.py): the JSON shape, the context fields, redaction, and the config switch."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime

import pytest

from app import logs
from app.config import Config


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    """A logger of its own writing through Baton's filter and formatter into a buffer."""
    logs.clear()
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger("baton.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, buffer, handler
    logger.removeHandler(handler)


def lines(buffer: io.StringIO) -> list[str]:
    return buffer.getvalue().splitlines()


def test_json_line_carries_the_step_context(capture):
    logger, buffer, handler = capture
    handler.setFormatter(logs.formatter("json"))
    with logs.context(run_id="run_1", step_id="fetch", attempt=2, company_id="co_1"):
        logger.info("step %s done", "fetch")
    logger.warning("outside any step")
    inside, outside = (json.loads(line) for line in lines(buffer))
    assert list(inside) == ["ts", "level", "logger", "message", "run_id", "step_id", "attempt", "company_id"]
    assert inside["level"] == "INFO" and inside["logger"] == "baton.test-logs"
    assert inside["message"] == "step fetch done"
    assert (inside["run_id"], inside["step_id"], inside["attempt"], inside["company_id"]) == (
        "run_1",
        "fetch",
        2,
        "co_1",
    )
    assert datetime.strptime(inside["ts"], "%Y-%m-%dT%H:%M:%S.%fZ") and len(inside["ts"]) == 24
    assert set(outside) == {"ts", "level", "logger", "message"}  # nothing known, nothing shown


def test_secrets_and_url_credentials_never_reach_a_line(capture):
    logger, buffer, handler = capture
    handler.setFormatter(logs.formatter("json"))
    token = logs.redact_in_context(["sk-live-123"])
    try:
        try:
            raise RuntimeError("refused sk-live-123")
        except RuntimeError:
            logger.exception("calling https://api.example/x?token=abc failed")
    finally:
        logs.reset(token)
    entry = json.loads(lines(buffer)[0])
    assert "sk-live-123" not in buffer.getvalue() and "token=abc" not in buffer.getvalue()
    assert "RuntimeError: refused [REDACTED]" in entry["exc_info"]
    assert entry["message"] == "calling https://api.example/x?token=[REDACTED] failed"


def test_text_lines_append_the_context(capture):
    logger, buffer, handler = capture
    handler.setFormatter(logs.formatter("text"))
    with logs.context(run_id="run_9", attempt=1):
        logger.error("boom")
    (line,) = lines(buffer)
    assert line.endswith(f"baton.test-logs[{os.getpid()}]: boom [run_id=run_9 attempt=1]")


def test_explicit_extra_wins_and_bind_resets(capture):
    logger, buffer, handler = capture
    handler.setFormatter(logs.formatter("json"))
    token = logs.bind(run_id="run_a")
    logger.info("x", extra={"run_id": "run_b"})
    logs.reset(token)
    assert json.loads(lines(buffer)[0])["run_id"] == "run_b"
    assert logs.current() == {}


def test_log_format_is_json_or_text():
    assert Config.from_env({}).log_format == "text"
    assert Config.from_env({"BATON_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ValueError, match="BATON_LOG_FORMAT"):
        Config.from_env({"BATON_LOG_FORMAT": "yaml"})
    assert Config.from_env({"BATON_METRICS_TOKEN": "t"}).metrics_token == "t"
