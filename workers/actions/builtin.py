"""Built-in actions that run in the worker thread: ``http.request``, ``transform`` and ``fail``."""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from typing import Any

import requests

from app.actions import ActionContext, StepError, action
from app.definition import IDEMPOTENCY_KEY_MAX
from app.timeutil import utcnow
from workers.actions import outbound

_RETRIABLE_STATUS = {408, 429}


def _retry_after_ms(value: str | None) -> int | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value) * 1000
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0, int((when - utcnow()).total_seconds() * 1000))


def idempotency_key(ctx: ActionContext, option: Any) -> str | None:
    """The step's ``Idempotency-Key``: ``<run id>:<step id>`` (a ``forEach`` item's:
    ``<run id>:<step id>:<index>``) unless the step's ``idempotencyKey`` gives its own (a string,
    after templating, which sees ``item`` and ``index``) or ``false`` (none). One value for every
    attempt of the step (of the item), so a service that honours the header (Stripe-style) acts once
    however often it is retried; a restart is a new run, so its re-executed steps get new keys."""
    if option is False:
        return None
    if option is True or option is None:
        if ctx.item_index is not None:
            return f"{ctx.run_id}:{ctx.step_id}:{ctx.item_index}"
        return f"{ctx.run_id}:{ctx.step_id}"
    if isinstance(option, (int, float)) and not isinstance(option, bool):
        option = str(option)
    if not isinstance(option, str) or not 1 <= len(option) <= IDEMPOTENCY_KEY_MAX or not option.isprintable():
        raise StepError(
            "INVALID_INPUT",
            f"http.request idempotencyKey must be false, true or 1 to {IDEMPOTENCY_KEY_MAX} printable "
            "characters",
        )
    return option


@action("http.request")
def http_request(ctx: ActionContext, params: Any) -> dict[str, Any]:
    if not isinstance(params, dict) or not isinstance(params.get("url"), str):
        raise StepError("INVALID_INPUT", "http.request needs an object input with a string 'url'")
    method = str(params.get("method", "GET")).upper()
    timeout_s = ctx.timeout_s
    if isinstance(params.get("timeoutMs"), (int, float)) and params["timeoutMs"] > 0:
        timeout_s = min(timeout_s, params["timeoutMs"] / 1000)
    headers = {str(k): str(v) for k, v in (params.get("headers") or {}).items()}
    key = idempotency_key(ctx, params.get("idempotencyKey", True))
    if key is not None and not any(name.lower() == "idempotency-key" for name in headers):
        headers["Idempotency-Key"] = key  # a header the step sets itself wins
    kwargs: dict[str, Any] = {"headers": headers, "params": params.get("query") or None}
    if "json" in params:
        kwargs["json"] = params["json"]
    elif "body" in params:
        body = params["body"]
        kwargs["data"] = body if isinstance(body, (str, bytes)) else str(body)
    try:
        # The guard resolves, checks every address and redirect hop, and caps the body.
        response = outbound.fetch(
            method, params["url"], outbound.Policy.from_config(ctx.config), timeout_s, **kwargs
        )
    except requests.Timeout as exc:
        # The step's own timeoutMs is STEP_TIMEOUT; a shorter per-request timeoutMs is the request's.
        code = "STEP_TIMEOUT" if timeout_s >= ctx.timeout_s else "HTTP_TIMEOUT"
        raise StepError(
            code, f"{method} {params['url']} timed out after {timeout_s:g} s", retriable=True
        ) from exc
    except requests.RequestException as exc:
        raise StepError("NETWORK_ERROR", f"{method} {params['url']} failed: {exc}", retriable=True) from exc

    content_type = response.headers.get("content-type", "")
    body: Any = response.text
    if "json" in content_type:
        try:
            body = response.json()
        except ValueError:
            body = response.text
    output = {"status": response.status_code, "headers": dict(response.headers), "body": body}
    if response.status_code >= 400:
        retriable = response.status_code >= 500 or response.status_code in _RETRIABLE_STATUS
        raise StepError(
            "HTTP_ERROR",
            f"{method} {params['url']} returned HTTP {response.status_code}",
            retriable=retriable,
            retry_after_ms=_retry_after_ms(response.headers.get("retry-after")),
        )
    return output


@action("transform", pure=True)
def transform(ctx: ActionContext, params: Any) -> Any:
    return params


@action("fail")
def fail(ctx: ActionContext, params: Any) -> Any:
    params = params if isinstance(params, dict) else {}
    raise StepError(
        str(params.get("code") or "STEP_FAILED"),
        str(params.get("message") or "Step failed"),
        retriable=bool(params.get("retriable", False)),
    )
