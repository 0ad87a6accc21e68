"""Logging for every Baton process: text lines, or one JSON object per line (``BATON_LOG_FORMAT``),
carrying the run, step, attempt and company in context; secrets are redacted before a line is written.

The context lives in a ``ContextVar``: the executor binds it around each step, the API per request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import datetime, timezone
from typing import Any

from app import redaction
from app.config import Config
from app.timeutil import iso

FIELDS = ("run_id", "step_id", "attempt", "company_id")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
_REDACT = "redact"  # secret values (all their encoded forms) to hide in this context's lines
_EMPTY: dict[str, Any] = {}
_context: ContextVar[dict[str, Any]] = ContextVar("baton_log_context", default=_EMPTY)


def bind(**fields: Any) -> Token[dict[str, Any]]:
    """Add fields to the log context (None leaves a field out); ``reset`` with the token undoes it."""
    current = _context.get()
    return _context.set({**current, **{k: v for k, v in fields.items() if v is not None}})


def redact_in_context(secrets: Sequence[str]) -> Token[dict[str, Any]]:
    """Hide these secret values in every line logged in this context."""
    return bind(**{_REDACT: tuple(secrets)})


def reset(token: Token[dict[str, Any]]) -> None:
    _context.reset(token)


def clear() -> None:
    """Forget the context (a thread that serves one request after another)."""
    _context.set(_EMPTY)


@contextmanager
def context(**fields: Any) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        _context.reset(token)


def current() -> dict[str, Any]:
    """The fields known here (run_id, step_id, attempt, company_id)."""
    found = _context.get()
    return {name: found[name] for name in FIELDS if name in found}


class ContextFilter(logging.Filter):
    """Copies the context onto each record as it is logged (in the logging thread, so a handler
    that formats later, elsewhere, still has it); explicit ``extra={...}`` fields win."""

    def filter(self, record: logging.LogRecord) -> bool:
        found = _context.get()
        for name in FIELDS:
            if name in found and getattr(record, name, None) is None:
                setattr(record, name, found[name])
        if not hasattr(record, "redact"):
            record.redact = found.get(_REDACT, ())
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in FIELDS if getattr(record, name, None) is not None}


def _redact(record: logging.LogRecord, text: str) -> str:
    return redaction.text(text, getattr(record, "redact", ()))


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", run_id?, step_id?, attempt?, company_id?, exc_info?}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": iso(datetime.fromtimestamp(record.created, timezone.utc)),
            "level": record.levelname,
            "logger": record.name,
            "message": _redact(record, record.getMessage()),
            **_fields(record),
        }
        if record.exc_info:
            entry["exc_info"] = _redact(record, self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack_info"] = _redact(record, self.formatStack(record.stack_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, with the context appended as ``key=value`` pairs."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            pairs = " ".join(f"{k}={v}" for k, v in fields.items())
            first, newline, rest = line.partition("\n")
            line = f"{first} [{pairs}]{newline}{rest}"
        return _redact(record, line)


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


class _BatonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a second setup replaces it."""


def setup_logging(config: Config, *, fmt: str | None = None) -> None:
    """The one logging setup of every process (API, worker processes, pool, scheduler): stderr."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _BatonHandler)]:
        root.removeHandler(handler)
    handler = _BatonHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(formatter(fmt or config.log_format))
    root.addHandler(handler)
    root.setLevel(config.log_level)
