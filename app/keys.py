"""Companies and API keys: keys are shown once and stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.ids import new_short_id
from app.timeutil import utcnow
from models import ApiKey, Company

KEY_PREFIX = "bk_"
_LAST_USED_RESOLUTION = timedelta(minutes=1)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_company(session: Session, name: str) -> Company:
    company = session.execute(select(Company).where(Company.name == name)).scalar_one_or_none()
    if company is None:
        company = Company(id=new_short_id("co"), name=name, created_at=utcnow())
        session.add(company)
        session.flush()
    return company


def create_key(session: Session, company: Company, name: str = "default") -> str:
    """Create a key for ``company`` and return it; this is the only time it exists in clear."""
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(24)}"
    session.add(
        ApiKey(
            id=new_short_id("key"),
            company_id=company.id,
            name=name,
            prefix=prefix,
            hash=_digest(key),
            created_at=utcnow(),
        )
    )
    session.flush()
    return key


# Verified keys, by digest, for a few seconds: a request then costs no database round trip for
# authentication. A revoked key stops working within CACHE_TTL_S.
CACHE_TTL_S = 10.0
_verified: dict[str, tuple[str, float]] = {}


def authenticate(session: Session, key: str | None) -> str | None:
    """The company id for a valid, unrevoked key; None otherwise (constant-time comparison)."""
    if not key or not key.startswith(KEY_PREFIX) or len(key) > 200 or not key.isprintable():
        return None
    digest = _digest(key)
    cached = _verified.get(digest)
    if cached is not None and cached[1] > time.monotonic():
        return cached[0]
    company_id = _authenticate(session, key)
    if company_id is not None:
        if len(_verified) > 10_000:
            _verified.clear()
        _verified[digest] = (company_id, time.monotonic() + CACHE_TTL_S)
    return company_id


def _authenticate(session: Session, key: str) -> str | None:
    prefix = key[len(KEY_PREFIX) :].split("_", 1)[0]
    row = session.execute(select(ApiKey).where(ApiKey.prefix == prefix)).scalar_one_or_none()
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.hash, _digest(key)):
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
        session.commit()
    return row.company_id


def revoke(session: Session, prefix: str) -> bool:
    """Revoke a key by its prefix: at once in this process, within CACHE_TTL_S in the others."""
    row = session.execute(select(ApiKey).where(ApiKey.prefix == prefix)).scalar_one_or_none()
    if row is None:
        return False
    row.revoked_at = utcnow()
    session.commit()
    stale = [digest for digest, (company_id, _) in _verified.items() if company_id == row.company_id]
    for digest in stale:
        _verified.pop(digest, None)
    return True
