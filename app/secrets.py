"""The secrets store: per-company values encrypted with Fernet (MultiFernet for key rotation).

``BATON_SECRETS_KEYS`` lists Fernet keys; the first encrypts, every one decrypts, so a new key is
put first and the old one kept until every secret has been written again. Without it a
development key is derived from ``SECRET_KEY``: production must set ``BATON_SECRETS_KEYS``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import threading
import time
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import webhooks
from app.config import Config
from app.errors import NotFound, ValidationError
from app.ids import new_id
from app.redaction import SENSITIVE_HEADERS
from app.timeutil import utcnow
from models import Secret

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
MAX_VALUE_BYTES = 64 * 1024
CACHE_TTL_S = 5.0

_cache: dict[str, tuple[float, dict[str, str]]] = {}
_cache_lock = threading.Lock()
_ciphers: dict[tuple[str, ...], MultiFernet] = {}


def dev_key(secret_key: str) -> str:
    """A Fernet key derived deterministically from ``SECRET_KEY`` (development only)."""
    digest = hashlib.sha256(b"baton-secrets:" + secret_key.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()


def cipher(config: Config) -> MultiFernet:
    """The MultiFernet of the configured keys (the first encrypts), built once per key set."""
    keys = config.secrets_keys or (dev_key(config.secret_key),)
    found = _ciphers.get(keys)
    if found is None:
        found = _ciphers[keys] = MultiFernet([Fernet(k.encode()) for k in keys])
    return found


def encrypt(config: Config, value: str) -> str:
    return cipher(config).encrypt(value.encode()).decode()


def decrypt(config: Config, token: str) -> str:
    return cipher(config).decrypt(token.encode()).decode()


def rotate(session: Session, config: Config, batch: int = 500) -> tuple[int, list[str]]:
    """Re-encrypt every stored secret with the first configured key (after a new key was put first),
    so the old key can then be dropped. Returns how many were rewritten, and the ids of those no
    configured key decrypts (left as they are)."""
    fernet, done, unreadable, after = cipher(config), 0, [], ""
    while True:
        rows = list(
            session.execute(
                select(Secret).where(Secret.id > after).order_by(Secret.id).limit(batch)
            ).scalars()
        )
        for row in rows:
            try:
                row.ciphertext = fernet.rotate(row.ciphertext.encode()).decode()
                done += 1
            except InvalidToken:
                unreadable.append(row.id)
        session.commit()
        if len(rows) < batch:
            return done, unreadable
        after = rows[-1].id


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ValidationError(
            "Invalid secret name", details={"name": ["Must match ^[A-Za-z_][A-Za-z0-9_]{0,63}$"]}
        )
    return name


def check_value(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError("Invalid value", details={"value": ["Must be a non-empty string."]})
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise ValidationError("Invalid value", details={"value": ["Must be at most 64 KiB."]})
    return value


def _upsert(session: Session, config: Config, company_id: str, name: str, value: str) -> Secret:
    """Write a secret's ciphertext in the session (not committed)."""
    token, now = encrypt(config, value), utcnow()
    row = _get(session, company_id, name)
    if row is None:
        row = Secret(id=new_id("sec"), company_id=company_id, name=name, created_at=now)
        session.add(row)
    row.ciphertext, row.updated_at = token, now
    return row


def put(session: Session, config: Config, company_id: str, name: str, value: Any) -> Secret:
    """Create or replace a secret (committed); only its ciphertext is stored."""
    check_name(name)
    check_value(value)
    try:
        row = _upsert(session, config, company_id, name, value)
        session.commit()
    except IntegrityError:  # created concurrently by another request: update that one
        session.rollback()
        row = _upsert(session, config, company_id, name, value)
        session.commit()
    forget(company_id)
    return row


def list_(session: Session, company_id: str) -> list[Secret]:
    """The company's secrets by name (callers show names and timestamps only)."""
    query = select(Secret).where(Secret.company_id == company_id).order_by(Secret.name)
    return list(session.execute(query).scalars())


def delete(session: Session, company_id: str, name: str) -> Secret:
    row = _get(session, company_id, name) if NAME.match(name) else None
    if row is None:
        raise NotFound("Secret not found")
    session.delete(row)
    session.commit()
    forget(company_id)
    return row


def values_for(session: Session, config: Config, company_id: str) -> dict[str, str]:
    """The company's decrypted secrets, cached in this process for a few seconds."""
    now = time.monotonic()
    cached = _cache.get(company_id)
    if cached is not None and cached[0] > now:
        return cached[1]
    rows = session.execute(
        select(Secret.name, Secret.ciphertext).where(Secret.company_id == company_id)
    ).all()
    values = {}
    for name, token in rows:
        try:
            values[name] = decrypt(config, token)
        except InvalidToken:
            continue  # encrypted with a key no longer configured: as if absent
    with _cache_lock:
        _cache[company_id] = (now + CACHE_TTL_S, values)
    return values


def forget(company_id: str) -> None:
    """Drop this process's cached values of a company (after a write)."""
    with _cache_lock:
        _cache.pop(company_id, None)


def _stored_as_reference(session: Session, config: Config, company_id: str, kind: str, value: str) -> str:
    """Store ``value`` under a name derived from it (keyed, so the name reveals nothing; saving the
    same value again reuses it) and return the template reference that replaces it."""
    key = (config.secrets_keys or (dev_key(config.secret_key),))[0]
    digest = hmac.new(key.encode(), f"{company_id}:{value}".encode(), hashlib.sha256).hexdigest()[:20]
    name = f"_{kind}_{digest.upper()}"
    _upsert(session, config, company_id, name, value)
    return "{{ secrets." + name + " }}"


def _is_literal(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and "{{" not in value


def store_literal_credentials(
    session: Session, config: Config, company_id: str, definition: dict[str, Any]
) -> None:
    """Move literal sensitive headers of ``http.request`` steps and webhook signing secrets into
    the store (in the session): the definition keeps references, so no version holds them in clear."""
    for step in definition.get("steps") or []:
        headers = step.get("input", {}).get("headers") if step.get("action") == "http.request" else None
        if not isinstance(headers, dict):
            continue
        for header, value in headers.items():
            if str(header).lower() in SENSITIVE_HEADERS and _is_literal(value):
                headers[header] = _stored_as_reference(session, config, company_id, "HEADER", value)
    webhook = (definition.get("triggers") or {}).get("webhook")
    if isinstance(webhook, dict):
        if _is_literal(webhook.get("secret")):
            webhook["secret"] = _stored_as_reference(
                session, config, company_id, "WEBHOOK", webhook["secret"]
            )
        if isinstance(webhook.get("secrets"), list):
            webhook["secrets"] = [
                _stored_as_reference(session, config, company_id, "WEBHOOK", v) if _is_literal(v) else v
                for v in webhook["secrets"]
            ]
    forget(company_id)


def resolve_webhook(services: Any, company_id: str, trigger: dict[str, Any]) -> dict[str, Any]:
    """A webhook trigger with its secret references replaced by their values, to verify with."""
    names = webhooks.referenced_names(trigger)
    if not names:
        return trigger
    with services.db.session() as session:
        values = values_for(session, services.config, company_id)
        if not names <= values.keys():  # written moments ago by another process: skip the cache
            forget(company_id)
            values = values_for(session, services.config, company_id)
    return webhooks.with_values(trigger, values)


def _get(session: Session, company_id: str, name: str) -> Secret | None:
    query = select(Secret).where(Secret.company_id == company_id, Secret.name == name)
    return session.execute(query).scalar_one_or_none()
