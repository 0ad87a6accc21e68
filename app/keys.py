"""Companies and API keys: keys are shown once and stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
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


def authenticate(session: Session, key: str | None) -> str | None:
    """The company id for a valid, unrevoked key; None otherwise (constant-time comparison)."""
    if not key or not key.startswith(KEY_PREFIX) or len(key) > 200 or not key.isprintable():
        return None
    prefix = key[len(KEY_PREFIX) :].split("_", 1)[0]
    row = session.execute(select(ApiKey).where(ApiKey.prefix == prefix)).scalar_one_or_none()
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.hash, _digest(key)):
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
        session.commit()
    return row.company_id
