"""The Dramatiq broker (Redis or RabbitMQ) and the one way Baton enqueues a step."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pika
import pika.exceptions
import redis
from dramatiq import Broker, Message
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis
from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, Retries, ShutdownNotifications, TimeLimit

from app.config import Config
from app.errors import is_transient

logger = logging.getLogger("baton.queue")
STEPS_QUEUE = "steps"
EXECUTE_STEP = "execute_step"
# Dramatiq's rule for a queue name (its actor decorator refuses any other).
QUEUE_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9._-]*")
# pika's connection settings unless the URL gives its own: an unreachable broker fails a call
# within seconds instead of hanging a request, and a broker that blocks publishers (a memory or
# disk alarm) fails the publish after 10 s rather than never.
AMQP_DEFAULTS = {"socket_timeout": "2", "stack_timeout": "5", "blocked_connection_timeout": "10"}


MESSAGE_RETRIES = 40  # with back-off capped at 10 s: a message outlives ~6 minutes of outage


def retry_message(retries: int, exc: BaseException) -> bool:
    """Redeliver a message only through a database or Redis outage: per-step retry is Baton's own
    (the attempt lives in the database), and a bug must not loop."""
    return retries < MESSAGE_RETRIES and is_transient(exc)


class NamespacedRabbitmqBroker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker with the deployment's namespace, which the queue names carry:
    the queues of a virtual host share one flat name space (Redis keys carry it instead)."""

    def __init__(self, *, namespace: str, **kwargs: Any) -> None:
        if not QUEUE_NAME.fullmatch(f"{namespace}.{STEPS_QUEUE}"):
            raise ValueError(
                f"BATON_QUEUE_NAMESPACE {namespace!r} cannot name a RabbitMQ queue: use letters, "
                "digits, '.', '_' and '-', starting with a letter"
            )
        super().__init__(**kwargs)
        self.namespace = namespace


def steps_queue_name(broker: Broker) -> str:
    """The steps queue of this broker: ``<namespace>.steps`` on RabbitMQ, ``steps`` on Redis
    (whose broker already puts the namespace in front of every key)."""
    if isinstance(broker, NamespacedRabbitmqBroker):
        return f"{broker.namespace}.{STEPS_QUEUE}"
    return STEPS_QUEUE


