"""Gunicorn hooks (``baton api`` passes ``--config python:app.gunicorn_conf``)."""

from __future__ import annotations

import signal
from typing import Any


def post_worker_init(worker: Any) -> None:
    """On SIGTERM, SIGINT or SIGQUIT the worker's open event streams end at once (within a poll),
    so its graceful shutdown is not held up by clients that would otherwise stay connected."""
    from api import events

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        previous = signal.getsignal(signum)

        def stop(received: int, frame: Any, previous: Any = previous) -> None:
            events.SHUTDOWN.set()
            if callable(previous):
                previous(received, frame)

        signal.signal(signum, stop)
    # signal.signal() makes a signal interrupt system calls again; gunicorn wants SIGTERM not to.
    signal.siginterrupt(signal.SIGTERM, False)
