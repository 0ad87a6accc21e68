"""Unit tier: pure functions only, no database, no Redis, no network; they pass with both switched off."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

UNIT = Path(__file__).parent
# The fixtures of tests/conftest.py that reach PostgreSQL, Redis, a worker or HTTP.
SERVICE_FIXTURES = frozenset(
    {
        "config",
        "services",
        "worker",
        "scheduler",
        "app",
        "client",
        "api_key",
        "headers",
        "live_server",
        "target",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        parametrized = set(callspec.params) if callspec else set()
        used = SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())) - parametrized
        if used and item.path.is_relative_to(UNIT):
            raise pytest.UsageError(
                f"{item.nodeid}: unit tests use no service fixtures ({', '.join(sorted(used))})"
            )


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Redis, HTTP and the broker connect through Python sockets: a unit test that does fails at once."""

    def refuse(self: socket.socket, address: object) -> None:
        raise AssertionError(f"a unit test tried to connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield
