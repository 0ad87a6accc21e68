"""Sandboxed Jinja2 templates for step inputs, conditions and the workflow output."""

from __future__ import annotations

import copy
import re
import string
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from functools import update_wrapper
from typing import Any

from jinja2 import Environment, StrictUndefined, Template, TemplateSyntaxError, UndefinedError, nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import TemplateError as JinjaError
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

# Operation limits: a tenant's template is data, so every way it can allocate or loop is bounded.
MAX_STRING = 4 * 1024 * 1024  # characters of any string, and of a rendered value
MAX_ITEMS = 1_000_000  # items of a list or tuple made by repetition or concatenation
MAX_INT_BITS = 4096  # integers stay printable JSON (Python refuses str() past 4300 digits)
MAX_OPERATIONS = 1_000_000  # calls, intercepted operators and loop iterations per template
VALIDATION_OPERATIONS = 10_000  # operators evaluated when a definition's constants are checked
# The compile cache: bounded in bytes of source; long sources are compiled each time.
CACHE_MAX_BYTES = 32 * 1024 * 1024
CACHE_MAX_SOURCE_BYTES = 64 * 1024

# The whitespace-control markers (``{{-``, ``-}}``) are not part of the expression.
_WHOLE = re.compile(r"^\s*\{\{-?(?P<expr>.*?)-?\}\}\s*$", re.DOTALL)
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?")
_budget: ContextVar[list[int] | None] = ContextVar("template_budget", default=None)


class TemplateError(Exception):
    """A template failed to parse or to render; the message says which and why."""


class TemplateLimitError(TemplateError):
    """A template went past one of the operation limits."""


def _limit(what: str) -> TemplateLimitError:
    return TemplateLimitError(f"template limit exceeded: {what}")


def _charge(count: int = 1) -> None:
    """Spend from the current render's operation budget."""
    budget = _budget.get()
    if budget is not None:
        budget[0] -= count
        if budget[0] < 0:
            raise _limit(f"more than {MAX_OPERATIONS} operations")


def _measure(value: Any, cap: int = MAX_STRING) -> int:
    """Roughly how many characters ``value`` prints as, counting no further than ``cap``."""
    if not isinstance(value, (list, tuple, dict)):  # the common case: no walk
        if isinstance(value, str) and len(value) > cap:
            raise _limit("a value too large to print")
        return len(value) if isinstance(value, str) else 8
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, dict):
            total += 2 + 2 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            total += 2 + 2 * len(item)
            stack.extend(item)
        else:
            total += 8 if not isinstance(item, int) else item.bit_length() // 3 + 1
        if total > cap:
            # Shared references can make a small object print huge: stop counting, refuse.
            raise _limit("a value too large to print")
    return total


def _check_result(value: Any) -> Any:
    """Refuse a value that is over a size limit (strings, sequences, integers)."""
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise _limit(f"a string longer than {MAX_STRING} characters")
    if isinstance(value, (list, tuple, dict)) and len(value) > MAX_ITEMS:
        raise _limit(f"more than {MAX_ITEMS} items")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _limit(f"an integer over {MAX_INT_BITS} bits")
    return value


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple)) else 0


def _check_power(base: Any, exponent: Any) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if base.bit_length() * exponent > MAX_INT_BITS:
            raise _limit(f"a power over {MAX_INT_BITS} bits")


