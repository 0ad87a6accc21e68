"""The run diff's JSON comparison: the paths it names and what counts as a change."""

from __future__ import annotations

from typing import Any

import pytest

from app.rundiff import Changes, compare, json_path


def _changes(before: Any, after: Any, root: str = "output", limit: int = 200) -> list[tuple[str, Any, Any]]:
    found = Changes(limit=limit)
    compare(root, before, after, found)
    return [(c["path"], c["before"], c["after"]) for c in found.items]


@pytest.mark.parametrize(
    ("parts", "path"),
    [
        (("output",), "output"),
        (("output", "total"), "output.total"),
        (("output", "body", "items", 2, "id"), "output.body.items[2].id"),
        (("input", "headers", "Content-Type"), 'input.headers["Content-Type"]'),
        (("input", "a.b"), 'input["a.b"]'),
        (("input", 'say "hi"'), 'input["say \\"hi\\""]'),
        (("input", ""), 'input[""]'),
        (("input", "_x9"), "input._x9"),
        (("input", "9x"), 'input["9x"]'),
        (("input", "ü"), 'input["ü"]'),
    ],
)
def test_paths_use_dots_for_identifiers_and_brackets_for_the_rest(parts, path):
    assert json_path(parts) == path


def test_equal_values_have_no_change():
    value = {"a": [1, {"b": None}], "c": "x", "d": 1.5, "e": True}
    assert _changes(value, {**value}) == []


def test_changes_are_reported_at_the_deepest_differing_path_in_order():
    before = {"total": 10, "items": [{"id": 1}, {"id": 2}], "meta": {"page": 1}, "gone": 1}
    after = {"total": 12, "items": [{"id": 1}, {"id": 3}, {"id": 4}], "meta": {"page": 1}, "new": {"x": 1}}
    assert _changes(before, after) == [
        ("output.total", 10, 12),
        ("output.items[1].id", 2, 3),
        ("output.items[2]", None, {"id": 4}),
        ("output.gone", 1, None),
        ("output.new", None, {"x": 1}),
    ]


def test_a_change_of_type_is_one_change_at_that_path():
    assert _changes({"a": {"b": 1}}, {"a": [1]}) == [("output.a", {"b": 1}, [1])]
    assert _changes(None, {"x": 1}) == [("output", None, {"x": 1})]
    assert _changes("1", 1) == [("output", "1", 1)]


def test_numbers_compare_by_value_and_booleans_are_not_numbers():
    assert _changes({"n": 1}, {"n": 1.0}) == []
    assert _changes({"n": 1}, {"n": True}) == [("output.n", 1, True)]
    assert _changes({"n": False}, {"n": 0}) == [("output.n", False, 0)]


def test_a_missing_key_and_null_are_the_same():
    assert _changes({"a": None}, {}) == []


def test_the_list_of_changes_stops_at_the_limit():
    found = Changes(limit=3)
    compare("output", list(range(10)), list(range(1, 11)), found)
    assert [c["path"] for c in found.items] == ["output[0]", "output[1]", "output[2]"]
    assert found.truncated


def test_a_deep_document_does_not_exhaust_the_stack():
    deep_a: Any = 1
    deep_b: Any = 2
    for _ in range(5000):
        deep_a, deep_b = {"k": deep_a}, {"k": deep_b}
    [(path, before, after)] = _changes(deep_a, deep_b)
    assert path == "output" + ".k" * 5000 and (before, after) == (1, 2)
