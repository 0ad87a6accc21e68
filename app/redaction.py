"""Redaction: secret values, sensitive headers and credential query parameters become [REDACTED]
before anything is stored, returned or logged."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote, quote_plus

REDACTED = "[REDACTED]"
SENSITIVE_HEADERS = frozenset({"authorization", "cookie", "x-api-key", "proxy-authorization"})
CREDENTIAL_PARAMS = (
    "token",
    "access_token",
    "api_key",
    "apikey",
    "key",
    "secret",
    "password",
    "signature",
    "sig",
    "auth",
)
# A credential parameter in a URL (also inside a longer message); a value that starts with a
# template (``{{ secrets.X }}``) is a reference, not a credential, and is kept.
_PARAMS = "|".join(CREDENTIAL_PARAMS)
_QUERY = re.compile(rf"([?&;](?:{_PARAMS})=)(?!\{{\{{)[^&#;\s\"'<>]+", re.IGNORECASE)
_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@\"']+:)[^@/\s\"']+(@)", re.IGNORECASE)


def forms(values: Iterable[str]) -> list[str]:
    """Each secret as written and URL-encoded, longest first (so no part of one survives)."""
    found = set()
    for value in values:
        if isinstance(value, str) and value:
            found.update({value, quote(value, safe=""), quote_plus(value), quote(value)})
    return sorted(found, key=len, reverse=True)


def text(value: str, secrets: Sequence[str] = ()) -> str:
    """A string with secret values and URL credentials replaced."""
    for secret in secrets:
        if secret in value:
            value = value.replace(secret, REDACTED)
    if "=" in value:
        value = _QUERY.sub(r"\1" + REDACTED, value)
    if "@" in value:
        value = _USERINFO.sub(r"\1" + REDACTED + r"\2", value)
    return value


def deep(value: Any, secrets: Sequence[str] = ()) -> Any:
    """``text`` applied to every string (keys too) of a JSON value."""
    if isinstance(value, str):
        return text(value, secrets)
    if isinstance(value, dict):
        return {deep(k, secrets): deep(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [deep(v, secrets) for v in value]
    return value


def headers(value: Any) -> Any:
    """Sensitive header values replaced (names compared case-insensitively)."""
    if not isinstance(value, dict):
        return value
    return {k: REDACTED if str(k).lower() in SENSITIVE_HEADERS else v for k, v in value.items()}


def query(value: Any) -> Any:
    """An ``http.request`` ``query`` object with credential parameters replaced."""
    if not isinstance(value, dict):
        return value
    return {k: REDACTED if str(k).lower() in CREDENTIAL_PARAMS else v for k, v in value.items()}


def http_input(value: Any) -> Any:
    """An ``http.request`` input with its headers and query credentials replaced."""
    if not isinstance(value, dict):
        return value
    shown = dict(value)
    if "headers" in shown:
        shown["headers"] = headers(shown["headers"])
    if "query" in shown:
        shown["query"] = query(shown["query"])
    return shown


def step_record(action: str, step_input: Any, output: Any, error: Any, secrets: list[str]) -> tuple:
    """A step's (input, output, error) as it may be stored: nothing secret left in clear."""
    if action == "http.request":
        step_input = http_input(step_input)
    return deep(step_input, secrets), deep(output, secrets) if secrets else output, deep(error, secrets)


def _literal(value: Any) -> bool:
    return isinstance(value, str) and "{{" not in value


def _is_http(step: Any) -> bool:
    is_http = isinstance(step, dict) and step.get("action") == "http.request"
    return is_http and isinstance(step.get("input"), dict)


def _shown_http_input(value: dict[str, Any]) -> dict[str, Any]:
    shown = dict(value)
    for field, names in (("headers", SENSITIVE_HEADERS), ("query", CREDENTIAL_PARAMS)):
        if isinstance(shown.get(field), dict):
            shown[field] = {
                k: REDACTED if str(k).lower() in names and _literal(v) else v for k, v in shown[field].items()
            }
    return deep(shown)


def definition(value: dict[str, Any]) -> dict[str, Any]:
    """A workflow definition as the API shows it: literal sensitive headers and URL credentials
    replaced (template references such as ``{{ secrets.X }}`` are kept)."""
    if not isinstance(value.get("steps"), list):
        return dict(value)
    steps = [
        {**step, "input": _shown_http_input(step["input"])} if _is_http(step) else step
        for step in value["steps"]
    ]
    return {**value, "steps": steps}
