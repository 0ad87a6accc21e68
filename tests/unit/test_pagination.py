"""The list cursor (api/pagination.py): base64 of {"ts": <createdAt epoch ms>, "id": "<run id>"}."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from sqlalchemy import column, select, table
from sqlalchemy.dialects import postgresql

from api.pagination import decode_cursor, encode_cursor, meta, page
from app.errors import BatonError, ValidationError

UTC = timezone.utc
RUN_ID = "run_660e8400-e29b-41d4-a716-446655440001"
# The example of /work/shared/spec/runs-api.txt, and what it holds.
SPEC_CURSOR = "eyJ0cyI6MTcwNTMxMjAwMDAwMCwiaWQiOiJydW5fNjYwZTg0MDAuLi4ifQ=="
SPEC_TS = 1_705_312_000_000


def b64(raw: str | bytes) -> str:
    return base64.b64encode(raw.encode() if isinstance(raw, str) else raw).decode()


def b64_json(value: object) -> str:
    return b64(json.dumps(value))


# --------------------------------------------------------------------------- encode


def test_encoding_matches_the_spec_example_byte_for_byte():
    assert json.loads(base64.b64decode(SPEC_CURSOR)) == {"ts": SPEC_TS, "id": "run_660e8400..."}
    created = datetime(2024, 1, 15, 9, 46, 40, tzinfo=UTC)
    assert encode_cursor(created, "run_660e8400...") == SPEC_CURSOR


def test_encoded_cursor_is_standard_base64_of_ts_and_id():
    created = datetime(2024, 1, 15, 10, 30, 0, 123_000, tzinfo=UTC)
    cursor = encode_cursor(created, RUN_ID)
    decoded = json.loads(base64.b64decode(cursor, validate=True))
    assert decoded == {"ts": 1_705_314_600_123, "id": RUN_ID}
    assert type(decoded["ts"]) is int
    assert list(decoded) == ["ts", "id"]


def test_encoding_truncates_to_the_millisecond_and_normalises_zones():
    utc = datetime(2024, 1, 15, 10, 30, 0, 123_999, tzinfo=UTC)
    berlin = utc.astimezone(timezone(timedelta(hours=1)))
    naive = utc.replace(tzinfo=None)  # stored times are UTC
    expected = b64(json.dumps({"ts": 1_705_314_600_123, "id": RUN_ID}, separators=(",", ":")))
    assert (
        encode_cursor(utc, RUN_ID)
        == encode_cursor(berlin, RUN_ID)
        == encode_cursor(naive, RUN_ID)
        == expected
    )


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "created",
    [
        datetime(2024, 1, 15, 10, 30, tzinfo=UTC),
        datetime(2024, 2, 29, 23, 59, 59, 999_000, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2099, 12, 31, 23, 59, 59, 1_000, tzinfo=UTC),
    ],
)
@pytest.mark.parametrize(
    "row_id", [RUN_ID, "run_019012ab-cdef-7000-8000-000000000000", "wf_invoice-paid", "dlv_0190_x"]
)
def test_round_trip(created, row_id):
    ts, decoded_id = decode_cursor(encode_cursor(created, row_id))
    assert decoded_id == row_id
    assert ts == (created - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    assert type(ts) is int


def test_decode_accepts_a_cursor_without_padding():
    created = datetime(2024, 1, 15, tzinfo=UTC)
    for row_id in (RUN_ID, RUN_ID + "a", RUN_ID + "ab"):  # one of these lengths needs padding
        standard = encode_cursor(created, row_id)
        bare = base64.urlsafe_b64encode(base64.b64decode(standard)).decode().rstrip("=")
        assert decode_cursor(bare) == decode_cursor(standard) == (decode_cursor(standard)[0], row_id)
    assert any(encode_cursor(created, RUN_ID + suffix).endswith("=") for suffix in ("", "a", "ab"))


# --------------------------------------------------------------------------- malformed


MALFORMED = {
    "empty": "",
    "punctuation": "!!!",
    "not-base64": "not a cursor",
    "non-ascii": "é" * 8,
    "not-json": b64("hello"),
    "not-utf8": b64(b"\xff\xfe\xfd"),
    "array": b64_json([SPEC_TS, RUN_ID]),
    "null": b64_json(None),
    "number": b64_json(42),
    "string": b64_json("run"),
    "empty-object": b64_json({}),
    "no-id": b64_json({"ts": SPEC_TS}),
    "no-ts": b64_json({"id": RUN_ID}),
    "ts-string": b64_json({"ts": str(SPEC_TS), "id": RUN_ID}),
    "ts-float": b64_json({"ts": SPEC_TS + 0.5, "id": RUN_ID}),
    "ts-bool": b64_json({"ts": True, "id": RUN_ID}),
    "ts-null": b64_json({"ts": None, "id": RUN_ID}),
    "ts-huge": b64_json({"ts": 10**30, "id": RUN_ID}),
    "ts-very-negative": b64_json({"ts": -(10**20), "id": RUN_ID}),
    "id-number": b64_json({"ts": SPEC_TS, "id": 5}),
    "id-null": b64_json({"ts": SPEC_TS, "id": None}),
    "id-empty": b64_json({"ts": SPEC_TS, "id": ""}),
    "id-no-prefix": b64_json({"ts": SPEC_TS, "id": "660e8400-e29b-41d4-a716-446655440001"}),
    "id-sql": b64_json({"ts": SPEC_TS, "id": "run_' OR '1'='1"}),
    "id-nul": b64_json({"ts": SPEC_TS, "id": "run_a\x00b"}),
    "id-too-long": b64_json({"ts": SPEC_TS, "id": "run_" + "a" * 200}),
    "spec-placeholder-id": SPEC_CURSOR,  # "run_660e8400..." is the spec's elision, not an id
}


@pytest.mark.parametrize("cursor", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_cursor_is_a_validation_error(cursor):
    with pytest.raises(ValidationError) as caught:
        decode_cursor(cursor)
    error = caught.value
    assert isinstance(error, BatonError)
    assert (error.code, error.status) == ("VALIDATION_ERROR", 400)
    assert error.details == {"cursor": ["Malformed cursor"]}
    assert error.to_dict() == {
        "success": False,
        "error": {
            "code": "VALIDATION_ERROR",
            "message": "Invalid cursor",
            "details": {"cursor": ["Malformed cursor"]},
        },
    }


def test_deeply_nested_cursor_is_a_validation_error():
    with pytest.raises(ValidationError):
        decode_cursor(b64("[" * 5000))


# --------------------------------------------------------------------------- page and meta

ITEMS = table("items", column("created_at"), column("id"))


def compiled(query) -> tuple[str, dict]:
    result = query.compile(dialect=postgresql.dialect())
    return str(result), result.params


def test_page_without_cursor_orders_newest_first_and_reads_one_more():
    sql, params = compiled(page(select(ITEMS), ITEMS.c.created_at, ITEMS.c.id, None, 20))
    assert "ORDER BY items.created_at DESC, items.id DESC" in sql
    assert "WHERE" not in sql
    assert 21 in params.values()


def test_page_with_cursor_seeks_after_the_cursor_row():
    created = datetime(2024, 1, 15, 10, 30, 0, 123_000, tzinfo=UTC)
    cursor = encode_cursor(created, RUN_ID)
    sql, params = compiled(page(select(ITEMS), ITEMS.c.created_at, ITEMS.c.id, cursor, 5))
    assert "(items.created_at, items.id) < (" in sql
    assert created in params.values() and RUN_ID in params.values()
    assert 6 in params.values()


def test_page_with_a_malformed_cursor_raises_before_any_query():
    with pytest.raises(ValidationError):
        page(select(ITEMS), ITEMS.c.created_at, ITEMS.c.id, "!!!", 5)


def rows(count: int) -> list[SimpleNamespace]:
    base = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
    return [
        SimpleNamespace(created_at=base - timedelta(seconds=i), id=f"run_{i:08d}-0000-7000-8000-000000000000")
        for i in range(count)
    ]


def test_meta_with_more_rows_points_at_the_last_row_shown():
    fetched = rows(4)  # page() reads limit + 1
    shown, info = meta(fetched, 3)
    assert shown == fetched[:3]
    assert info == {"cursor": encode_cursor(fetched[2].created_at, fetched[2].id), "hasMore": True}
    assert decode_cursor(info["cursor"])[1] == fetched[2].id


@pytest.mark.parametrize("count", [0, 1, 3])
def test_meta_on_the_last_page_has_no_cursor(count):
    fetched = rows(count)
    shown, info = meta(fetched, 3)
    assert shown == fetched
    assert info == {"cursor": None, "hasMore": False}