def amqp_url(url: str) -> str:
    """``url`` with Baton's connection defaults for what its query string does not set."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    return urlunsplit(parts._replace(query=urlencode({**AMQP_DEFAULTS, **query})))


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
    if config.rabbitmq_broker:
        # pika logs an error with a traceback whenever a connection it kept is found dropped, as
        # a thread's idle publishing connection is after RabbitMQ's heartbeat timeout; Dramatiq
        # then opens a new one and publishes again. What matters still shows: Dramatiq's consumer
        # errors and Baton's "could not enqueue" warning.
        logging.getLogger("pika").setLevel(logging.CRITICAL)
        broker: Broker = NamespacedRabbitmqBroker(
            namespace=config.queue_namespace,
            url=amqp_url(url),
            middleware=middleware,
            # Each publish waits for RabbitMQ's ack: a message sent on a connection the server
            # already dropped (a missed heartbeat, a restart) raises and is sent again, never lost.
            confirm_delivery=True,
        )
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
    broker.declare_queue(steps_queue_name(broker))
    return broker


class StepQueue:
    """Sends ``execute_step(run_id, step_id, attempt, company_id)`` messages by actor name (the
    company lets a worker apply the per-company step cap before any database work)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.queue_name = steps_queue_name(broker)

    def enqueue(
        self,
        run_id: str,
        step_id: str,
        attempt: int,
        delay_ms: int | None = None,
        company_id: str | None = None,
    ) -> None:
        message = self._message(run_id, step_id, attempt, company_id)
        self.broker.enqueue(message, delay=delay_ms if delay_ms and delay_ms > 0 else None)

    def _message(
        self, run_id: str, step_id: str, attempt: int, company_id: str | None, options: dict | None = None
    ) -> Message:
        return Message(
            queue_name=self.queue_name,
            actor_name=EXECUTE_STEP,
            args=(run_id, step_id, attempt, company_id),
            kwargs={},
            options=options or {},
        )

    def enqueue_many(self, steps: Sequence[tuple[str, str, int, str]]) -> list[bool]:
        """Send ``(run_id, step_id, attempt, company_id)`` messages, due now; whether each was sent.

        On Redis they go in one pipeline (one round trip for a whole batch trigger); on RabbitMQ
        one by one, each confirmed. A broker error is logged and marks the messages not sent.
        """
        messages = [self._message(*step) for step in steps]
        if isinstance(self.broker, RedisBroker):
            pipe = self.broker.client.pipeline(transaction=False)
            staged = self.stage(pipe, steps)
            try:
                results = pipe.execute(raise_on_error=False)
            except Exception:  # the broker is unreachable: none was sent
                logger.warning("could not enqueue %d message(s)", len(messages), exc_info=True)
                return [False] * len(messages)
            return self.staged_results(staged, results)
        sent = []
        for message in messages:
            try:
                self.broker.enqueue(message)
                sent.append(True)
            except Exception:  # any broker failure: the rows are the source of truth
                logger.warning("could not enqueue %s", message.args[:2], exc_info=True)
                sent.append(False)
        return sent

    def shared_pipeline(self, client: redis.Redis) -> Any:
        """A pipeline on the broker's Redis when that is the server and database ``client`` talks
        to (commands for both then share one round trip); None on RabbitMQ or another Redis."""
        if not isinstance(self.broker, RedisBroker) or not _same_server(self.broker.client, client):
            return None
        return self.broker.client.pipeline(transaction=False)

    def stage(self, pipe: Any, steps: Sequence[tuple[str, str, int, str]]) -> list[tuple[Message, list[Any]]]:
        """Dramatiq's own enqueue (its dispatch script, same arguments) of due-now messages, added to
        ``pipe`` (``shared_pipeline`` or a pipeline on the broker's client); after ``pipe.execute``,
        pass this list and the results of these commands to ``staged_results``.

        By hash: a pipeline holding a script object would ask Redis whether the script exists on
        every execute (one more round trip); a lost script (a Redis restart) is sent again there.
        """
        broker = self.broker
        assert isinstance(broker, RedisBroker)
        script = broker.scripts["dispatch"]
        unpack = broker._max_unpack_size()  # the script takes it on every command
        staged = []
        for step in steps:
            message = self._message(*step, options={"redis_message_id": str(uuid.uuid4())})
            broker.emit_before("enqueue", message, None)
            args = [
                "enqueue",
                current_millis(),
                message.queue_name,
                broker.broker_id,
                broker.heartbeat_timeout,
                broker.dead_message_ttl,
                0,  # no queue maintenance inside a request
                unpack,
                message.options["redis_message_id"],
                message.encode(),
            ]
            pipe.evalsha(script.sha, 1, broker.namespace, *args)
            staged.append((message, args))
        return staged

    def staged_results(self, staged: list[tuple[Message, list[Any]]], results: Sequence[Any]) -> list[bool]:
        """Whether each staged message was sent (a lost script is loaded and the message sent again);
        failures are logged, and the rows stay the source of truth."""
        broker = self.broker
        assert isinstance(broker, RedisBroker)
        results = list(results)
        lost = [i for i, result in enumerate(results) if isinstance(result, redis.exceptions.NoScriptError)]
        if lost:
            script = broker.scripts["dispatch"]
            try:
                broker.client.script_load(script.script)
                pipe = broker.client.pipeline(transaction=False)
                for i in lost:
                    pipe.evalsha(script.sha, 1, broker.namespace, *staged[i][1])
                for i, result in zip(lost, pipe.execute(raise_on_error=False), strict=True):
                    results[i] = result
            except Exception as exc:  # noqa: BLE001 (reported below, like a pipeline error)
                for i in lost:
                    results[i] = exc
        sent = []
        for (message, _), result in zip(staged, results, strict=True):
            if isinstance(result, Exception):
                logger.warning("could not enqueue %s: %s", message.args[:2], result)
                sent.append(False)
                continue
            broker.emit_after("enqueue", message, None)
            sent.append(True)
        return sent

    @property
    def rabbitmq(self) -> bool:
        return isinstance(self.broker, RabbitmqBroker)

    def depth(self) -> int:
        """Messages waiting in the steps queue (ready to run; delayed ones and those being
        executed not counted)."""
        if isinstance(self.broker, RabbitmqBroker):
            declared = self._declared(self.queue_name)
            return int(declared.method.message_count) if declared is not None else 0
        assert isinstance(self.broker, RedisBroker)
        return int(self.broker.client.llen(f"{self.broker.namespace}:{self.queue_name}"))

    # The epoch marker tells whether the broker lost its messages (restarted empty, or new): it
    # lives where the messages live and goes away with them. On Redis a key; on RabbitMQ a durable
    # queue, which survives a restart exactly when the durable queues holding the messages do.

    def _epoch_name(self) -> str:
        namespace = getattr(self.broker, "namespace", "")
        return f"{namespace}.epoch" if self.rabbitmq else f"{namespace}:epoch"

    def _declared(self, name: str) -> Any:
        """RabbitMQ's answer to a passive declare of queue ``name``; None when there is no such queue."""
        assert isinstance(self.broker, RabbitmqBroker)
        try:
            return self.broker.channel.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            del self.broker.channel  # a refused declare closes the channel
            if exc.reply_code == 404:
                return None
            raise

    def epoch_present(self) -> bool:
        """Whether the broker still holds the marker set by ``mark_epoch`` (same broker life)."""
        if isinstance(self.broker, RabbitmqBroker):
            return self._declared(self._epoch_name()) is not None
        assert isinstance(self.broker, RedisBroker)
        return bool(self.broker.client.exists(self._epoch_name()))

    def mark_epoch(self) -> None:
        """Set the marker: every message the broker should hold has been sent."""
        if isinstance(self.broker, RabbitmqBroker):
            self.broker.channel.queue_declare(self._epoch_name(), durable=True)
            return
        assert isinstance(self.broker, RedisBroker)
        self.broker.client.set(self._epoch_name(), uuid.uuid4().hex)

    def delete_queues(self) -> None:
        """Drop this namespace's queues and epoch marker (a finished test session, a deployment
        taken down); on Redis the namespace's keys go with ``SCAN``/``DEL`` instead."""
        if not isinstance(self.broker, RabbitmqBroker):
            return
        for name in (self.queue_name, f"{self.queue_name}.DQ", f"{self.queue_name}.XQ", self._epoch_name()):
            self.broker.channel.queue_delete(name)


def _same_server(a: redis.Redis, b: redis.Redis) -> bool:
    """Whether two clients reach the same Redis server and database."""
    names = ("host", "port", "path", "db", "username", "password")
    first, second = a.connection_pool.connection_kwargs, b.connection_pool.connection_kwargs
    return all(first.get(name) == second.get(name) for name in names)


def make_redis(config: Config) -> redis.Redis:
    return redis.Redis.from_url(config.resolved_redis_url(), socket_timeout=5, health_check_interval=30)
