"""Sandboxed Jinja2 templates for step inputs, conditions and the workflow output."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

_env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
# The whitespace-control markers (``{{-``, ``-}}``) are not part of the expression.
_WHOLE = re.compile(r"^\s*\{\{-?(?P<expr>.*?)-?\}\}\s*$", re.DOTALL)


class TemplateError(Exception):
    """A template failed to parse or to render; the message says which and why."""


def _whole_expression(source: str) -> str | None:
    """The expression when ``source`` is exactly one ``{{ … }}`` (it then yields a native value)."""
    match = _WHOLE.match(source)
    if not match:
        return None
    try:
        parsed = _env.parse(source)
    except TemplateSyntaxError:
        return None
    body = parsed.body
    if len(body) == 1 and isinstance(body[0], nodes.Output) and len(body[0].nodes) == 1:
        if not isinstance(body[0].nodes[0], nodes.TemplateData):
            return match.group("expr")
    return None


@lru_cache(maxsize=4096)
def _compile(source: str):  # type: ignore[no-untyped-def]
    expr = _whole_expression(source)
    if expr is not None:
        return True, _env.compile_expression(expr, undefined_to_none=False)
    return False, _env.from_string(source)


def has_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def check_syntax(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every template string in ``value`` that does not parse, as (path, message)."""
    problems: list[tuple[str, str]] = []
    if isinstance(value, str):
        if has_template(value):
            try:
                _compile(value)
            except TemplateSyntaxError as exc:
                problems.append((path, f"template syntax error: {exc.message} (line {exc.lineno})"))
    elif isinstance(value, dict):
        for key, item in value.items():
            problems.extend(check_syntax(item, f"{path}.{key}" if path else str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            problems.extend(check_syntax(item, f"{path}.{index}" if path else str(index)))
    return problems


def _render_string(source: str, context: dict[str, Any]) -> Any:
    if not has_template(source):
        return source
    native, compiled = _compile(source)
    result = compiled(**context) if native else compiled.render(context)
    if isinstance(result, StrictUndefined):
        str(result)  # raises UndefinedError with Jinja's own message
    return result


def render(value: Any, context: dict[str, Any], path: str = "") -> Any:
    """Render every string in a JSON value; a whole ``{{ expr }}`` keeps its native type."""
    try:
        if isinstance(value, str):
            return to_json(_render_string(value, context))
        if isinstance(value, dict):
            return {
                key: render(item, context, f"{path}.{key}" if path else key) for key, item in value.items()
            }
        if isinstance(value, list):
            return [render(item, context, f"{path}.{i}" if path else str(i)) for i, item in enumerate(value)]
        return value
    except TemplateError:
        raise
    except (
        UndefinedError,
        SecurityError,
        TemplateSyntaxError,
        TypeError,
        ValueError,
        ArithmeticError,
        AttributeError,
        KeyError,
        IndexError,
    ) as exc:
        where = f" at {path}" if path else ""
        raise TemplateError(f"template error{where}: {exc}") from exc


def truthy(value: Any, context: dict[str, Any]) -> bool:
    """Evaluate a step's ``if``: a template or a plain JSON value."""
    result = render(value, context, "if")
    if isinstance(result, str):
        return result.strip().lower() not in ("", "false", "0", "none", "null", "no")
    return bool(result)


def to_json(value: Any) -> Any:
    """Plain, storable JSON: tuples to lists, Markup to str, NUL (which PostgreSQL refuses) to U+FFFD."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return str(value).replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {to_json(str(k)): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return str(value)
