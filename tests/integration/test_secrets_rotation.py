"""Key rotation for the secrets store: after a new key is put first, ``rotate`` re-encrypts every
secret with it, so the old key can be dropped."""

from __future__ import annotations

from cryptography.fernet import Fernet
from sqlalchemy import select

from app import secrets
from app.services import Services
from models import Secret
from tests import factories


def test_rotate_reencrypts_every_secret_with_the_first_key(services: Services) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    # Other tests' secrets in this database were written with the session's key: keep it readable.
    session_keys = services.config.secrets_keys or (secrets.dev_key(services.config.secret_key),)
    before = services.config.with_overrides(secrets_keys=(old,))
    during = services.config.with_overrides(secrets_keys=(new, old, *session_keys))
    after = services.config.with_overrides(secrets_keys=(new,))
    with services.db.session() as session:
        company_id = factories.company(session).id
        for n in range(3):
            secrets.put(session, before, company_id, f"TOKEN_{n}", f"value-{n}")
        session.commit()
        assert secrets.rotate(session, during, batch=2) >= 3
        rows = session.execute(select(Secret).where(Secret.company_id == company_id)).scalars().all()
        assert sorted(Fernet(new.encode()).decrypt(r.ciphertext.encode()).decode() for r in rows) == [
            "value-0",
            "value-1",
            "value-2",
        ], "readable with the new key alone"
        secrets.forget(company_id)
        assert secrets.values_for(session, after, company_id) == {
            f"TOKEN_{n}": f"value-{n}" for n in range(3)
        }
