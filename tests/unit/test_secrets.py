"""Secrets: encryption with key rotation, name and value rules, and redaction."""

from __future__ import annotations

from urllib.parse import quote, quote_plus

import pytest
from cryptography.fernet import Fernet, InvalidToken

from app import redaction, secrets, webhooks
from app.config import Config
from app.errors import ValidationError

KEY_A = Fernet.generate_key().decode()
KEY_B = Fernet.generate_key().decode()


def test_keys_come_from_baton_secrets_keys_first_encrypts() -> None:
    config = Config.from_env({"BATON_SECRETS_KEYS": f" {KEY_B} , {KEY_A} "})
    assert config.secrets_keys == (KEY_B, KEY_A)
    token = secrets.encrypt(config, "v")
    assert Fernet(KEY_B.encode()).decrypt(token.encode()) == b"v"
    with pytest.raises(InvalidToken):
        Fernet(KEY_A.encode()).decrypt(token.encode())


def test_value_encrypted_with_a_decrypts_after_rotation_to_b_a() -> None:
    before = Config(secrets_keys=(KEY_A,))
    token = secrets.encrypt(before, "xoxb-the-token")
    assert "xoxb" not in token
    rotated = Config(secrets_keys=(KEY_B, KEY_A))
    assert secrets.decrypt(rotated, token) == "xoxb-the-token"
    with pytest.raises(InvalidToken):  # once A is dropped, A's tokens no longer decrypt
        secrets.decrypt(Config(secrets_keys=(KEY_B,)), token)


def test_without_keys_a_development_key_derived_from_secret_key() -> None:
    one, same, other = Config(secret_key="s1"), Config(secret_key="s1"), Config(secret_key="s2")
    token = secrets.encrypt(one, "value")
    assert secrets.decrypt(same, token) == "value"
    with pytest.raises(InvalidToken):
        secrets.decrypt(other, token)


@pytest.mark.parametrize("name", ["SLACK_TOKEN", "_x", "a" * 64, "A1_b2"])
def test_good_names(name: str) -> None:
    assert secrets.check_name(name) == name


