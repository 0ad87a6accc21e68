"""Dashboard sign-in: server-side sessions in Redis; the cookie holds only an opaque random id."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from flask import Response, request

from app import keys
from app.keys import Principal
from app.services import Services

COOKIE = "baton_session"
LOGIN_COOKIE = "baton_login"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
TTL_S = 12 * 3600
LOGIN_TTL_S = 15 * 60
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class DashboardSession:
    """What the server keeps for a signed-in browser: whose key (by id, never the key) and its CSRF token."""

    key_id: str
    company_id: str
    company_name: str
    key_label: str
    csrf: str


def _redis_key(services: Services, sid: str) -> str:
    # Only a hash of the id is stored, so reading Redis does not yield usable cookies.
    return services.key("dashboard", "session", hashlib.sha256(sid.encode()).hexdigest())


def create(services: Services, session: DashboardSession) -> str:
    """Store a new session and return its opaque id (the cookie's value)."""
    sid = secrets.token_urlsafe(32)
    services.redis.set(_redis_key(services, sid), json.dumps(asdict(session)), ex=TTL_S)
    return sid


def load(services: Services, sid: str | None) -> DashboardSession | None:
    """The session behind a cookie value, its lifetime renewed; None when unknown or expired."""
    if not sid or len(sid) > 100:
        return None
    key = _redis_key(services, sid)
    raw = services.redis.get(key)
    if raw is None:
        return None
    services.redis.expire(key, TTL_S)
    return DashboardSession(**json.loads(raw))


def delete(services: Services, sid: str | None) -> None:
    if sid:
        services.redis.delete(_redis_key(services, sid))


def current(services: Services) -> tuple[DashboardSession, Principal] | None:
    """The request's session and its key's principal; a session whose key was revoked ends here."""
    sid = request.cookies.get(COOKIE)
    found = load(services, sid)
    if found is None:
        return None
    with services.db.session() as db:
        principal = keys.authenticate_id(db, found.key_id)
    if principal is None:
        delete(services, sid)
        return None
    return found, principal


def csrf_ok(found: DashboardSession, *, form: bool = False) -> bool:
    """An unsafe request carries the session's CSRF token: a header (scripts), or a field (forms)."""
    sent = request.headers.get(CSRF_HEADER) or (request.form.get(CSRF_FIELD) if form else None) or ""
    return hmac.compare_digest(sent.encode(), found.csrf.encode())


def new_csrf() -> str:
    return secrets.token_urlsafe(24)


def secure_cookie() -> bool:
    """Secure unless this is plain http on a loopback address (a browser would drop it there)."""
    if request.is_secure:
        return True
    host = urlsplit(f"//{request.host}").hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def set_cookie(response: Response, name: str, value: str, max_age: int, path: str = "/") -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=path, httponly=True, samesite="Lax", secure=secure_cookie()
    )


def clear_cookie(response: Response, name: str, path: str = "/") -> None:
    response.delete_cookie(name, path=path, httponly=True, samesite="Lax", secure=secure_cookie())
