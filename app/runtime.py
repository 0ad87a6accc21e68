"""Wire a process: database, Redis, broker and step queue from one config."""

from __future__ import annotations

import logging

from app.config import Config
from app.db import Database
from app.embedded import ensure_redis
from app.engine import Services
from app.queue import StepQueue, make_broker, make_redis
from workers import actions


def configure_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )


def build_services(config: Config, *, pool_size: int = 10) -> Services:
    if config.embedded_redis:
        ensure_redis(config, daemonize=True)
    actions.load(config.action_modules)
    broker = make_broker(config)
    return Services(
        db=Database(config, pool_size=pool_size),
        redis=make_redis(config),
        queue=StepQueue(broker),
        namespace=config.queue_namespace,
    )
