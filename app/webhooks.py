"""Webhook signature schemes: Standard Webhooks, GitHub, Stripe and a plain HMAC-SHA256 header."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

SCHEMES = ("standard", "github", "stripe", "hmac-sha256")
TOLERANCE_S = 300
# Schemes whose delivery id is covered by the signature; the others' id headers (X-GitHub-Delivery,
# X-Delivery-Id) can be changed by anyone who captured a delivery, so they cannot deduplicate.
SIGNED_ID_SCHEMES = ("standard", "stripe")
MAX_KEY_LENGTH = 255


class WebhookRejected(Exception):
    """The delivery is not authentic; the message says why (recorded in the delivery log)."""


def secrets_of(config: Mapping[str, Any]) -> list[str]:
    """``secret`` or ``secrets`` (a list, newest first, for rotation)."""
    found = config.get("secrets") or [config.get("secret")]
    return [s for s in found if isinstance(s, str) and s]


def _hmac_hex(secret: str, payload: bytes) -> str:
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def verify(
    config: Mapping[str, Any], headers: Mapping[str, str], body: bytes, payload: Any, now: float | None = None
) -> str | None:
    """Check the signature; return the sender's delivery id (None when the scheme has none)."""
    scheme = config.get("scheme", "standard")
    secrets = secrets_of(config)
    lower = {k.lower(): v for k, v in headers.items()}
    now = time.time() if now is None else now
    if scheme == "standard":
        for secret in secrets:
            try:
                Webhook(secret).verify(body, lower, json_parse=False)
                return lower["webhook-id"]
            except WebhookVerificationError as exc:
                reason = str(exc) or "invalid signature"
            except (ValueError, TypeError, UnicodeDecodeError, KeyError):
                reason = "malformed signature headers"
        raise WebhookRejected(reason if secrets else "no secret configured")
    if scheme == "github":
        header = lower.get("x-hub-signature-256")
        if not header or not header.startswith("sha256="):
            raise WebhookRejected("missing X-Hub-Signature-256")
        if not any(hmac.compare_digest(header[7:], _hmac_hex(s, body)) for s in secrets):
            raise WebhookRejected("signature does not match")
        return lower.get("x-github-delivery")
    if scheme == "stripe":
        header = lower.get("stripe-signature")
        if not header:
            raise WebhookRejected("missing Stripe-Signature")
        parts = [p.split("=", 1) for p in header.split(",") if "=" in p]
        timestamps = [v for k, v in parts if k.strip() == "t"]
        signatures = [v for k, v in parts if k.strip() == "v1"]
        if not timestamps or not timestamps[0].isdigit() or not signatures:
            raise WebhookRejected("malformed Stripe-Signature")
        if abs(now - int(timestamps[0])) > TOLERANCE_S:
            raise WebhookRejected("timestamp outside the tolerance")
        signed = timestamps[0].encode() + b"." + body
        if not any(hmac.compare_digest(sig, _hmac_hex(s, signed)) for s in secrets for sig in signatures):
            raise WebhookRejected("signature does not match")
        event_id = payload.get("id") if isinstance(payload, dict) else None
        return event_id if isinstance(event_id, str) else None
    if scheme == "hmac-sha256":
        name = str(config.get("header") or "x-signature").lower()
        value = lower.get(name, "")
        value = value[7:] if value.startswith("sha256=") else value
        if not value:
            raise WebhookRejected(f"missing {name} header")
        if not any(hmac.compare_digest(value, _hmac_hex(s, body)) for s in secrets):
            raise WebhookRejected("signature does not match")
        return lower.get("x-delivery-id") or lower.get("idempotency-key")
    raise WebhookRejected(f"unknown scheme {scheme!r}")


def dedupe_key(config: Mapping[str, Any], delivery_id: str | None, body: bytes) -> str:
    """The idempotency key of a verified delivery, built only from what its signature covers."""
    scheme = config.get("scheme", "standard")
    if scheme in SIGNED_ID_SCHEMES and delivery_id:
        key = f"webhook:{delivery_id}"
        # A long id is hashed rather than cut, so two ids sharing a prefix stay two deliveries.
        return key if len(key) <= MAX_KEY_LENGTH else f"webhook:id:{_sha256(delivery_id.encode())}"
    return f"webhook:{_sha256(body)}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Random per process: nothing verifies against it. A standard secret must be base64.
_DUMMY_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
_SCHEME_HEADERS = (
    ("webhook-signature", "standard"),
    ("stripe-signature", "stripe"),
    ("x-hub-signature-256", "github"),
)


def verify_nothing(headers: Mapping[str, str], body: bytes, payload: Any) -> None:
    """Do the work of checking the delivery's signature against a secret nobody has, so a delivery
    to a workflow that does not exist costs about what a refused one to a real workflow costs."""
    lower = {k.lower() for k in headers}
    scheme = next((s for header, s in _SCHEME_HEADERS if header in lower), "hmac-sha256")
    try:
        verify({"scheme": scheme, "secret": _DUMMY_SECRET}, headers, body, payload)
    except WebhookRejected:
        pass


# How a definition refers to a signing secret kept in the secrets store.
REFERENCE = re.compile(r"^\{\{ secrets\.([A-Za-z_][A-Za-z0-9_]{0,63}) \}\}\Z")


def referenced_names(config: Mapping[str, Any]) -> set[str]:
    """The secrets-store names a webhook trigger's ``secret``/``secrets`` refer to."""
    values = config.get("secrets") if isinstance(config.get("secrets"), list) else [config.get("secret")]
    return {m.group(1) for v in values if isinstance(v, str) and (m := REFERENCE.match(v))}


def with_values(config: Mapping[str, Any], values: Mapping[str, str]) -> dict[str, Any]:
    """``config`` with each reference replaced by its value (a reference to nothing is dropped)."""

    def value(v: Any) -> Any:
        found = REFERENCE.match(v) if isinstance(v, str) else None
        return values.get(found.group(1)) if found else v

    resolved = dict(config)
    if isinstance(resolved.get("secrets"), list):
        resolved["secrets"] = [value(v) for v in resolved["secrets"]]
    if "secret" in resolved:
        resolved["secret"] = value(resolved["secret"])
    return resolved


def _masked(value: str) -> str:
    """A known prefix (``whsec_``) and at most 4 real characters; nothing of a short secret or a
    reference to the secrets store."""
    if REFERENCE.match(value) or len(value) < 16:
        return "…"
    prefix = "whsec_" if value.startswith("whsec_") else ""
    return f"{prefix}…{value[-4:]}"


def mask(config: Mapping[str, Any]) -> dict[str, Any]:
    """A webhook trigger as the API shows it: secrets never in full."""
    shown = dict(config)
    for key in ("secret", "secrets"):
        if key in shown:
            values = shown[key] if isinstance(shown[key], list) else [shown[key]]
            # At most 4 real characters, and none of a short secret.
            masked = [_masked(str(v)) for v in values]
            shown[key] = masked if isinstance(shown[key], list) else masked[0]
    return shown
