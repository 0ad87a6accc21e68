"""Step templates (app/templating.py): native values, strings, strict undefined, the sandbox."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from markupsafe import Markup

from app.templating import TemplateError, check_syntax, render, to_json, truthy

CONTEXT: dict[str, Any] = {
    "input": {
        "n": 3,
        "price": 9.5,
        "flag": True,
        "off": False,
        "nothing": None,
        "name": "Ada",
        "obj": {"a": [1, 2], "b": {"c": "d"}},
        "list": [1, "two", None],
        "data": {"object": {"id": "in_xxx", "customer_email": "ada@example.com"}},
    },
    "steps": {
        "create-contact": {"output": {"body": {"id": 12345}}, "status": "success"},
    },
    "run": {"id": "run_1", "workflowId": "wf_x", "triggerType": "api"},
}


def ctx() -> dict[str, Any]:
    """A fresh copy, so a test that a template cannot mutate its context can see a mutation."""
    return copy.deepcopy(CONTEXT)


# --------------------------------------------------------------------------- native values


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ input.n }}", 3),
        ("{{input.n}}", 3),
        ("{{ input.price }}", 9.5),
        ("{{ input.flag }}", True),
        ("{{ input.off }}", False),
        ("{{ input.nothing }}", None),
        ("{{ input.obj }}", {"a": [1, 2], "b": {"c": "d"}}),
        ("{{ input.list }}", [1, "two", None]),
        ("{{ steps['create-contact'].output.body.id }}", 12345),
        ("{{ steps['create-contact'].status }}", "success"),
        ("{{ run.triggerType }}", "api"),
        ("{{ input.n * 2 + 1 }}", 7),
        ("{{ input.list | length }}", 3),
        ("{{ input.missing is defined }}", False),
        ("{{ input.missing | default(42) }}", 42),
        ('{{ "}}" }}', "}}"),
    ],
)
def test_a_whole_expression_keeps_its_native_type(source, expected):
    result = render(source, ctx())
    assert result == expected
    assert type(result) is type(expected)


def test_native_values_are_plain_json():
    assert render("{{ (1, 2) }}", ctx()) == [1, 2]
    assert render("{{ {1: 'a'} }}", ctx()) == {"1": "a"}
    assert render("{{ input.obj | tojson }}", ctx()) == '{"a": [1, 2], "b": {"c": "d"}}'
    assert type(render("{{ input.obj | tojson }}", ctx())) is str  # Markup is not stored


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ input.n }} items", "3 items"),
        ("Invoice {{ input.data.object.id }} paid!", "Invoice in_xxx paid!"),
        ("{{ input.n }}{{ input.n }}", "33"),
        ("{{ input.n }} {{ input.name }}", "3 Ada"),
        ("  {{ input.n }}", "  3"),
        ("{{ input.n }}\n", "3\n"),
        ("{{ input.n }}}}", "3}}"),
        ("{% if input.flag %}yes{% endif %}", "yes"),
        ("{% for i in input.obj.a %}{{ i }},{% endfor %}", "1,2,"),
        ("{{ input.n }}{# note #}", "3"),
    ],
)
def test_anything_else_renders_to_a_string(source, expected):
    assert render(source, ctx()) == expected


@pytest.mark.parametrize("value", ["plain text", "{ not: a template }", "", 0, 1.5, True, None])
def test_values_without_templates_are_unchanged(value):
    result = render(value, ctx())
    assert result == value
    assert type(result) is type(value)


def test_render_walks_objects_and_lists():
    template = {
        "method": "POST",
        "json": {
            "text": "Invoice {{ input.data.object.id }} paid!",
            "amount": "{{ input.n }}",
            "tags": ["{{ input.name }}", "{{ input.flag }}", 7],
        },
    }
    before = copy.deepcopy(template)
    assert render(template, ctx()) == {
        "method": "POST",
        "json": {"text": "Invoice in_xxx paid!", "amount": 3, "tags": ["Ada", True, 7]},
    }
    assert template == before


def test_the_same_template_renders_against_each_context():
    """Compiled templates are cached; the cache must not keep a value from an earlier context."""
    assert render("{{ input.n }}", {"input": {"n": 1}}) == 1
    assert render("{{ input.n }}", {"input": {"n": 2}}) == 2
    assert render("n={{ input.n }}", {"input": {"n": 1}}) == "n=1"
    assert render("n={{ input.n }}", {"input": {"n": 2}}) == "n=2"


# --------------------------------------------------------------------------- strict undefined


@pytest.mark.parametrize(
    "source",
    [
        "{{ input.missing }}",
        "Hello {{ input.missing }}",
        "{{ nosuchname }}",
        "{{ steps['not-a-step'].output }}",
        "{{ input.obj.a[5] }}",
        "{{ [input.missing] }}",
        "{{ {'k': input.missing} }}",
        "{{ input.missing.deeper }}",
    ],
)
def test_an_undefined_name_is_an_error_not_an_empty_string(source):
    with pytest.raises(TemplateError):
        render(source, ctx())


def test_the_error_names_the_field():
    template = {"json": {"email": "{{ input.data.object.customer_emial }}"}}
    with pytest.raises(TemplateError) as caught:
        render(template, ctx())
    message = str(caught.value)
    assert message.startswith("template error at json.email: ")
    assert "customer_emial" in message


def test_the_error_names_a_list_position():
    with pytest.raises(TemplateError, match=r"^template error at json\.tags\.1: "):
        render({"json": {"tags": ["ok", "{{ input.nope }}"]}}, ctx())


def test_the_error_names_the_path_given_by_the_caller():
    with pytest.raises(TemplateError, match=r"^template error at output\.contactId: "):
        render("{{ input.nope }}", ctx(), "output.contactId")
    with pytest.raises(TemplateError, match=r"^template error: "):
        render("{{ input.nope }}", ctx())


@pytest.mark.parametrize(
    "source",
    [
        "{{ 1 / 0 }}",
        "{{ input.name + 1 }}",
        "{{ input.n.foo }}",
        "{{ oops",
        "{% if %}",
        "{{ input.n | nofilter }}",
    ],
)
def test_evaluation_and_syntax_errors_are_template_errors(source):
    with pytest.raises(TemplateError, match=r"^template error at field: "):
        render({"field": source}, ctx())


# --------------------------------------------------------------------------- sandbox


@pytest.mark.parametrize(
    "source",
    [
        "{{ input.__class__ }}",
        "{{ input.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ().__class__.__bases__ }}",
        "{{ input|attr('__class__') }}",
        "{{ '{0.__class__}'.format(input) }}",
        "{{ lipsum.__globals__ }}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_the_sandbox_refuses_dunder_access(source):
    with pytest.raises(TemplateError, match="unsafe"):
        render(source, ctx())


@pytest.mark.parametrize(
    "source",
    [
        "{{ input.pop('n') }}",
        "{{ input.clear() }}",
        "{{ input.update({'n': 0}) }}",
        "{{ input.list.append(4) }}",
        "{{ input.obj.a.reverse() }}",
        "{% set _ = input.obj.b.setdefault('x', 1) %}",
    ],
)
def test_the_sandbox_refuses_to_mutate_the_context(source):
    context = ctx()
    with pytest.raises(TemplateError, match="unsafe"):
        render(source, context)
    assert context == CONTEXT


def test_the_sandbox_refuses_huge_ranges():
    with pytest.raises(TemplateError, match="MAX_RANGE"):
        render("{{ range(10 ** 9) | list }}", ctx())


def test_safe_methods_still_work_in_the_sandbox():
    assert render("{{ input.obj.keys() | list }}", ctx()) == ["a", "b"]
    assert render("{{ input.name.upper() }}", ctx()) == "ADA"
    assert render("{{ input.obj.get('zz', 'none') }}", ctx()) == "none"


# --------------------------------------------------------------------------- truthy (a step's `if`)


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("{{ input.n > 2 }}", True),
        ("{{ input.n > 5 }}", False),
        ("{{ input.data.object.customer_email is defined }}", True),
        ("{{ input.data.object.phone is defined }}", False),
        ("{{ input.nothing }}", False),
        ("{{ input.obj }}", True),
        ("{{ {} }}", False),
        ("{{ [] }}", False),
        ("{{ 0 }}", False),
        ("{{ input.name }}", True),
        ("{{ 'false' }}", False),
        ("{{ input.n }} > 2", True),  # a non-empty string that is not a false word
        (True, True),
        (False, False),
        (None, False),
        (0, False),
        (1, True),
        ("", False),
        ("   ", False),
        ("false", False),
        ("False", False),
        (" FALSE ", False),
        ("0", False),
        ("no", False),
        ("No", False),
        ("none", False),
        ("null", False),
        ("true", True),
        ("yes", True),
        ("anything", True),
    ],
)
def test_truthy(condition, expected):
    assert truthy(condition, ctx()) is expected


def test_truthy_error_names_the_if_field():
    with pytest.raises(TemplateError, match=r"^template error at if: .*nope"):
        truthy("{{ input.nope }}", ctx())


# --------------------------------------------------------------------------- to_json


def test_to_json_replaces_nul_which_postgresql_refuses():
    assert to_json("a\x00b") == "a\ufffdb"
    assert to_json({"k\x00": ["\x00", {"x": "\x00\x00"}]}) == {"k\ufffd": ["\ufffd", {"x": "\ufffd\ufffd"}]}


def test_rendered_values_never_carry_nul():
    context = {"input": {"text": "a\x00b", "obj": {"k\x00": "v\x00"}}}
    assert render("{{ input.text }}", context) == "a\ufffdb"
    assert render("say {{ input.text }}", context) == "say a\ufffdb"
    assert render("{{ input.obj }}", context) == {"k\ufffd": "v\ufffd"}
    assert render({"plain": "no template \x00"}, context) == {"plain": "no template \ufffd"}


def test_to_json_makes_plain_storable_json():
    assert to_json((1, (2, 3))) == [1, [2, 3]]
    assert to_json({1: "a", None: "b"}) == {"1": "a", "None": "b"}
    result = to_json(Markup("<b>x</b>"))
    assert result == "<b>x</b>" and type(result) is str
    for value in (None, True, False, 0, -5, 1.25, "text"):
        assert to_json(value) == value and type(to_json(value)) is type(value)


def test_to_json_renders_unknown_objects_as_strings():
    class Thing:
        def __str__(self) -> str:
            return "thing"

    assert to_json({"a": Thing()}) == {"a": "thing"}


# --------------------------------------------------------------------------- check_syntax


def test_check_syntax_reports_each_broken_template_with_its_path():
    value = {
        "ok": "{{ input.x }}",
        "plain": "{ not a template",
        "json": {"tags": ["fine", "{{ oops"], "cond": "{% if %}"},
    }
    problems = dict(check_syntax(value))
    assert set(problems) == {"json.tags.1", "json.cond"}
    assert all(message.startswith("template syntax error: ") for message in problems.values())
    assert "(line 1)" in problems["json.tags.1"]


def test_check_syntax_accepts_valid_templates_and_undefined_names():
    """Names are resolved at run time; only the syntax is checked up front."""
    assert (
        check_syntax({"a": "{{ steps['later'].output.id }}", "b": ["{% if x %}y{% endif %}"], "c": 3}) == []
    )


def test_check_syntax_with_a_prefix_path():
    assert [path for path, _ in check_syntax("{{ oops", "")] == [""]
    assert [path for path, _ in check_syntax(["{{ oops"], "")] == ["0"]


# --------------------------------------------------------------------------- whitespace control


def test_whitespace_control_marker_does_not_negate_a_native_value():
    assert render("{{- input.n }}", ctx()) == 3


def test_whitespace_control_markers_render_a_native_value():
    assert render("{{ input.n -}}", ctx()) == 3
    assert render("{{- input.obj -}}", ctx()) == {"a": [1, 2], "b": {"c": "d"}}


def test_check_syntax_accepts_whitespace_control_markers():
    assert check_syntax({"a": "{{- input.n -}}", "b": "{{ input.n -}}"}) == []