def _check_repeat(left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _limit(f"a product over {MAX_INT_BITS} bits")
        return
    count, seq = (right, left) if isinstance(right, int) else (left, right)
    if isinstance(count, int) and isinstance(seq, (str, list, tuple)):
        limit = MAX_STRING if isinstance(seq, str) else MAX_ITEMS
        if len(seq) * count > limit:
            raise _limit(f"a repetition longer than {limit}")


def _check_percent(template: Any, args: Any) -> None:
    """``'%*s' % …`` and ``'%99999999s'`` allocate their width before anything can check it."""
    if not isinstance(template, str):
        return
    for match in _PERCENT_SPEC.finditer(template):
        for width in match.groups():
            if width == "*" or (width is not None and int(width) > MAX_STRING):
                raise _limit("a format width over the string limit")
    _measure(args)


def _check_format(template: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``str.format``: no nested (argument-given) widths, no literal width over the limit."""
    for _, field, spec, _ in string.Formatter().parse(template):
        if (
            field is not None
            and spec
            and ("{" in spec or any(int(n) > MAX_STRING for n in re.findall(r"\d+", spec)))
        ):
            raise _limit("a format width over the string limit")
    _measure((args, kwargs))


def _check_binop(operator: str, left: Any, right: Any) -> None:
    _charge()
    if operator == "**":
        _check_power(left, right)
    elif operator == "*":
        _check_repeat(left, right)
    elif operator == "+":
        limit = MAX_STRING if isinstance(left, str) else MAX_ITEMS
        if _size(left) + _size(right) > limit:
            raise _limit(f"a concatenation longer than {limit}")
    elif operator == "%":
        _check_percent(left, right)


def _check_str_method(name: str, text: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Methods of ``str`` whose result can be far larger than their arguments."""
    first = args[0] if args else next(iter(kwargs.values()), None)
    if name in ("ljust", "rjust", "center", "zfill") and isinstance(first, int) and first > MAX_STRING:
        raise _limit("a padding width over the string limit")
    if name == "expandtabs" and isinstance(first, int) and text.count("\t") * first > MAX_STRING:
        raise _limit("expanded tabs over the string limit")
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        grow = (text.count(args[0]) if args[0] else len(text) + 1) * len(args[1])
        if len(text) + grow > MAX_STRING:
            raise _limit("a replacement over the string limit")
    if name in ("format", "format_map"):
        _check_format(text, args, kwargs)
    if name == "join" and args and isinstance(args[0], (list, tuple)):
        _measure(args[0], MAX_STRING // max(1, len(text)) if len(text) > 1 else MAX_STRING)


def _join_bounded(seq: Iterable[Any]) -> str:
    """Jinja's ``concat``/``str_join`` with the string limit checked before joining."""
    parts, total = [], 0
    for item in seq:
        text = item if type(item) is str else str(_measure(item) and item)
        total += len(text)
        if total > MAX_STRING:
            raise _limit(f"a string longer than {MAX_STRING} characters")
        parts.append(text)
    return "".join(parts)


def _finalize(value: Any) -> Any:
    """Every ``{{ … }}`` in a string template: its printed form must fit the string limit."""
    if isinstance(value, (list, tuple, dict)):
        _measure(value)
    return value


def _bounded_iter(iterable: Iterable[Any]) -> Iterator[Any]:
    """A ``for`` loop's iterable: every iteration spends from the operation budget."""
    for item in iterable:
        _charge()
        yield item


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator without compile-time evaluation of tenant expressions."""

    def _output_child_to_const(self, node: nodes.Expr, frame: Any, finalize: Any) -> str:
        # Folding runs the expression (``7 ** 60000000``) inside the API's request; only
        # literal text is kept as a constant, everything else runs under the render limits.
        if not isinstance(node, nodes.TemplateData):
            raise nodes.Impossible()
        return super()._output_child_to_const(node, frame, finalize)

    def visit_For(self, node: nodes.For, frame: Any) -> None:
        node = copy.copy(node)
        node.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [node.iter], [], None, None)
        super().visit_For(node, frame)


class _Template(Template):
    """Compiled templates whose string joins check the string limit."""

    @classmethod
    def _from_namespace(cls, environment: Any, namespace: dict[str, Any], globals: Any) -> Template:  # noqa: A002
        namespace["concat"] = _join_bounded
        namespace["str_join"] = _join_bounded
        return super()._from_namespace(environment, namespace, globals)


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with operation limits on operators, calls, loops and output."""

    code_generator_class = _CodeGenerator
    template_class = _Template
    intercepted_binops = frozenset({"**", "*", "+", "%"})
    bounded_iter = staticmethod(_bounded_iter)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return _check_result(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        # A macro call runs a whole body: it costs more than an operator.
        _charge(20 if isinstance(__obj, Macro) else 1)
        # The sandbox hands out ``str.format`` as a wrapper; the method is its ``__wrapped__``.
        target = getattr(__obj, "__wrapped__", __obj)
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            name = getattr(target, "__name__", "")
            if name == "join" and args and not isinstance(args[0], (list, tuple)):
                args = (list(_bounded_iter(args[0])), *args[1:])
            _check_str_method(name, owner, args, kwargs)
        return _check_result(super().call(__context, __obj, *args, **kwargs))


# Filters whose second argument sizes their result.
_WIDTH_FILTERS = frozenset({"center", "indent", "batch", "slice"})
# Filters that merely look at or reorder a value; the rest print it, so its size is checked first.
_LOOKING_FILTERS = frozenset(
    "abs attr batch bool count d default dictsort first float groupby int items last length list map max "
    "min random reject rejectattr reverse round select selectattr slice sort sum unique".split()
)


def _check_filter(name: str, values: list[Any], kwargs: dict[str, Any]) -> None:
    """Refuse a filter call whose result would be over a limit, before it is made."""
    width = values[1] if len(values) > 1 else None
    if name in _WIDTH_FILTERS and isinstance(width, int) and width > MAX_STRING:
        raise _limit(f"a {name} width over the string limit")
    if name not in _LOOKING_FILTERS and values:
        _measure(values[0])
    text = values[0] if values and isinstance(values[0], str) else ""
    lines = text.count("\n") + 1
    if name == "indent" and isinstance(width, (int, str)):
        if len(text) + lines * (width if isinstance(width, int) else len(width)) > MAX_STRING:
            raise _limit("an indent over the string limit")
    elif name == "replace" and len(values) >= 3:
        _check_str_method("replace", text, tuple(values[1:3]), {})
    elif name == "wordwrap":
        wrap = values[3] if len(values) > 3 else kwargs.get("wrapstring") or "\n"
        step = width if isinstance(width, int) and width > 0 else 1
        if len(text) + (len(text) // step + lines) * len(str(wrap)) > MAX_STRING:
            raise _limit("a wordwrap over the string limit")
    elif name == "join" and values:
        separator = str(values[1]) if len(values) > 1 else str(kwargs.get("d", ""))
        _measure(values[0], MAX_STRING // max(1, len(separator)))
    elif name == "format" and values:
        _check_percent(values[0], values[1:] or kwargs)


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """A built-in filter under the limits: arguments checked before, result size after."""

    def guarded(*args: Any, **kwargs: Any) -> Any:
        _charge()
        # Context-taking filters get that object first; the filtered value follows it.
        skip = 1 if args and isinstance(args[0], (Environment, EvalContext, Context)) else 0
        values = list(args[skip:])
        if name == "join" and values and not isinstance(values[0], (list, tuple, str, dict)):
            values[0] = list(_bounded_iter(values[0]))  # a generator is counted, then joined
        _check_filter(name, values, kwargs)
        return _check_result(func(*args[:skip], *values, **kwargs))

    return update_wrapper(guarded, func)


def _guard_lipsum(func: Callable[..., Any]) -> Callable[..., Any]:
    """``lipsum``'s cost is chosen by its arguments: keep them small."""

    def guarded(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> Any:  # noqa: A002
        _charge()
        if not all(isinstance(v, int) and v <= 1000 for v in (n, min, max)):
            raise _limit("lipsum arguments over 1000")
        return func(n, html, min, max)

    return update_wrapper(guarded, func)


def _environment() -> _LimitedEnvironment:
    env = _LimitedEnvironment(
        undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True, finalize=_finalize
    )
    # No compile-time folding by the optimizer either (it would evaluate filters and operators).
    env.optimized = False
    env.filters = {name: _guard_filter(name, func) for name, func in env.filters.items()}
    env.globals["lipsum"] = _guard_lipsum(env.globals["lipsum"])
    return env


_env = _environment()


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


class _CompileCache:
    """Compiled templates by source, least recently used first out, bounded in bytes of source."""

    def __init__(self, max_bytes: int, max_entry_bytes: int) -> None:
        self.max_bytes, self.max_entry_bytes = max_bytes, max_entry_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[bool, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: str, build: Callable[[str], tuple[bool, Any]]) -> tuple[bool, Any]:
        with self._lock:
            if source in self._entries:
                self._entries.move_to_end(source)
                return self._entries[source]
        compiled = build(source)
        size = sys.getsizeof(source)
        if size > self.max_entry_bytes:
            return compiled
        with self._lock:
            if source not in self._entries:
                self._entries[source] = compiled
                self.bytes += size
            while self.bytes > self.max_bytes:
                evicted, _ = self._entries.popitem(last=False)
                self.bytes -= sys.getsizeof(evicted)
        return compiled

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


_cache = _CompileCache(CACHE_MAX_BYTES, CACHE_MAX_SOURCE_BYTES)


def _build(source: str) -> tuple[bool, Any]:
    expr = _whole_expression(source)
    if expr is not None:
        return True, _env.compile_expression(expr, undefined_to_none=False)
    return False, _env.from_string(source)


def _compile(source: str) -> tuple[bool, Any]:
    return _cache.get(source, _build)


def _fold(node: nodes.Node) -> Any:
    """The value of a constant expression, computed under the limits; Impossible if not constant."""
    if isinstance(node, nodes.Const):
        return node.value
    if isinstance(node, (nodes.List, nodes.Tuple)):
        items = [_fold(item) for item in node.items]
        return items if isinstance(node, nodes.List) else tuple(items)
    if isinstance(node, nodes.BinExpr):
        left, right = _fold(node.left), _fold(node.right)
        if node.operator in _env.intercepted_binops:
            return _env.call_binop(None, node.operator, left, right)
        return _env.binop_table[node.operator](left, right)
    if isinstance(node, nodes.UnaryExpr):
        return _env.unop_table[node.operator](_fold(node.node))
    if isinstance(node, nodes.Concat):
        return _join_bounded(_fold(item) for item in node.nodes)
    if isinstance(node, nodes.Filter):
        return _fold_filter(node)
    raise nodes.Impossible()


def _fold_filter(node: nodes.Filter) -> Any:
    """A filter of constants (``'a' | center(10 ** 8)``), applied under the limits."""
    func = _env.filters.get(node.name)
    if func is None or node.node is None or node.kwargs or node.dyn_args or node.dyn_kwargs:
        raise nodes.Impossible()
    passed = getattr(func, "jinja_pass_arg", None)
    first = {None: (), "environment": (_env,), "eval_context": (EvalContext(_env),)}
    name = getattr(passed, "name", None)
    if name not in first:
        raise nodes.Impossible()  # it needs the render context
    return func(*first[name], _fold(node.node), *[_fold(arg) for arg in node.args])


def _constant_limit(source: str) -> str | None:
    """Why a constant part of ``source`` is over a limit (``{{ 7 ** 60000000 }}``), or None."""
    token = _budget.set([VALIDATION_OPERATIONS])
    try:
        stack: list[nodes.Node] = [_env.parse(source)]
        while stack:
            node = stack.pop()
            if isinstance(node, (nodes.BinExpr, nodes.UnaryExpr, nodes.Concat, nodes.Filter)):
                try:
                    _fold(node)
                    continue
                except TemplateLimitError as exc:
                    return f"template error: {exc}"
                except Exception:  # noqa: BLE001, S110 - not constant, or an error the run reports
                    pass
            stack.extend(node.iter_child_nodes())
        return None
    finally:
        _budget.reset(token)


def has_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def check_syntax(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every template string in ``value`` that does not parse, as (path, message)."""
    problems: list[tuple[str, str]] = []
    if isinstance(value, str):
        if has_template(value):
            try:
                _compile(value)
                limit = _constant_limit(value)
                if limit:
                    problems.append((path, limit))
            except TemplateSyntaxError as exc:
                problems.append((path, f"template syntax error: {exc.message} (line {exc.lineno})"))
            except (RecursionError, MemoryError):
                problems.append((path, "template error: nested too deeply"))
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
    token = _budget.set([MAX_OPERATIONS])
    try:
        if not native:
            # Streamed and counted, so an oversized output stops before it is all in memory.
            return _join_bounded(compiled.generate(context))
        result = compiled(**context)
        if isinstance(result, StrictUndefined):
            str(result)  # raises UndefinedError with Jinja's own message
        _measure(result)
        return result
    finally:
        _budget.reset(token)


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
    except TemplateLimitError as exc:
        where = f" at {path}" if path else ""
        raise TemplateError(f"template error{where}: {exc}") from exc
    except TemplateError:
        raise
    except (
        RecursionError,
        MemoryError,
        JinjaError,  # undefined names, sandbox refusals, ``{% include %}`` of a missing template
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
