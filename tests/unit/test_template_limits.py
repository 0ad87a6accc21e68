"""Template limits (app/templating.py): hostile templates end as a TemplateError, quickly and small."""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import templating
from app.templating import (
    MAX_INT_BITS,
    MAX_ITEMS,
    MAX_STRING,
    TemplateError,
    check_syntax,
    render,
)

# Generous for a loaded CI machine, and still far below what an unbounded evaluation takes.
FAST_S = 2.5  # generous for a shared CI machine: the hazard was a 42 s freeze
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(source: str, context: dict[str, Any] | None = None) -> tuple[Any, float]:
    """(the rendered value or the TemplateError, seconds taken)."""
    started = time.perf_counter()
    try:
        value: Any = render(source, context or {})
    except TemplateError as exc:
        value = exc
    return value, time.perf_counter() - started


# --------------------------------------------------------------------------- property tests


@PROPERTY
@given(base=st.integers(-(10**6), 10**6), exponent=st.integers(0, 10**9))
def test_a_power_is_exact_or_a_template_error_and_always_quick(base, exponent):
    value, took = outcome("{{ input.b ** input.e }}", {"input": {"b": base, "e": exponent}})
    assert took < FAST_S
    if abs(base) <= 1 or base.bit_length() * exponent <= MAX_INT_BITS:
        assert value == base**exponent
    else:
        assert isinstance(value, TemplateError) and "limit" in str(value)


@PROPERTY
@given(text=st.text(min_size=1, max_size=50), times=st.integers(0, 10**10))
def test_a_string_repetition_is_exact_or_a_template_error(text, times):
    value, took = outcome("{{ input.s * input.n }}", {"input": {"s": text, "n": times}})
    assert took < FAST_S
    if len(text) * times <= MAX_STRING:
        assert value == (text * times).replace("\x00", "\ufffd")
    else:
        assert isinstance(value, TemplateError) and "limit" in str(value)


@PROPERTY
@given(size=st.integers(1, 20), times=st.integers(0, 10**9))
def test_a_list_repetition_is_exact_or_a_template_error(size, times):
    value, took = outcome("{{ input.l * input.n }}", {"input": {"l": list(range(size)), "n": times}})
    assert took < FAST_S
    if size * times <= MAX_ITEMS:
        assert value == list(range(size)) * times
    else:
        assert isinstance(value, TemplateError) and "limit" in str(value)


@PROPERTY
@given(stop=st.integers(0, 10**12))
def test_a_range_is_exact_or_a_template_error(stop):
    value, took = outcome("{{ range(input.n) | list | length }}", {"input": {"n": stop}})
    assert took < FAST_S
    if stop <= 100_000:
        assert value == stop
    else:
        assert isinstance(value, TemplateError)


@PROPERTY
@given(chunk=st.integers(1, 10**6), times=st.integers(1, 100_000))
def test_rendered_output_is_bounded(chunk, times):
    source = "{% for i in range(input.n) %}{{ input.s }}{% endfor %}"
    value, took = outcome(source, {"input": {"s": "x" * chunk, "n": times}})
    assert took < FAST_S
    if chunk * times <= MAX_STRING:
        assert value == "x" * (chunk * times)
    else:
        assert isinstance(value, TemplateError) and "limit" in str(value)


@PROPERTY
@given(width=st.integers(0, 10**10), how=st.sampled_from(["ljust", "rjust", "center", "zfill"]))
def test_padding_is_exact_or_a_template_error(width, how):
    value, took = outcome(f"{{{{ 'ab'.{how}(input.w) }}}}", {"input": {"w": width}})
    assert took < FAST_S
    if width <= MAX_STRING:
        assert value == getattr("ab", how)(width)
    else:
        assert isinstance(value, TemplateError)


# --------------------------------------------------------------------------- hostile templates

