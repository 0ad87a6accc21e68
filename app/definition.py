"""Validation of workflow definitions (DESIGN §4), shared by the API and the CLI."""

from __future__ import annotations

import re
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates, validates_schema

from app import actions, schedules, templating, webhooks
from app.engine.graph import find_cycle
from app.errors import ValidationError as BatonValidationError

STEP_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")
DEFAULT_STEP_TIMEOUT_MS = 300_000
MAX_DELAY_MS = 7 * 24 * 3600 * 1000 - 1  # the Redis broker refuses delays of 7 days or more
# forEach: items of one step run at most this many at a time (each holds a thread of its worker).
MAX_PARALLEL = 100
DEFAULT_MAX_PARALLEL = 10
FOR_EACH_HINT = 'forEach must be a template string that renders to a list, e.g. "{{ input.orders }}"'


class AnyJSON(fields.Raw):
    """Any JSON value, including null."""


class RetrySchema(Schema):
    class Meta:
        unknown = RAISE

    maxAttempts = fields.Integer(load_default=1, validate=validate.Range(1, 100), strict=True)
    backoff = fields.String(
        load_default="exponential", validate=validate.OneOf(["exponential", "fixed", "linear"])
    )
    initialDelayMs = fields.Integer(load_default=1000, validate=validate.Range(0, MAX_DELAY_MS), strict=True)
    maxDelayMs = fields.Integer(load_default=60_000, validate=validate.Range(0, MAX_DELAY_MS), strict=True)

    @validates_schema
    def _delays(self, data: dict[str, Any], **_: Any) -> None:
        if data["maxDelayMs"] < data["initialDelayMs"]:
            raise ValidationError("maxDelayMs must be at least initialDelayMs", "maxDelayMs")


class StepSchema(Schema):
    class Meta:
        unknown = RAISE

    id = fields.String(required=True)
    action = fields.String(required=True)
    name = fields.String(validate=validate.Length(max=200))
    input = AnyJSON(load_default=dict)
    condition = AnyJSON(data_key="if")
    retry = fields.Nested(RetrySchema, load_default=lambda: RetrySchema().load({}))
    timeoutMs = fields.Integer(
        load_default=DEFAULT_STEP_TIMEOUT_MS, validate=validate.Range(1, 24 * 3600 * 1000), strict=True
    )
    # Absent: the step before it (the first step: none); [] runs it as soon as the run starts.
    needs = fields.List(fields.String(), validate=validate.Length(max=200))
    # Fan-out: the step runs once per item of the list this template renders to (no default is
    # stored: a step without forEach keeps its exact stored form).
    forEach = fields.String(error_messages={"invalid": FOR_EACH_HINT})
    maxParallel = fields.Integer(validate=validate.Range(1, MAX_PARALLEL), strict=True)

    @validates("forEach")
    def _for_each(self, value: str, **_: Any) -> None:
        if not templating.has_template(value):
            raise ValidationError(FOR_EACH_HINT)
        for _path, message in templating.check_syntax(value):
            raise ValidationError(message)

    @validates_schema
    def _max_parallel(self, data: dict[str, Any], **_: Any) -> None:
        if "maxParallel" in data and "forEach" not in data:
            message = "maxParallel needs forEach (it bounds how many items run at once)"
            raise ValidationError(message, "maxParallel")

    @validates("id")
    def _id(self, value: str, **_: Any) -> None:
        if not STEP_ID.match(value):
            raise ValidationError(f"Invalid step id {value!r}: use ^[a-z0-9][a-z0-9_-]{{0,63}}$")

    @validates("action")
    def _action(self, value: str, **_: Any) -> None:
        if actions.get(value) is None:
            raise ValidationError(f"Unknown action {value!r}; known: {', '.join(actions.names())}")


class WebhookTriggerSchema(Schema):
    class Meta:
        unknown = RAISE

    scheme = fields.String(load_default="standard", validate=validate.OneOf(webhooks.SCHEMES))
    secret = fields.String(validate=validate.Length(1, 500))
    secrets = fields.List(fields.String(validate=validate.Length(1, 500)), validate=validate.Length(1, 5))
    header = fields.String(validate=validate.Length(1, 100))

    @validates_schema
    def _secret(self, data: dict[str, Any], **_: Any) -> None:
        if not data.get("secret") and not data.get("secrets"):
            raise ValidationError("a webhook trigger needs a secret (or secrets, newest first)", "secret")


class ScheduleTriggerSchema(Schema):
    class Meta:
        unknown = RAISE

    cron = fields.String(required=True, validate=validate.Length(1, 200))
    timezone = fields.String(load_default="UTC")
    input = fields.Dict(keys=fields.String(), load_default=dict)

    @validates_schema
    def _cron(self, data: dict[str, Any], **_: Any) -> None:
        problem = schedules.check(data["cron"], data["timezone"])
        if problem:
            raise ValidationError(problem, "timezone" if "timezone" in problem else "cron")


class TriggersSchema(Schema):
    class Meta:
        unknown = RAISE

    webhook = fields.Nested(WebhookTriggerSchema)
    schedule = fields.Nested(ScheduleTriggerSchema)