@pytest.mark.parametrize("name", ["", "1ABC", "has-dash", "a" * 65, "sp ace", "x\n", "é"])
def test_bad_names_are_validation_errors(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        secrets.check_name(name)
    assert "name" in info.value.details


@pytest.mark.parametrize("value", ["", None, 5, ["x"], "x" * (64 * 1024 + 1)])
def test_bad_values_are_validation_errors(value: object) -> None:
    with pytest.raises(ValidationError) as info:
        secrets.check_value(value)
    assert "value" in info.value.details


def test_redaction_replaces_secret_values_inside_strings_and_url_encoded() -> None:
    secret = "s3cr3t/+&="
    forms = redaction.forms([secret])
    value = {
        "plain": f"Bearer {secret}",
        "url": f"https://h.example/x?q={quote(secret, safe='')}&other=1",
        "plus": f"text={quote_plus(secret)}",
        "nested": [{"deep": f"--{secret}--"}],
        secret: "as a key",
        "number": 5,
    }
    shown = redaction.deep(value, forms)
    text = repr(shown)
    assert secret not in text and quote(secret, safe="") not in text and quote_plus(secret) not in text
    assert shown["plain"] == "Bearer [REDACTED]"
    assert shown["nested"] == [{"deep": "--[REDACTED]--"}]
    assert shown["number"] == 5 and "[REDACTED]" in shown


@pytest.mark.parametrize(
    "param",
    ["token", "access_token", "api_key", "apikey", "key", "secret", "password", "signature", "sig", "auth"],
)
def test_credential_query_parameters_are_redacted_in_urls_and_messages(param: str) -> None:
    message = f"GET https://api.example/v1?page=2&{param.upper()}=abc123def&x=1 failed: 500"
    assert (
        redaction.text(message)
        == f"GET https://api.example/v1?page=2&{param.upper()}=[REDACTED]&x=1 failed: 500"
    )


def test_other_parameters_and_template_references_are_kept() -> None:
    assert redaction.text("https://h/?monkey=1&keys=2") == "https://h/?monkey=1&keys=2"
    assert redaction.text("https://h/?token={{ secrets.X }}") == "https://h/?token={{ secrets.X }}"
    assert redaction.text("https://u:pw123@h/x") == "https://u:[REDACTED]@h/x"


def test_http_request_record_redacts_sensitive_headers_case_insensitively() -> None:
    step_input = {
        "url": "https://h/?token=abc",
        "headers": {
            "AUTHORIZATION": "Bearer xyz",
            "cookie": "a=b",
            "X-Api-Key": "k",
            "Proxy-Authorization": "p",
        },
        "query": {"Access_Token": "t", "page": 2},
        "json": {"text": "hello"},
    }
    shown, output, error = redaction.step_record("http.request", step_input, {"ok": 1}, None, [])
    assert set(shown["headers"].values()) == {"[REDACTED]"}
    assert shown["query"] == {"Access_Token": "[REDACTED]", "page": 2}
    assert shown["url"] == "https://h/?token=[REDACTED]"
    assert shown["json"] == {"text": "hello"} and output == {"ok": 1} and error is None
    assert step_input["headers"]["AUTHORIZATION"] == "Bearer xyz"  # the action's own copy is untouched


def test_step_record_redacts_error_messages_and_outputs_with_secrets() -> None:
    forms = redaction.forms(["tok-123456"])
    error = {"code": "HTTP_ERROR", "message": "https://h/?x=tok-123456 answered 500"}
    _, output, shown = redaction.step_record("transform", {}, {"echo": "tok-123456"}, error, forms)
    assert shown["message"] == "https://h/?x=[REDACTED] answered 500"
    assert output == {"echo": "[REDACTED]"}


def test_definition_view_redacts_literal_credentials_and_keeps_references() -> None:
    definition = {
        "name": "n",
        "steps": [
            {
                "id": "a",
                "action": "http.request",
                "input": {
                    "url": "https://h/?token=literal&q=1",
                    "headers": {
                        "authorization": "Bearer literal",
                        "X-Api-Key": "{{ secrets.K }}",
                        "Accept": "x",
                    },
                    "query": {"apikey": "literal", "v": 1},
                },
            },
            {"id": "b", "action": "transform", "input": {"v": "Bearer literal"}},
        ],
    }
    shown = redaction.definition(definition)
    step = shown["steps"][0]["input"]
    assert step["headers"] == {"authorization": "[REDACTED]", "X-Api-Key": "{{ secrets.K }}", "Accept": "x"}
    assert step["url"] == "https://h/?token=[REDACTED]&q=1"
    assert step["query"] == {"apikey": "[REDACTED]", "v": 1}
    assert definition["steps"][0]["input"]["headers"]["authorization"] == "Bearer literal"


@pytest.mark.parametrize("secret", ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "short", "exactly12chr"])
def test_webhook_masks_show_at_most_four_characters(secret: str) -> None:
    shown = webhooks.mask({"scheme": "standard", "secrets": [secret], "secret": secret})
    for masked in (shown["secrets"][0], shown["secret"]):
        visible = masked.removeprefix("whsec_").replace("…", "")  # the scheme's prefix is no secret
        assert len(visible) <= 4 and (not visible or secret.endswith(visible))
        assert "…" in masked


def test_webhook_references_mask_to_nothing_and_resolve_to_their_values() -> None:
    references = ["{{ secrets._WEBHOOK_A }}", "literal-old", "{{ secrets.GONE }}"]
    config = {"scheme": "github", "secrets": references}
    assert webhooks.mask(config)["secrets"] == ["…", "…", "…"]
    assert webhooks.referenced_names(config) == {"_WEBHOOK_A", "GONE"}
    resolved = webhooks.with_values(config, {"_WEBHOOK_A": "new-value"})
    assert webhooks.secrets_of(resolved) == ["new-value", "literal-old"]
