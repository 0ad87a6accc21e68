"""Companies and API keys: keys are shown once and stored only as a SHA-256 hash; each has scopes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import Database, autocommitted
from app.errors import NotFound, ValidationError
from app.ids import new_short_id
from app.timeutil import utcnow
from models import ApiKey, Company

KEY_PREFIX = "bk_"
_LAST_USED_RESOLUTION = timedelta(minutes=1)

RUNS_READ = "runs:read"
RUNS_WRITE = "runs:write"
WORKFLOWS_WRITE = "workflows:write"
SECRETS_WRITE = "secrets:write"
ADMIN = "admin"
SCOPES = (RUNS_READ, RUNS_WRITE, WORKFLOWS_WRITE, SECRETS_WRITE, ADMIN)


@dataclass(frozen=True)
class Principal:
    """Who a valid key speaks for: its company, its id and its scopes."""

    company_id: str
    key_id: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """``admin`` holds every scope."""
        return ADMIN in self.scopes or scope in self.scopes


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def scope_list(row: ApiKey) -> list[str]:
    """A key's scopes as a list, in the canonical order."""
    return [s for s in row.scopes.split(",") if s]


def normalize_scopes(scopes: Iterable[str]) -> str:
    """Validate scopes and store them in canonical order; an unknown or empty list is a 400."""
    given = list(scopes)
    unknown = [s for s in given if s not in SCOPES]
    if unknown or not given:
        problem = f"Unknown scope: {unknown[0]}" if unknown else "At least one scope is required"
        allowed = f"{problem} (allowed: {', '.join(SCOPES)})"
        raise ValidationError(f"Invalid scopes: {allowed}", details={"scopes": [allowed]})
    return ",".join(s for s in SCOPES if s in given)


def get_or_create_company(session: Session, name: str) -> Company:
    company = session.execute(select(Company).where(Company.name == name)).scalar_one_or_none()
    if company is None:
        company = Company(id=new_short_id("co"), name=name, created_at=utcnow())
        session.add(company)
        session.flush()
    return company


def issue_key(
    session: Session, company_id: str, name: str = "default", scopes: Iterable[str] = (ADMIN,)
) -> tuple[ApiKey, str]:
    """A new key row and the key in clear; this is the only time the key exists in clear."""
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(24)}"
    row = ApiKey(
        id=new_short_id("key"),
        company_id=company_id,
        name=name,
        prefix=prefix,
        hash=_digest(key),
        created_at=utcnow(),
        scopes=normalize_scopes(scopes),
    )
    session.add(row)
    session.flush()
    return row, key


def create_key(
    session: Session, company: Company, name: str = "default", scopes: Iterable[str] = (ADMIN,)
) -> str:
    """Create a key for ``company`` (admin unless ``scopes`` says otherwise) and return it in clear."""
    return issue_key(session, company.id, name, scopes)[1]


# Verified keys, by digest, for at most CACHE_TTL_S: a burst of requests then costs one database
# round trip for authentication, and a key revoked in another process is refused within that time
# (the issue asks for 1 s; half of it leaves room for the request that is already on its way).
CACHE_TTL_S = 0.5
_verified: dict[str, tuple[Principal, float]] = {}
_checking: dict[str, threading.Lock] = {}
_checking_lock = threading.Lock()


def verified(key: str) -> Principal | None:
    """The principal of a key this process verified less than CACHE_TTL_S ago; None when it has to
    be checked (``authenticate``)."""
    cached = _verified.get(_digest(key))
    if cached is not None and cached[1] > time.monotonic():
        return cached[0]
    return None


def authenticate(session: Session, key: str | None) -> Principal | None:
    """The principal of a valid, unrevoked key; None otherwise (constant-time comparison)."""
    return _verify(key, lambda key: _authenticate(session, key))


def authenticate_on(db: Database, key: str | None) -> Principal | None:
    """``authenticate`` for a request path that holds no ORM session: the key's row is read in one
    autocommit statement on the driver's connection (one round trip instead of BEGIN, SELECT and
    ROLLBACK); a session, and its commit, only when ``lastUsedAt`` is due (once a minute)."""
    return _verify(key, lambda key: _authenticate_row(db, key))


_KEY_ROW = "SELECT id, company_id, hash, scopes, revoked_at, last_used_at FROM api_keys WHERE prefix = %s"


def _authenticate_row(db: Database, key: str) -> Principal | None:
    prefix = key[len(KEY_PREFIX) :].split("_", 1)[0]
    row = autocommitted(db, _KEY_ROW, (prefix,), lambda cursor: cursor.fetchone())
    if row is None:
        return None
    key_id, company_id, digest, scopes, revoked_at, last_used_at = row
    if revoked_at is not None or not hmac.compare_digest(digest, _digest(key)):
        return None
    if last_used_at is None or utcnow() - last_used_at > _LAST_USED_RESOLUTION:
        with db.session() as session:
            return _authenticate(session, key)
    return Principal(company_id, key_id, frozenset(s for s in scopes.split(",") if s))