HOSTILE = [
    "{{ 7 ** 60000000 }}",
    "{{ 'a' * 100000000 }}",
    "{{ 'a' * 10 ** 8 }}",
    "{{ [1] * 10 ** 8 }}",
    "{{ 'a' | center(100000000) }}",
    "{{ 'a' | indent(100000000) }}",
    "{{ [1] | batch(100000000, 'x') | list }}",
    "{{ 'a'.ljust(10 ** 8) }}",
    "{{ ('\t' * 100000).expandtabs(100000) }}",
    "{{ '{:100000000}'.format(1) }}",
    "{{ '{:{}}'.format(1, 100000000) }}",
    "{{ '%100000000s' % 'a' }}",
    "{{ '%*s' % (100000000, 'a') }}",
    "{{ '%100000000s' | format('a') }}",
    "{{ ('a' * 4000000) ~ ('a' * 4000000) }}",
    "{{ ('a' * 4000000) + ('a' * 4000000) }}",
    "{{ (['a' * 1000000] * 1000) | join }}",
    "{{ range(100000) | map('string') | join('x' * 1000000) }}",
    "{{ ('ab' * 1000000) | replace('', 'x' * 1000) }}",
    "{{ ('a' * 1000000).replace('a', 'b' * 1000) }}",
    "{{ ([[['x' * 1000000] * 10] * 10] * 10) | tojson }}",
    "{{ [[['x' * 1000000] * 10] * 10] * 10 }}",
    "{{ lipsum(100000) }}",
    "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(n=7) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{{ " + "(" * 2000 + "1" + ")" * 2000 + " }}",
    "{{ " + "[" * 2000 + "]" * 2000 + " }}",
    "{% include 'x' %}",
    "{% extends '/etc/passwd' %}",
    "{% autoescape 'a' | center(100000000) %}x{% endautoescape %}",
]


@pytest.mark.parametrize("source", HOSTILE)
def test_a_hostile_template_is_a_template_error_quickly(source):
    value, took = outcome(source)
    assert isinstance(value, TemplateError), repr(value)[:200]
    assert took < FAST_S * 2


@pytest.mark.parametrize("source", HOSTILE)
def test_checking_a_hostile_template_is_quick_and_small(source):
    """Validation never evaluates a tenant expression without the limits (no compile-time folding)."""
    templating._cache.clear()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        check_syntax({"x": source})
        took = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert took < 2
    assert peak < 32 * 1024 * 1024, f"checking allocated {peak} bytes"


@pytest.mark.parametrize(
    "source",
    [
        "{{ 7 ** 60000000 }}",
        "{{ 'a' * 100000000 }}",
        "{{ 'a' * 10 ** 8 }}",
        "x {{ 2 ** (10 ** 8) }} y",
        "{% if [0] * 10 ** 9 %}{% endif %}",
        "{{ '%100000000s' % 'a' }}",
        "{{ 'a' | center(10 ** 8) }}",
        "{{ ('a' * 1000) | join('b' * 100000) }}",
        "{{ 'a' | indent(100000000) | upper }}",
    ],
)
def test_a_constant_over_a_limit_is_reported_by_check_syntax(source):
    started = time.perf_counter()
    problems = check_syntax({"a": {"b": source}})
    assert time.perf_counter() - started < 0.5
    assert len(problems) == 1 and problems[0][0] == "a.b" and "limit" in problems[0][1]


@pytest.mark.parametrize(
    "source",
    [
        "{{ 2 ** 64 }}",
        "{{ 'ab' * 3 }}",
        "{{ input.x ** 2 }}",
        "{{ [0] * 1000 }}",
        "{{ 10 / 0 }}",
        "{{ 'a' | center(80) | trim }}",
        "{{ [3, 1] | sort | join(',') }}",
        "{{ input | tojson }}",
        "{{ 'x' | int(input.d) }}",
    ],
)
def test_constants_within_the_limits_pass_check_syntax(source):
    assert check_syntax(source) == []


