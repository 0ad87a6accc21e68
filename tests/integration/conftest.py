"""Integration tier: the engine's functions called directly against the real PostgreSQL and Redis.

No HTTP, no Dramatiq worker thread: a test drives ``claim_step`` / ``record_result`` / the sweeps
itself and reads what was enqueued straight from the broker's Redis keys. The step queue has a
namespace of its own, so the e2e tier's in-process worker (when both tiers run in one session)
never consumes these messages.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from dramatiq import Message
from sqlalchemy import select, text

from app import engine, events
from app.actions import Park
from app.config import Config
from app.engine import Claim, Next, Outcome
from app.engine.states import RUN_ACTIVE
from app.queue import STEPS_QUEUE, StepQueue, make_broker
from app.services import Services
from app.timeutil import utcnow
from models import Run, StepAttempt, StepRun
from models.states import RunStatus, StepStatus
from tests import factories
from tests.conftest import wait_for

R, S = RunStatus, StepStatus


# The events of a run of steps a, b, c after its creation, as (kind, step, status): each step's claim
# and result, the run started by the first claim and ended after the last result.
CHAIN_EVENTS = [
    ("step", "a", "running"),
    ("run", None, "running"),
    ("step", "a", "success"),
    ("step", "b", "running"),
    ("step", "b", "success"),
    ("step", "c", "running"),
    ("step", "c", "success"),
    ("run", None, "completed"),
]


def step(step_id: str, action: str = "transform", **extra: Any) -> dict[str, Any]:
    """A step definition (``transform`` unless told)."""
    return {"id": step_id, "action": action, "input": extra.pop("input", {}), **extra}


def retrying(step_id: str, attempts: int, **extra: Any) -> dict[str, Any]:
    """A step with ``attempts`` attempts and a fixed 1 s back-off."""
    retry = {"maxAttempts": attempts, "backoff": "fixed", "initialDelayMs": 1000, "maxDelayMs": 60_000}
    return step(step_id, retry=retry, **extra)


def success(output: Any = None, **extra: Any) -> Outcome:
    return Outcome(S.SUCCESS, input={}, output=output if output is not None else {"ok": True}, **extra)


def failure(message: str = "boom", *, retriable: bool = False, **extra: Any) -> Outcome:
    return Outcome(
        S.ERROR, input={}, error={"code": "HTTP_ERROR", "message": message}, retriable=retriable, **extra
    )


def parked(until: datetime | None, *, suspend: bool = False) -> Outcome:
    return Outcome(S.WAITING, input={"p": 1}, park=Park(until=until, suspend=suspend))


@dataclass(frozen=True)
class Sent:
    """One ``execute_step`` message as the broker stored it."""

    run_id: str
    step_id: str
    attempt: int
    company_id: str | None  # lets the worker apply the company's step cap before any database work
    delayed: bool
    eta: int | None  # epoch ms, delayed messages only


class BrokerQueue:
    """Reads the Dramatiq RedisBroker's keys for the steps queue: a hash of encoded messages by
    redis message id (``<ns>:steps.msgs``) and the list of ids in order (``<ns>:steps``); delayed
    messages the same under ``steps.DQ``."""

    def __init__(self, services: Services) -> None:
        self.redis = services.redis
        self.namespace = services.namespace

    def _keys(self, queue: str) -> tuple[str, str]:
        return f"{self.namespace}:{queue}", f"{self.namespace}:{queue}.msgs"

    def sent(self, run_id: str | None = None) -> list[Sent]:
        found = []
        for queue, delayed in ((STEPS_QUEUE, False), (f"{STEPS_QUEUE}.DQ", True)):
            ids_key, msgs_key = self._keys(queue)
            ids = self.redis.lrange(ids_key, 0, -1)
            for data in self.redis.hmget(msgs_key, ids) if ids else []:
                message = Message.decode(data)
                assert message.actor_name == "execute_step"
                sent = Sent(*message.args, delayed=delayed, eta=message.options.get("eta"))
                if run_id is None or sent.run_id == run_id:
                    found.append(sent)
        return found

    def take(self, run_id: str) -> list[Sent]:
        """Remove this run's messages, as the worker that consumed them would."""
        taken = []
        for queue, delayed in ((STEPS_QUEUE, False), (f"{STEPS_QUEUE}.DQ", True)):
            ids_key, msgs_key = self._keys(queue)
            for message_id in self.redis.lrange(ids_key, 0, -1):
                data = self.redis.hget(msgs_key, message_id)
                message = Message.decode(data)
                if message.args[0] == run_id:
                    self.redis.lrem(ids_key, 0, message_id)
                    self.redis.hdel(msgs_key, message_id)
                    taken.append(Sent(*message.args, delayed=delayed, eta=message.options.get("eta")))
        return taken

    def clear(self) -> None:
        for queue in (STEPS_QUEUE, f"{STEPS_QUEUE}.DQ"):
            self.redis.delete(*self._keys(queue))


@pytest.fixture(scope="session")
def engine_services(config: Config, services: Services) -> Iterator[Services]:
    """The session's database and Redis, with a step queue (and epoch key, cancel flags) in a
    namespace of its own."""
    namespace = f"{config.queue_namespace}-engine"
    # Always the Redis broker, whatever BROKER_URL says: this tier reads what was sent from its keys.
    broker = make_broker(config.with_overrides(queue_namespace=namespace, broker_url=None))
    svc = dataclasses.replace(
        services, queue=StepQueue(broker), namespace=namespace, config=config.with_overrides(broker_url=None)
    )
    yield svc
    for key in svc.redis.scan_iter(f"{namespace}:*"):
        svc.redis.delete(key)
    broker.close()


