"""How the CLI shows the API's answers to people: aligned tables, human times and durations."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click
from tabulate import tabulate

from app.timeutil import as_utc, utcnow


def parse_time(value: str | None) -> datetime | None:
    """An API timestamp (``2024-01-15T10:30:00.000Z``) as an aware UTC datetime."""
    if not value:
        return None
    try:
        return as_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        return None


def ago(value: str | None, now: datetime | None = None) -> str:
    """``42s ago``, ``5m ago``, ``3h ago``; older than a week, the UTC date and time."""
    when = parse_time(value)
    if when is None:
        return "-"
    seconds = int(((now or utcnow()) - when).total_seconds())
    if seconds < 0 or seconds >= 7 * 86_400:
        return clock(value, with_date=True)
    for size, unit in ((86_400, "d"), (3_600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def clock(value: str | None, *, with_date: bool = False) -> str:
    """The UTC time of a timestamp, ``10:30:00`` (with the date: ``2024-01-15 10:30 UTC``)."""
    when = parse_time(value)
    if when is None:
        return "-"
    return when.strftime("%Y-%m-%d %H:%M UTC") if with_date else when.strftime("%H:%M:%S")


def duration(ms: int | None) -> str:
    """``850 ms``, ``1.2 s``, ``3m 20s``, ``2h 05m``."""
    if ms is None:
        return "-"
    if ms < 1_000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    seconds = ms // 1000
    if seconds < 3_600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def error_text(error: dict[str, Any] | None, width: int = 60) -> str:
    """``CODE: message`` on one line, cut to ``width``."""
    if not error:
        return ""
    text = f"{error.get('code', '')}: {error.get('message', '')}".replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def table(headers: Sequence[str], rows: list[Sequence[Any]]) -> str:
    """Aligned columns under a header; ``(none)`` for an empty list."""
    if not rows:
        return "(none)"
    return tabulate(rows, headers=list(headers), tablefmt="plain", disable_numparse=True)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def echo_envelope(envelope: dict[str, Any]) -> None:
    """What ``--json`` prints: the API's envelope as it answered (one JSON document)."""
    click.echo(json.dumps(envelope, ensure_ascii=False, separators=(",", ":")))


def fields(pairs: list[tuple[str, Any]]) -> str:
    """``key: value`` lines with the values aligned, leaving out empty ones."""
    shown = [(k, v) for k, v in pairs if v not in (None, "", "-")]
    width = max((len(k) for k, _v in shown), default=0) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}" for k, v in shown)
