"""Property tests of the cursor decoder: any string is a cursor or a VALIDATION_ERROR, nothing else."""

from __future__ import annotations

import base64
import json
import sys
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from api.pagination import MAX_CURSOR_CHARS, decode_cursor, encode_cursor
from app.errors import ValidationError

UTC = timezone.utc
ID = st.from_regex(r"\A[a-z]{1,8}_[0-9A-Za-z_-]{1,80}\Z")
CREATED = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _outcome(cursor: str) -> tuple[int, str] | None:
    """The decoded cursor, or None for a VALIDATION_ERROR; any other exception fails the test."""
    try:
        return decode_cursor(cursor)
    except ValidationError as error:
        assert (error.code, error.status) == ("VALIDATION_ERROR", 400)
        assert error.details == {"cursor": ["Malformed cursor"]}
        return None


def _b64(raw: bytes, urlsafe: bool) -> str:
    return (base64.urlsafe_b64encode(raw) if urlsafe else base64.b64encode(raw)).decode()


@settings(max_examples=500, derandomize=True, database=None)
@given(st.text(max_size=600))
def test_any_string_is_a_cursor_or_a_validation_error(cursor):
    _outcome(cursor)


@settings(max_examples=500, derandomize=True, database=None)
@given(st.binary(max_size=400), st.booleans())
def test_any_base64_payload_is_a_cursor_or_a_validation_error(raw, urlsafe):
    _outcome(_b64(raw, urlsafe))


@settings(max_examples=500, derandomize=True, database=None)
@given(JSON, st.booleans())
def test_any_json_payload_is_a_cursor_or_a_validation_error(value, urlsafe):
    decoded = _outcome(_b64(json.dumps(value).encode(), urlsafe))
    if decoded is not None:  # only the cursor's own shape decodes
        assert value == {"ts": decoded[0], "id": decoded[1]}


@settings(max_examples=200, derandomize=True, database=None)
@given(st.integers(min_value=1, max_value=5_000), st.sampled_from("[{"), st.integers(0, 3))
def test_nesting_at_any_depth_and_stack_is_a_validation_error(depth, bracket, frames):
    opening = bracket if bracket == "[" else '{"a":'
    cursor = _b64((opening * depth).encode(), False)

    def nested(level: int) -> None:  # decode from an already deep stack too
        if level:
            return nested(level - 1)
        assert _outcome(cursor) is None

    nested(frames * (sys.getrecursionlimit() // 4))


@settings(max_examples=300, derandomize=True, database=None)
@given(CREATED, ID)
def test_every_encoded_cursor_decodes_to_what_was_encoded(created, row_id):
    cursor = encode_cursor(created, row_id)
    assert len(cursor) <= MAX_CURSOR_CHARS
    ts, decoded_id = decode_cursor(cursor)
    assert decoded_id == row_id
    assert ts == (created - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