def test_deep_template_nesting_is_a_syntax_problem_not_a_crash():
    problems = check_syntax({"x": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}"})
    assert problems and problems[0][0] == "x"


def test_deeply_nested_values_are_a_template_error_not_a_recursion_error():
    value: Any = "{{ 1 }}"
    for _ in range(5000):
        value = {"a": value}
    with pytest.raises(TemplateError):
        render(value, {})


def test_the_limit_error_names_the_field():
    with pytest.raises(TemplateError, match=r"at input\.big.*limit"):
        render({"big": "{{ 'a' * 10 ** 9 }}"}, {}, "input")


def test_values_within_the_limits_render_as_before():
    assert render("{{ 2 ** 100 }}", {}) == 2**100
    assert render("{{ 'ab' * 3 }}", {}) == "ababab"
    assert render("{{ [1, 2] * 2 }}", {}) == [1, 2, 1, 2]
    assert render("{{ range(3) | join(',') }}", {}) == "0,1,2"
    assert render("{{ 'x' | center(5) }}", {}) == "  x  "
    assert render("{{ '%5s|%-3d' % ('a', 1) }}", {}) == "    a|1  "
    assert render("{{ '{:>4}'.format('a') }}", {}) == "   a"
    assert render("{{ items | map(attribute='n') | join(', ') }}", {"items": [{"n": 1}, {"n": 2}]}) == "1, 2"
    assert render("{% for i in range(1000) %}{{ i % 10 }}{% endfor %}", {}) == "0123456789" * 100
    assert render("{{ 'a' * 4000000 }}", {}) == "a" * 4_000_000


# --------------------------------------------------------------------------- the compile cache


def test_the_compile_cache_is_bounded_in_bytes():
    cache = templating._CompileCache(max_bytes=100_000, max_entry_bytes=10_000)
    for i in range(200):
        cache.get(f"{{{{ {i} }}}}{'x' * 5000}", templating._build)
    assert cache.bytes <= 100_000
    assert 0 < len(cache._entries) < 200


def test_a_long_source_is_compiled_but_not_cached():
    cache = templating._CompileCache(max_bytes=100_000, max_entry_bytes=10_000)
    native, compiled = cache.get("{{ 1 }}" + "x" * 20_000, templating._build)
    assert not native and compiled.render() == "1" + "x" * 20_000
    assert cache.bytes == 0 and not cache._entries


def test_the_module_cache_stays_within_its_budget():
    assert templating._cache.max_bytes <= 32 * 1024 * 1024
    for i in range(300):
        check_syntax(f"{{{{ input.a{i} }}}}" + "y" * 60_000)
    assert templating._cache.bytes <= templating._cache.max_bytes


# --------------------------------------------------------------------------- the sandbox still holds

ESCAPES = [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ (1).__class__ }}",
    "{{ ''.__doc__ }}",
    "{{ input.__class__ }}",
    "{{ input.__class__.__init__.__globals__ }}",
    "{{ input.__getitem__ }}",
    "{{ input.items.__self__ }}",
    "{{ ''.join.__self__ }}",
    "{{ ''.format.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ range.__globals__ }}",
    "{{ dict.mro()[1].__subclasses__() }}",
    "{{ input | attr('__class__') }}",
    "{{ input | attr('\\x5f\\x5fclass\\x5f\\x5f') }}",
    "{{ '{0.__class__}'.format(input) }}",
    "{{ '{0.__class__.__mro__}'.format(1) }}",
    "{{ '{0.__init__.__globals__}'.format(cycler) }}",
    "{{ input.update({'a': 1}) }}",
    "{{ input.clear() }}",
    "{{ input.list.append(1) }}",
    "{{ input.list.pop() }}",
    "{{ {}.setdefault('a', 1) }}",
    "{% for x in range(1) %}{{ loop.__class__ }}{% endfor %}",
    "{{ __import__('os') }}",
    "{{ getattr(input, 'x') }}",
    "{{ config }}",
    "{{ request }}",
    "{% include 'x' %}",
    "{% import 'os' as os %}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_escapes_are_still_refused(source):
    context = {"input": {"list": [1], "a": 0}}
    with pytest.raises(TemplateError):
        render(source, context)
    assert context == {"input": {"list": [1], "a": 0}}
