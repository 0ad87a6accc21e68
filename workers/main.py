"""Entry module for ``dramatiq workers.main``: set the broker first, then import the actors."""

from __future__ import annotations

import dramatiq

from app.config import Config
from app.runtime import build_services, configure_logging

config = Config.from_env()
configure_logging(config)
services = build_services(config, pool_size=16)
broker = services.queue.broker
dramatiq.set_broker(broker)

from workers import actors  # noqa: E402  (must follow set_broker)

actors.configure(services)
