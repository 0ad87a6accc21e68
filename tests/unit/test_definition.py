"""Workflow definitions (app/definition.py): defaults, ids, duplicates, errors naming the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

import workers.actions  # noqa: F401  (registers the built-in actions, as the app factory does)
from app.definition import validate_definition
from app.errors import ValidationError

DEFAULT_RETRY = {"maxAttempts": 1, "backoff": "exponential", "initialDelayMs": 1000, "maxDelayMs": 60000}


def definition(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "test", "steps": list(steps) or [{"id": "a", "action": "transform"}], **extra}


def step(step_id: str = "a", **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "action": "transform", **extra}


def refused(payload: Any) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        validate_definition(payload)
    error = caught.value
    assert (error.code, error.status) == ("VALIDATION_ERROR", 400)
    return error


# --------------------------------------------------------------------------- defaults


def test_step_defaults():
    loaded = validate_definition(definition(step("a")))
    assert loaded == {
        "name": "test",
        "steps": [
            {"id": "a", "action": "transform", "input": {}, "retry": DEFAULT_RETRY, "timeoutMs": 300000}
        ],
    }


def test_partial_retry_gets_the_remaining_defaults():
    loaded = validate_definition(definition(step("a", retry={"maxAttempts": 3})))
    assert loaded["steps"][0]["retry"] == {**DEFAULT_RETRY, "maxAttempts": 3}


def test_explicit_values_are_kept():
    retry = {"maxAttempts": 5, "backoff": "linear", "initialDelayMs": 10, "maxDelayMs": 20}
    source = definition(
        step("a", retry=retry, timeoutMs=30000, name="Notify", input={"x": "{{ input.x }}"}),
        output={"r": "{{ steps.a.output }}"},
        timeoutMs=3600000,
        description="d",
    )
    loaded = validate_definition(source)
    assert loaded["steps"][0] == {
        "id": "a",
        "action": "transform",
        "name": "Notify",
        "input": {"x": "{{ input.x }}"},
        "retry": retry,
        "timeoutMs": 30000,
    }
    assert loaded["output"] == {"r": "{{ steps.a.output }}"}
    assert loaded["timeoutMs"] == 3600000
    assert loaded["description"] == "d"


def test_if_keeps_its_public_name():
    loaded = validate_definition(definition(step("a", **{"if": "{{ input.go }}"}), step("b")))
    assert loaded["steps"][0]["if"] == "{{ input.go }}"
    assert "condition" not in loaded["steps"][0]
    assert "if" not in loaded["steps"][1]


@pytest.mark.parametrize("value", [False, 0, "", [], {"k": "v"}])
def test_if_accepts_any_json_value(value):
    assert validate_definition(definition(step("a", **{"if": value})))["steps"][0]["if"] == value


def test_the_payload_is_not_mutated():
    payload = definition(step("a", **{"if": "{{ true }}"}))
    before = copy.deepcopy(payload)
    validate_definition(payload)
    assert payload == before


def test_trigger_defaults():
    loaded = validate_definition(
        definition(triggers={"webhook": {"secret": "whsec_x"}, "schedule": {"cron": "0 9 * * *"}})
    )
    assert loaded["triggers"] == {
        "webhook": {"scheme": "standard", "secret": "whsec_x"},
        "schedule": {"cron": "0 9 * * *", "timezone": "UTC", "input": {}},
    }


# --------------------------------------------------------------------------- step ids


@pytest.mark.parametrize("step_id", ["a", "0", "notify-team", "create_contact", "a1-b2_c3", "a" * 64])
def test_valid_step_ids(step_id):
    assert validate_definition(definition(step(step_id)))["steps"][0]["id"] == step_id


@pytest.mark.parametrize(
    "step_id", ["", "A", "Notify", "-a", "_a", "a b", "a.b", "a/b", "é", "a" * 65, "a\x00", " a"]
)
def test_invalid_step_ids(step_id):
    error = refused(definition(step("first"), step(step_id)))
    assert list(error.details) == ["steps.1.id"]
    assert error.details["steps.1.id"] == [f"Invalid step id {step_id!r}: use ^[a-z0-9][a-z0-9_-]{{0,63}}$"]
    assert error.message.startswith("Invalid workflow definition: steps.1.id: Invalid step id")


@pytest.mark.parametrize("step_id", [5, None, ["a"]])
def test_step_id_must_be_a_string(step_id):
    assert "steps.0.id" in refused(definition({"id": step_id, "action": "transform"})).details


def test_a_trailing_newline_is_not_a_valid_step_id():
    refused(definition(step("a\n")))


def test_a_trailing_newline_is_not_a_valid_workflow_id():
    from app.ids import WORKFLOW_ID

    assert WORKFLOW_ID.match("wf_invoice-paid")
    assert not WORKFLOW_ID.match("wf_invoice-paid\n")


def test_duplicate_step_ids_are_named_where_they_repeat():
    error = refused(definition(step("a"), step("b"), step("a"), step("b")))
    assert error.details == {
        "steps.2.id": ["Duplicate step id 'a'"],
        "steps.3.id": ["Duplicate step id 'b'"],
    }


# --------------------------------------------------------------------------- other fields


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        ({"steps": [step()]}, "name", "Missing data for required field."),
        ({"name": "x"}, "steps", "Missing data for required field."),
        ({"name": "x", "steps": []}, "steps", "Length must be between 1 and 200."),
        ({"name": "", "steps": [step()]}, "name", "Length must be between 1 and 200."),
        (definition(step(), bogus=1), "bogus", "Unknown field."),
        (definition(step("a", bogus=1)), "steps.0.bogus", "Unknown field."),
        (definition({"id": "a"}), "steps.0.action", "Missing data for required field."),
        (definition(step("a", retry={"maxAttempts": 0})), "steps.0.retry.maxAttempts", None),
        (definition(step("a", retry={"maxAttempts": 101})), "steps.0.retry.maxAttempts", None),
        (
            definition(step("a", retry={"maxAttempts": "3"})),
            "steps.0.retry.maxAttempts",
            "Not a valid integer.",
        ),
        (
            definition(step("a", retry={"maxAttempts": True})),
            "steps.0.retry.maxAttempts",
            "Not a valid integer.",
        ),
        (definition(step("a", retry={"backoff": "random"})), "steps.0.retry.backoff", None),
        (definition(step("a", retry={"tries": 2})), "steps.0.retry.tries", "Unknown field."),
        (
            definition(step("a", retry={"initialDelayMs": 5000, "maxDelayMs": 1000})),
            "steps.0.retry.maxDelayMs",
            "maxDelayMs must be at least initialDelayMs",
        ),
        (definition(step("a", timeoutMs=0)), "steps.0.timeoutMs", None),
        (definition(step("a", timeoutMs=1.5)), "steps.0.timeoutMs", "Not a valid integer."),
        (definition(step("a"), timeoutMs=0), "timeoutMs", None),
    ],
)
def test_errors_name_the_field(payload, field, message):
    error = refused(payload)
    assert field in error.details, error.details
    if message is not None:
        assert error.details[field] == [message]
    assert error.message.startswith("Invalid workflow definition: ")


def test_unknown_action_lists_the_known_ones():
    error = refused(definition(step("a"), {"id": "b", "action": "no.such.action"}))
    (message,) = error.details["steps.1.action"]
    assert message.startswith("Unknown action 'no.such.action'; known: ")
    for name in ("http.request", "transform", "fail", "delay", "approval"):
        assert name in message


def test_every_bad_field_is_reported_at_once():
    error = refused(definition(step("A"), step("b", retry={"backoff": "x"}), {"id": "c", "action": "nope"}))
    assert {"steps.0.id", "steps.1.retry.backoff", "steps.2.action"} <= set(error.details)


@pytest.mark.parametrize("payload", [None, [], "workflow", 42])
def test_a_definition_must_be_an_object(payload):
    error = refused(payload)
    assert error.message == "Workflow definition must be a JSON object"


# --------------------------------------------------------------------------- templates


def test_template_syntax_errors_name_the_field():
    error = refused(
        definition(
            step("a", input={"json": {"text": "{{ oops"}}),
            step("b", **{"if": "{% if %}"}),
            output={"r": ["ok", "{{ bad"]},
        )
    )
    assert set(error.details) == {"steps.0.input.json.text", "steps.1.if", "output.r.1"}
    assert all(m[0].startswith("template syntax error: ") for m in error.details.values())


def test_undefined_names_are_checked_at_run_time_not_here():
    validate_definition(definition(step("a", input={"x": "{{ steps['later'].output.id }}"})))


# --------------------------------------------------------------------------- triggers


@pytest.mark.parametrize(
    ("triggers", "field"),
    [
        ({"webhook": {"scheme": "standard"}}, "triggers.webhook.secret"),
        ({"webhook": {"scheme": "md5", "secret": "x"}}, "triggers.webhook.scheme"),
        ({"webhook": {"secrets": []}}, "triggers.webhook.secrets"),
        ({"webhook": {"secrets": ["a", "b", "c", "d", "e", "f"]}}, "triggers.webhook.secrets"),
        ({"webhook": {"secret": "x", "extra": 1}}, "triggers.webhook.extra"),
        ({"schedule": {}}, "triggers.schedule.cron"),
        ({"schedule": {"cron": "61 * * * *"}}, "triggers.schedule.cron"),
        ({"schedule": {"cron": "* * * *"}}, "triggers.schedule.cron"),
        ({"schedule": {"cron": "0 9 * * *", "timezone": "Mars/Olympus"}}, "triggers.schedule.timezone"),
        ({"email": {}}, "triggers.email"),
    ],
)
def test_trigger_errors_name_the_field(triggers, field):
    assert field in refused(definition(triggers=triggers)).details


def test_schedule_error_messages():
    error = refused(definition(triggers={"schedule": {"cron": "0 9 * * *", "timezone": "Mars/Olympus"}}))
    assert error.details["triggers.schedule.timezone"] == ["unknown timezone 'Mars/Olympus'"]
    error = refused(definition(triggers={"schedule": {"cron": "61 * * * *"}}))
    assert error.details["triggers.schedule.cron"] == ["invalid cron expression '61 * * * *'"]


def test_valid_triggers():
    loaded = validate_definition(
        definition(
            triggers={
                "webhook": {"scheme": "hmac-sha256", "secrets": ["new", "old"], "header": "X-Sig"},
                "schedule": {"cron": "*/15 * * * * *", "timezone": "Europe/Berlin", "input": {"k": 1}},
            }
        )
    )
    assert loaded["triggers"]["webhook"] == {
        "scheme": "hmac-sha256",
        "secrets": ["new", "old"],
        "header": "X-Sig",
    }
    assert loaded["triggers"]["schedule"] == {
        "cron": "*/15 * * * * *",
        "timezone": "Europe/Berlin",
        "input": {"k": 1},
    }
