"""The Dramatiq broker and the one way Baton enqueues a step."""

from __future__ import annotations

import redis
from dramatiq import Broker, Message
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, ShutdownNotifications, TimeLimit

from app.config import Config

STEPS_QUEUE = "steps"
EXECUTE_STEP = "execute_step"


def make_broker(config: Config) -> Broker:
    """Build the broker; ``Retries`` is left out because per-step retry is Baton's own."""
    middleware = [AgeLimit(), TimeLimit(), ShutdownNotifications(), Callbacks(), Pipelines()]
    url = config.resolved_broker_url()
    if url.startswith("amqp"):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker: Broker = RabbitmqBroker(url=url, middleware=middleware)
    else:
        broker = RedisBroker(
            url=url,
            namespace=config.queue_namespace,
            middleware=middleware,
            # Redeliver a dead worker's messages after 15 s rather than 60 s.
            heartbeat_timeout=15_000,
            maintenance_chance=1_000,
        )
    broker.declare_queue(STEPS_QUEUE)
    return broker


class StepQueue:
    """Sends ``execute_step(run_id, step_id, attempt)`` messages by actor name."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def enqueue(self, run_id: str, step_id: str, attempt: int, delay_ms: int | None = None) -> None:
        message = Message(
            queue_name=STEPS_QUEUE,
            actor_name=EXECUTE_STEP,
            args=(run_id, step_id, attempt),
            kwargs={},
            options={},
        )
        self.broker.enqueue(message, delay=delay_ms if delay_ms and delay_ms > 0 else None)


def make_redis(config: Config) -> redis.Redis:
    return redis.Redis.from_url(config.resolved_redis_url(), socket_timeout=5, health_check_interval=30)
