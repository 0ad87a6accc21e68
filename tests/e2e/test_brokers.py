"""Both brokers as installed: the namespace keeps deployments apart, and the broker itself tells
the sweeps whether it lost its messages. RabbitMQ answers on 127.0.0.1:5672 here and in CI."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pika.exceptions
import pytest
import redis
from dramatiq import Message

from app import engine
from app.config import Config
from app.queue import StepQueue, make_broker, steps_queue_name
from app.services import Services
from app.timeutil import utcnow
from models import Run
from models.states import RunStatus
from tests import factories
from tests.conftest import DEAD_REDIS_URL, unreachable

LOCAL_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def _amqp_url() -> str:
    url = os.environ.get("BROKER_URL", "")
    return url if url.startswith(("amqp://", "amqps://")) else LOCAL_AMQP_URL


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_config(request: pytest.FixtureRequest, config: Config) -> Config:
    """This session's servers with one broker or the other, in a namespace of the test's own."""
    return config.with_overrides(
        broker_url=_amqp_url() if request.param == "rabbitmq" else None,
        queue_namespace=f"{config.queue_namespace}-{uuid.uuid4().hex[:6]}",
    )


@pytest.fixture
def queues(broker_config: Config, services: Services) -> Iterator[list[StepQueue]]:
    """Step queues the test builds; their queues and keys are gone afterwards."""
    made: list[StepQueue] = []
    yield made
    for queue in made:
        queue.delete_queues()
        queue.broker.close()
    for key in services.redis.scan_iter(f"{broker_config.queue_namespace}*"):
        services.redis.delete(key)


def _queue(config: Config, made: list[StepQueue]) -> StepQueue:
    made.append(StepQueue(make_broker(config)))
    return made[-1]


def test_the_namespace_keeps_two_deployments_queues_apart(broker_config, queues):
    """Two namespaces on one broker: each queue holds only its own messages."""
    first = _queue(broker_config, queues)
    second = _queue(
        broker_config.with_overrides(queue_namespace=f"{broker_config.queue_namespace}-b"), queues
    )
    if broker_config.rabbitmq_broker:
        assert first.queue_name == f"{broker_config.queue_namespace}.steps"
        assert second.queue_name == f"{broker_config.queue_namespace}-b.steps"
    else:
        assert first.queue_name == second.queue_name == "steps", "Redis keys carry the namespace"
    for attempt in (1, 2):
        first.enqueue("run_a", "s", attempt)
    second.enqueue("run_b", "s", 1)
    # RabbitMQ confirmed each publish, Redis stored it: the counts are final, no waiting.
    assert (first.depth(), second.depth()) == (2, 1)
    first.enqueue("run_a", "s", 3, delay_ms=60_000)
    assert first.depth() == 2, "a delayed message is not ready yet"


def test_a_namespace_that_cannot_name_a_rabbitmq_queue_is_refused(config):
    bad = config.with_overrides(broker_url=_amqp_url(), queue_namespace="acme:prod")
    with pytest.raises(ValueError, match="BATON_QUEUE_NAMESPACE 'acme:prod' cannot name a RabbitMQ queue"):
        make_broker(bad)
    assert steps_queue_name(make_broker(config.with_overrides(broker_url=None))) == "steps"


def test_the_epoch_marker_lives_and_dies_with_the_brokers_queues(broker_config, queues):
    queue = _queue(broker_config, queues)
    assert not queue.epoch_present(), "a new broker (or namespace) has no marker"
    queue.mark_epoch()
    assert queue.epoch_present()
    queue.delete_queues()
    if not queue.rabbitmq:
        queue.broker.client.delete(f"{broker_config.queue_namespace}:epoch")
    assert not queue.epoch_present(), "gone with the queues: the broker lost its messages"


def _take_all(queue: StepQueue) -> list[tuple[str, str, int]]:
    """Every ready message of the steps queue as (run, step, attempt), removed as a worker would."""
    if queue.rabbitmq:
        if queue.depth() == 0:  # also when the queue does not exist (yet, or any more)
            return []
        channel, taken = queue.broker.channel, []
        while True:
            method, _properties, body = channel.basic_get(queue.queue_name, auto_ack=True)
            if method is None:
                return taken
            taken.append(tuple(Message.decode(body).args[:3]))
    client, key = queue.broker.client, f"{queue.broker.namespace}:{queue.queue_name}"
    ids = client.lrange(key, 0, -1)
    client.delete(key)
    return [
        tuple(Message.decode(data).args[:3]) for data in (client.hmget(f"{key}.msgs", ids) if ids else [])
    ]


def test_a_broker_that_lost_its_messages_gets_them_again_at_once(broker_config, queues, services):
    """A queued step is sent again by the first sweep after the broker comes back empty, once.
    (The sweeps see the whole session's database: other tests' pending steps may come along.)"""
    queue = _queue(broker_config, queues)
    svc = dataclasses.replace(services, queue=queue, namespace=broker_config.queue_namespace)
    with services.db.session() as session:
        company_id = factories.company(session).id
        wid = factories.workflow(session, company_id, [{"id": "a", "action": "transform", "input": {}}]).id
        session.commit()
    engine.sweep(svc)  # a new namespace: marks the epoch
    _take_all(queue)
    run, _ = engine.trigger_run(svc, company_id, wid, {}, "api")
    mine = (run.id, "a", 1)
    assert mine in _take_all(queue)
    try:
        queue.delete_queues()  # the broker restarted empty (or was replaced by a new one)
        for key in services.redis.scan_iter(f"{broker_config.queue_namespace}:*"):
            services.redis.delete(key)
        assert engine.sweep(svc)["resent"] >= 1
        assert _take_all(queue).count(mine) == 1, "the lost message is back, once"
        assert engine.sweep(svc)["resent"] == 0, "same broker life: nothing sent again"
        assert mine not in _take_all(queue)
        with services.db.session() as session:
            assert session.get(Run, run.id).status == RunStatus.PENDING, "no worker took it"
    finally:
        engine.cancel_run(svc, company_id, run.id)  # no later test's sweep may send it again


def test_a_broker_outage_does_not_hold_back_run_timeouts(broker_config, queues, services):
    """The sweeps that need no broker run first: with the broker down, an overdue run still ends
    ``timeout`` (the pass then stops at the broker and is tried again)."""
    dead = broker_config.with_overrides(broker_url=unreachable(broker_config).broker_url or DEAD_REDIS_URL)
    queue = _queue(broker_config, queues)
    svc = dataclasses.replace(services, queue=queue, namespace=broker_config.queue_namespace)
    with services.db.session() as session:
        company_id = factories.company(session).id
        steps = [{"id": "a", "action": "transform", "input": {}}]
        wid = factories.workflow(session, company_id, steps, timeoutMs=1000).id
        session.commit()
    run, _ = engine.trigger_run(svc, company_id, wid, {}, "api")
    down = dataclasses.replace(svc, queue=StepQueue(make_broker(dead)))
    with pytest.raises((redis.ConnectionError, pika.exceptions.AMQPConnectionError)):
        engine.sweep(down, now=utcnow() + timedelta(hours=1))
    with services.db.session() as session:
        assert session.get(Run, run.id).status == RunStatus.TIMEOUT