@pytest.fixture
def broker_down(config: Config, engine_services: Services) -> Services:
    """The same database, and a broker whose Redis refuses connections (a real one, not a fake)."""
    nowhere = "redis://127.0.0.1:1/0"
    dead = make_broker(config.with_overrides(broker_url=nowhere, redis_url=nowhere))
    return dataclasses.replace(engine_services, queue=StepQueue(dead))


@pytest.fixture
def queue(engine_services: Services) -> BrokerQueue:
    q = BrokerQueue(engine_services)
    q.clear()
    return q


class Engine:
    """One company's view of the engine: workflows, runs and the calls that move them."""

    def __init__(self, services: Services, queue: BrokerQueue) -> None:
        self.services = services
        self.queue = queue
        with services.db.session() as session:
            self.company_id = factories.company(session).id
            session.commit()

    # -- rows

    def workflow(self, *steps: dict[str, Any], **extra: Any) -> str:
        with self.services.db.session() as session:
            row = factories.workflow(session, self.company_id, list(steps) or [step("a")], **extra)
            session.commit()
            return row.id

    def make_run(
        self, workflow_id: str, status: str, steps: dict[str, dict[str, Any]] | None = None, **fields: Any
    ) -> str:
        """A run written by the factory (no message): for states no public call reaches quickly."""
        with self.services.db.session() as session:
            row = factories.run(session, workflow_id, status, steps, **fields)
            session.commit()
            return row.id

    def run(self, run_id: str) -> Run:
        with self.services.db.session() as session:
            return session.get(Run, run_id)

    def step(self, run_id: str, step_id: str) -> StepRun:
        with self.services.db.session() as session:
            return factories.step(session, run_id, step_id)

    def statuses(self, run_id: str) -> list[StepStatus]:
        with self.services.db.session() as session:
            return [r.status for r in engine.step_runs(session, run_id)]

    def attempts(self, run_id: str) -> list[StepAttempt]:
        with self.services.db.session() as session:
            return engine.step_attempts(session, run_id)

    def sent(self, run_id: str) -> list[Sent]:
        return self.queue.sent(run_id)

    def events(self, run_id: str, kind: str | None = None, step_id: str | None = None) -> list[dict]:
        """The run's published events (``app.events``), oldest first: payloads with ``kind`` added."""
        publisher = events.publisher_for(self.services.db)
        assert publisher is not None
        assert publisher.flush(), "a worker fixture's shipping thread sends what it holds first"
        entries = events.history(self.services.redis, events.run_stream(publisher.namespace, run_id))
        found = [{"kind": entry.kind, **entry.payload()} for entry in entries]
        return [
            f
            for f in found
            if (kind is None or f["kind"] == kind) and (step_id is None or f.get("stepId") == step_id)
        ]

    # -- the engine's public calls

    def trigger(self, workflow_id: str, run_input: dict[str, Any] | None = None, **kwargs: Any) -> str:
        run, created = engine.trigger_run(
            self.services, self.company_id, workflow_id, run_input or {}, "api", **kwargs
        )
        assert created
        return run.id

    def claim(self, run_id: str, step_id: str, attempt: int = 1) -> Claim | None:
        return engine.claim_step(self.services, run_id, step_id, attempt)

    def record(self, claim: Claim, outcome: Outcome) -> Next:
        return engine.record_result(self.services, claim, outcome)

    def start(self, *steps: dict[str, Any], **extra: Any) -> tuple[str, Claim]:
        """A new run whose first step's message was consumed and claimed: run and step running."""
        run_id = self.trigger(self.workflow(*steps, **extra))
        [message] = self.queue.take(run_id)  # the worker that claims it consumed the message
        claim = self.claim(run_id, message.step_id, message.attempt)
        assert claim is not None
        return run_id, claim

    def suspend(self, *steps: dict[str, Any], **extra: Any) -> str:
        """A run suspended on its first step (an approval)."""
        run_id, claim = self.start(*steps, **extra)
        self.record(claim, parked(None, suspend=True))
        assert self.run(run_id).status == R.SUSPENDED
        return run_id

    def cancel(self, run_id: str) -> Run:
        return engine.cancel_run(self.services, self.company_id, run_id)

    def resume(self, run_id: str, approved: bool, data: Any = None) -> Run:
        return engine.resume_run(self.services, self.company_id, run_id, approved, data)

    # -- the sweeps, each in a session of its own, at an explicit time

    def sweeping(self, sweep: Callable[..., int], now: datetime, **kwargs: Any) -> int:
        with self.services.db.session() as session:
            return sweep(self.services, session, now, **kwargs)

    def end_live_runs(self) -> None:
        """Cancel this company's runs that are still live, so later sweeps pass them by."""
        with self.services.db.session() as session:
            live = session.execute(
                select(Run.id).where(Run.company_id == self.company_id, Run.status.in_(sorted(RUN_ACTIVE)))
            ).scalars()
            live = list(live)
        for run_id in live:
            self.cancel(run_id)


@pytest.fixture
def e(engine_services: Services, queue: BrokerQueue) -> Iterator[Engine]:
    """A fresh company per test; its live runs are cancelled afterwards."""
    instance = Engine(engine_services, queue)
    yield instance
    instance.end_live_runs()


def blocked_on_locks(services: Services) -> int:
    """How many of this session's database connections wait for a lock."""
    with services.db.session() as session:
        return session.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = current_setting('application_name') AND wait_event_type = 'Lock'"
            )
        ).scalar_one()


def until_past(moment: datetime | None) -> datetime:
    """Wait until the wall clock (as the engine reads it) is past ``moment``; returns now."""
    assert moment is not None
    return wait_for(lambda: (now := utcnow()) > moment and now, what=f"the clock to pass {moment}")


def unique(prefix: str = "k") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
