"""Key rotation for the secrets store: after a new key is put first, ``rotate`` re-encrypts every
secret with it, so the old key can be dropped."""

from __future__ import annotations

from click.testing import CliRunner
from cryptography.fernet import Fernet
from sqlalchemy import select

from app import secrets
from app.cli import cli
from app.services import Services
from models import Secret
from tests import factories


def _session_key(services: Services) -> str:
    """The key the rest of the suite writes with: rotating *to* it leaves every other secret readable
    (rotation rewrites every company's secrets)."""
    return (services.config.secrets_keys or (secrets.dev_key(services.config.secret_key),))[0]


def test_rotate_reencrypts_every_secret_with_the_first_key(services: Services) -> None:
    old, new = Fernet.generate_key().decode(), _session_key(services)
    before = services.config.with_overrides(secrets_keys=(old,))
    during = services.config.with_overrides(secrets_keys=(new, old))
    after = services.config.with_overrides(secrets_keys=(new,))
    with services.db.session() as session:
        company_id = factories.company(session).id
        for n in range(3):
            secrets.put(session, before, company_id, f"TOKEN_{n}", f"value-{n}")
        session.commit()
        done, unreadable = secrets.rotate(session, during, batch=2)
        assert done >= 3  # (other tests may have left secrets of keys of their own: "unreadable")
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


def test_baton_db_rotate_secrets_rewrites_them_with_the_first_key(services: Services) -> None:
    old, new = Fernet.generate_key().decode(), _session_key(services)
    with services.db.session() as session:
        company_id = factories.company(session).id
        secrets.put(
            session, services.config.with_overrides(secrets_keys=(old,)), company_id, "API_TOKEN", "v1"
        )
    env = {"DATABASE_URL": services.config.database_url, "BATON_SECRETS_KEYS": f"{new},{old}"}
    result = CliRunner().invoke(cli, ["db", "rotate-secrets"], env=env)
    assert result.exit_code == 0, result.output
    assert "re-encrypted" in result.stderr and result.stdout == ""
    with services.db.session() as session:
        row = session.execute(
            select(Secret).where(Secret.company_id == company_id, Secret.name == "API_TOKEN")
        ).scalar_one()
    assert Fernet(new.encode()).decrypt(row.ciphertext.encode()) == b"v1"
