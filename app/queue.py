"""The Dramatiq broker and the one way Baton enqueues a step."""

from __future__ import annotations

import redis
from dramatiq import Broker, Message
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, Retries, ShutdownNotifications, TimeLimit

from app.config import Config
from app.errors import is_transient

STEPS_QUEUE = "steps"
EXECUTE_STEP = "execute_step"


MESSAGE_RETRIES = 40  # with back-off capped at 10 s: a message outlives ~6 minutes of outage


def retry_message(retries: int, exc: BaseException) -> bool:
    """Redeliver a message only through a database or Redis outage: per-step retry is Baton's own
    (the attempt lives in the database), and a bug must not loop."""
    return retries < MESSAGE_RETRIES and is_transient(exc)


def make_broker(config: Config) -> Broker:
    """Build the broker; ``Retries`` only redelivers messages that met an outage."""
    middleware = [
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        Retries(retry_when=retry_message, min_backoff=500, max_backoff=10_000),
    ]
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
            # An unreachable Redis fails a call instead of hanging a request or a worker thread.
            socket_connect_timeout=2,
            socket_timeout=10,
        )
    broker.declare_queue(STEPS_QUEUE)
    return broker


class StepQueue:
    """Sends ``execute_step(run_id, step_id, attempt, company_id)`` messages by actor name (the
    company lets a worker apply the per-company step cap before any database work)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def enqueue(
        self,
        run_id: str,
        step_id: str,
        attempt: int,
        delay_ms: int | None = None,
        company_id: str | None = None,
    ) -> None:
        message = Message(
            queue_name=STEPS_QUEUE,
            actor_name=EXECUTE_STEP,
            args=(run_id, step_id, attempt, company_id),
            kwargs={},
            options={},
        )
        self.broker.enqueue(message, delay=delay_ms if delay_ms and delay_ms > 0 else None)


def make_redis(config: Config) -> redis.Redis:
    return redis.Redis.from_url(config.resolved_redis_url(), socket_timeout=5, health_check_interval=30)
