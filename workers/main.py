"""Entry module of a worker process: build the broker, set it, declare the step actor on it."""

from __future__ import annotations

import dramatiq

import workers.actions  # noqa: F401  (registers the built-in actions)
from app import metrics
from app.config import Config
from app.services import build_services, configure_logging
from workers import actors
from workers.middleware import ProcessServices

config = Config.from_env()
configure_logging(config)
services = build_services(config, pool_size=16)
broker = services.queue.broker
broker.add_middleware(ProcessServices(services))
dramatiq.set_broker(broker)
actors.register(services.queue)
metrics.start_publisher(services.redis, services.namespace)
