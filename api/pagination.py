"""The spec's cursor: base64 of ``{"ts": <createdAt epoch ms>, "id": "<id>"}``; keyset, newest first."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from sqlalchemy import Select, tuple_

from app.errors import ValidationError
from app.timeutil import epoch_ms, from_epoch_ms

_ID = re.compile(r"^[a-z]{1,8}_[0-9A-Za-z_-]{1,80}$")
# A real cursor is under 200 characters; the query schemas allow 500, and so does the decoder, so
# nothing longer is ever parsed (a long one could nest deep enough to exhaust the stack).
MAX_CURSOR_CHARS = 500


def encode_cursor(created_at: Any, row_id: str) -> str:
    raw = json.dumps({"ts": epoch_ms(created_at), "id": row_id}, separators=(",", ":"))
    return base64.b64encode(raw.encode()).decode()


def decode_cursor(cursor: str) -> tuple[int, str]:
    """``(ts, id)`` of a cursor made by :func:`encode_cursor`; anything else is a VALIDATION_ERROR."""
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError("too long")
        standard = cursor.translate(str.maketrans("-_", "+/"))  # accept the URL-safe alphabet too
        data = json.loads(base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True))
        ts, row_id = data["ts"], data["id"]
        if (
            not isinstance(ts, int)
            or isinstance(ts, bool)
            or not isinstance(row_id, str)
            or not _ID.match(row_id)
        ):
            raise ValueError("bad types")
        from_epoch_ms(ts)  # range check
        return ts, row_id
    except (
        binascii.Error,
        ValueError,
        KeyError,
        TypeError,
        OverflowError,
        OSError,
        UnicodeDecodeError,
        RecursionError,  # nesting within the length cap, on an already deep stack
    ) as exc:
        raise ValidationError("Invalid cursor", details={"cursor": ["Malformed cursor"]}) from exc


def page(query: Select, created_col: Any, id_col: Any, cursor: str | None, limit: int) -> Select:
    """Restrict ``query`` to rows after ``cursor`` in (created_at DESC, id DESC) order, ``limit + 1`` rows."""
    if cursor:
        ts, row_id = decode_cursor(cursor)
        created = from_epoch_ms(ts)
        # A row-value comparison lets PostgreSQL seek straight into the index at any depth.
        query = query.where(tuple_(created_col, id_col) < tuple_(created, row_id))
    return query.order_by(created_col.desc(), id_col.desc()).limit(limit + 1)


def meta(rows: list[Any], limit: int) -> tuple[list[Any], dict[str, Any]]:
    has_more = len(rows) > limit
    rows = rows[:limit]
    cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if has_more and rows else None
    return rows, {"cursor": cursor, "hasMore": has_more}
