"""UTC time at millisecond precision, rendered the way the spec shows it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone


def utcnow() -> datetime:
    """Now in UTC, truncated to milliseconds so stored and rendered times agree."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def as_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def iso(value: datetime | None) -> str | None:
    """Render as ``2024-01-15T10:30:00.000Z``."""
    if value is None:
        return None
    if value.tzinfo is not timezone.utc:
        value = as_utc(value)
    # isoformat ends "+00:00" for UTC; 4x cheaper than strftime (it is on the worker's hot path).
    return value.isoformat(timespec="milliseconds")[:-6] + "Z"


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def epoch_ms(value: datetime) -> int:
    return (as_utc(value) - _EPOCH) // timedelta(milliseconds=1)


def from_epoch_ms(ms: int) -> datetime:
    seconds, millis = divmod(ms, 1000)
    return datetime.fromtimestamp(seconds, timezone.utc).replace(microsecond=millis * 1000)


def duration_ms(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return int(round((as_utc(end) - as_utc(start)).total_seconds() * 1000))
