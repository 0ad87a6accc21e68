"""The per-process container (database, Redis, step queue, namespace) and the cancel flags."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import redis

from app import actions
from app.config import Config
from app.db import Database
from app.embedded import redis_answers
from app.queue import StepQueue, make_broker, make_redis

CANCEL_FLAG_TTL_S = 7 * 24 * 3600
logger = logging.getLogger("baton.services")


@dataclass
class Services:
    """What a process needs to drive runs: the database, Redis and the step queue."""

    db: Database
    redis: redis.Redis
    queue: StepQueue
    namespace: str = "baton"
    config: Config = field(default_factory=Config)

    def __post_init__(self) -> None:
        # Every process that builds its services publishes the run events its commits make (imported
        # here: the events module reads the engine's state table, and the engine imports this module).
        from app import events

        events.attach(self.db, self.redis, self.namespace)

    def key(self, *parts: str) -> str:
        """A Redis key in this deployment's namespace."""
        return ":".join((self.namespace, *parts))

    def cancel_key(self, run_id: str) -> str:
        return self.key("cancel", run_id)

    def is_cancel_requested(self, run_id: str) -> bool:
        """The Redis mirror of a cancelled (or timed-out) run; the database stays the truth."""
        return bool(self.redis.exists(self.cancel_key(run_id)))

    def request_cancel(self, run_id: str) -> None:
        """Set the flag after the database says cancelled; best effort, the claim checks the row."""
        try:
            self.redis.set(self.cancel_key(run_id), "1", ex=CANCEL_FLAG_TTL_S)
        except redis.RedisError:
            logger.warning("could not set the cancel flag of %s (Redis down)", run_id)


def configure_logging(config: Config) -> None:
    from app.logs import setup_logging

    setup_logging(config)


class RedisUnavailable(RuntimeError):
    """The embedded Redis is not running (only ``baton dev`` starts it)."""


def build_services(config: Config, *, pool_size: int = 10) -> Services:
    """Wire a process from one config; users' action modules are loaded here."""
    if config.embedded_redis and not redis_answers(config.redis_socket):
        raise RedisUnavailable(
            f"no Redis answers on {config.redis_socket}: set REDIS_URL or start `baton dev`"
        )
    actions.load(config.action_modules)
    return Services(
        db=Database(config, pool_size=pool_size),
        redis=make_redis(config),
        queue=StepQueue(make_broker(config)),
        namespace=config.queue_namespace,
        config=config,
    )