class ConcurrencySchema(Schema):
    """At most ``limit`` runs of the workflow per rendered ``key`` (no key: of the workflow) at once."""

    class Meta:
        unknown = RAISE

    key = fields.String(validate=validate.Length(1, 500))
    limit = fields.Integer(required=True, validate=validate.Range(1, 10_000), strict=True)


class DefinitionSchema(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(required=True, validate=validate.Length(1, 200))
    description = fields.String(validate=validate.Length(max=2000))
    steps = fields.List(fields.Nested(StepSchema), required=True, validate=validate.Length(1, 200))
    output = AnyJSON()
    timeoutMs = fields.Integer(validate=validate.Range(1, 30 * 24 * 3600 * 1000), strict=True)
    triggers = fields.Nested(TriggersSchema)
    concurrency = fields.Nested(ConcurrencySchema)

    @validates_schema
    def _steps(self, data: dict[str, Any], **_: Any) -> None:
        errors: dict[str, Any] = {}
        seen: set[str] = set()
        steps = data.get("steps", [])
        known = {step["id"] for step in steps}
        for index, step in enumerate(steps):
            if step["id"] in seen:
                errors.setdefault(str(index), {})["id"] = [f"Duplicate step id {step['id']!r}"]
            seen.add(step["id"])
            problem = needs_problem(step, known)
            if problem:
                errors.setdefault(str(index), {})["needs"] = [problem]
            problem = idempotency_key_problem(step)
            if problem:
                errors.setdefault(str(index), {})["input.idempotencyKey"] = [problem]
            for field_name, value in (("input", step.get("input")), ("if", step.get("condition"))):
                for path, message in templating.check_syntax(value):
                    key = f"{field_name}.{path}" if path else field_name
                    errors.setdefault(str(index), {})[key] = [message]
        problems: dict[str, Any] = {}
        if not errors and len(seen) == len(steps):
            cycle = find_cycle(steps)
            if cycle:
                first = next(i for i, step in enumerate(steps) if step["id"] == cycle[0])
                errors[str(first)] = {"needs": [f"Steps form a cycle: {' → '.join(cycle)}"]}
        if errors:
            problems["steps"] = errors
        for path, message in templating.check_syntax(data.get("output")):
            problems[f"output.{path}" if path else "output"] = [message]
        for _path, message in templating.check_syntax((data.get("concurrency") or {}).get("key")):
            problems["concurrency.key"] = [message]
        if problems:
            raise ValidationError(problems)


def needs_problem(step: dict[str, Any], known: set[str]) -> str | None:
    """A step's ``needs``: ids of other steps of the workflow, each once."""
    needs = step.get("needs")
    if needs is None:
        return None
    if step["id"] in needs:
        return f"Step {step['id']!r} cannot need itself"
    unknown = [n for n in needs if n not in known]
    if unknown:
        return f"Unknown step {unknown[0]!r} in needs"
    if len(set(needs)) != len(needs):
        return "A step is named twice in needs"
    return None


IDEMPOTENCY_KEY_MAX = 255


def idempotency_key_problem(step: dict[str, Any]) -> str | None:
    """``http.request``'s ``idempotencyKey``: ``false`` (no header), ``true`` (the default
    ``<run id>:<step id>``) or a string (a template allowed) of 1 to 255 printable characters."""
    params = step.get("input")
    if step.get("action") != "http.request" or not isinstance(params, dict) or "idempotencyKey" not in params:
        return None
    value = params["idempotencyKey"]
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and 1 <= len(value) <= IDEMPOTENCY_KEY_MAX and value.isprintable():
        return None
    return (
        "idempotencyKey must be false (send no Idempotency-Key), true (the default, "
        f"<run id>:<step id>) or a string of 1 to {IDEMPOTENCY_KEY_MAX} printable characters "
        "(templates allowed)"
    )


def flatten(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    """Marshmallow's nested messages as ``{"steps.1.id": ["…"]}``."""
    flat: dict[str, list[str]] = {}
    if isinstance(messages, dict):
        for key, value in messages.items():
            name = str(key) if key != "_schema" else ""
            path = f"{prefix}.{name}" if prefix and name else (prefix or name or "_schema")
            flat.update(flatten(value, path))
    elif isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        flat.setdefault(prefix or "_schema", []).extend(messages)
    elif isinstance(messages, list):
        for index, value in enumerate(messages):
            flat.update(flatten(value, f"{prefix}.{index}" if prefix else str(index)))
    else:
        flat.setdefault(prefix or "_schema", []).append(str(messages))
    return flat


def validate_definition(payload: Any) -> dict[str, Any]:
    """Validate and normalise a definition; raise ``VALIDATION_ERROR`` naming each bad field."""
    if not isinstance(payload, dict):
        raise BatonValidationError("Workflow definition must be a JSON object")
    try:
        loaded = DefinitionSchema().load(payload)
    except ValidationError as exc:
        details = flatten(exc.messages)
        first = next(iter(details.items()))
        raise BatonValidationError(
            f"Invalid workflow definition: {first[0]}: {first[1][0]}", details=details
        ) from exc
    # Store the normalised form with the public key names.
    for step in loaded["steps"]:
        if "condition" in step:
            step["if"] = step.pop("condition")
    return loaded