def _verify(key: str | None, check: Callable[[str], Principal | None]) -> Principal | None:
    """The cached principal of ``key``, else ``check``'s answer (cached when it is a principal)."""
    if not key or not key.startswith(KEY_PREFIX) or len(key) > 200 or not key.isprintable():
        return None
    digest = _digest(key)
    cached = _verified.get(digest)
    if cached is not None and cached[1] > time.monotonic():
        return cached[0]
    # One thread checks an expired key while the others wait for its answer: the requests that
    # arrive together when an entry expires would otherwise all query it (profiled under load).
    with _checking_lock:
        if len(_checking) > 10_000:
            _checking.clear()
        lock = _checking.setdefault(digest, threading.Lock())
    with lock:
        cached = _verified.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        principal = check(key)
        if principal is not None:
            if len(_verified) > 10_000:
                _verified.clear()
            _verified[digest] = (principal, time.monotonic() + CACHE_TTL_S)
    return principal


def _authenticate(session: Session, key: str) -> Principal | None:
    prefix = key[len(KEY_PREFIX) :].split("_", 1)[0]
    row = session.execute(select(ApiKey).where(ApiKey.prefix == prefix)).scalar_one_or_none()
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.hash, _digest(key)):
        return None
    return _principal(session, row)


# Dashboard sessions hold a key's id, never the key: they are re-checked by id, cached the same way.
_verified_ids: dict[str, tuple[Principal, float]] = {}


def authenticate_id(session: Session, key_id: str) -> Principal | None:
    """The principal of an unrevoked key, by its id (a signed-in dashboard session re-checks it)."""
    cached = _verified_ids.get(key_id)
    if cached is not None and cached[1] > time.monotonic():
        return cached[0]
    row = session.get(ApiKey, key_id)
    if row is None or row.revoked_at is not None:
        _verified_ids.pop(key_id, None)
        return None
    principal = _principal(session, row)
    if len(_verified_ids) > 10_000:
        _verified_ids.clear()
    _verified_ids[key_id] = (principal, time.monotonic() + CACHE_TTL_S)
    return principal


def _principal(session: Session, row: ApiKey) -> Principal:
    """A verified key's principal; ``lastUsedAt`` is kept to the minute."""
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
        session.commit()
    return Principal(row.company_id, row.id, frozenset(scope_list(row)))


def list_keys(session: Session, company_id: str) -> list[ApiKey]:
    """A company's unrevoked keys, newest first."""
    query = (
        select(ApiKey)
        .where(ApiKey.company_id == company_id, ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
    )
    return list(session.execute(query).scalars())


def _own_key(session: Session, company_id: str, key_id: str) -> ApiKey:
    """An unrevoked key of this company; another company's key or a revoked one is a 404."""
    row = session.execute(
        select(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.company_id == company_id, ApiKey.revoked_at.is_(None))
        .with_for_update()
    ).scalar_one_or_none()
    if row is None:
        raise NotFound("API key not found")
    return row


def rotate_key(session: Session, company_id: str, key_id: str) -> tuple[ApiKey, str]:
    """A new key with the old one's name and scopes; the old one is revoked in the same commit."""
    old = _own_key(session, company_id, key_id)
    old.revoked_at = utcnow()
    row, key = issue_key(session, company_id, old.name, scope_list(old))
    session.commit()
    _forget(old.company_id)
    return row, key


def revoke_key(session: Session, company_id: str, key_id: str) -> ApiKey:
    """Revoke one of this company's keys by id."""
    row = _own_key(session, company_id, key_id)
    row.revoked_at = utcnow()
    session.commit()
    _forget(row.company_id)
    return row


def revoke(session: Session, prefix: str) -> bool:
    """Revoke a key by its prefix: at once in this process, within CACHE_TTL_S in the others."""
    row = session.execute(select(ApiKey).where(ApiKey.prefix == prefix)).scalar_one_or_none()
    if row is None:
        return False
    row.revoked_at = utcnow()
    session.commit()
    _forget(row.company_id)
    return True


def _forget(company_id: str) -> None:
    """Drop this process's cached verifications of a company's keys (the next request re-checks)."""
    for cache in (_verified, _verified_ids):
        stale = [k for k, (principal, _) in list(cache.items()) if principal.company_id == company_id]
        for cache_key in stale:
            cache.pop(cache_key, None)
