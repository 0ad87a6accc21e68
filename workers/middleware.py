"""Dramatiq middleware: the process's services, the lease heartbeat, and the per-step time limit."""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from datetime import datetime

import dramatiq
from dramatiq.middleware import Middleware
from dramatiq.threading import raise_thread_exception

from app import engine, events, slots
from app.engine import Claim
from app.engine.states import HEARTBEAT
from app.services import Services
from app.timeutil import utcnow

logger = logging.getLogger("baton.worker")


class StepTimeout(Exception):
    """Raised asynchronously into a worker thread whose step ran past its ``timeoutMs``."""


class StepTimeLimit:
    """One thread interrupts steps running past their own ``timeoutMs`` (shaped like Dramatiq's
    TimeLimit, which limits a whole message; a message here may chain several steps)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, int]] = []
        self._armed: dict[int, int] = {}  # token -> thread id
        self._tokens = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._wakes_at = math.inf  # when the timer thread looks at the heap again, by itself

    def arm(self, timeout_s: float) -> int:
        """Limit the calling thread to ``timeout_s`` from now. The timer thread is woken only when
        this deadline comes before the moment it wakes anyway: steps of similar timeouts never wake
        it (a wake per step cost 3-6 % of a worker's CPU, measured)."""
        token = next(self._tokens)
        thread_id = threading.get_ident()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="baton-step-time-limit", daemon=True)
                self._thread.start()
            heap = self._heap
            while heap and heap[0][1] not in self._armed:  # steps done since: their deadlines go
                heapq.heappop(heap)
            self._armed[token] = thread_id
            heapq.heappush(heap, (deadline, token, thread_id))
            if deadline < self._wakes_at:
                self._wakes_at = deadline
                self._cond.notify()
        return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def _loop(self) -> None:
        heap, armed = self._heap, self._armed
        while True:
            with self._cond:
                while heap and heap[0][1] not in armed:  # steps done since: their deadlines go
                    heapq.heappop(heap)
                if not heap:
                    self._wakes_at = math.inf
                    self._cond.wait()
                    continue
                deadline, token, thread_id = heap[0]
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._wakes_at = deadline
                    self._cond.wait(remaining)
                    continue
                heapq.heappop(heap)
                if armed.pop(token, None) is not None:
                    raise_thread_exception(thread_id, StepTimeout)


class LeaseHeartbeat:
    """Renews the lease of every step this process is executing, every HEARTBEAT, so a dead
    worker's step is recovered within a lease whatever its ``timeoutMs``, and a slow one never is."""

    def __init__(self, services: Services, interval_s: float = HEARTBEAT.total_seconds()) -> None:
        self.services = services
        self.interval_s = interval_s
        self._held: dict[tuple[str, str, int], tuple[Claim, datetime]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # This process's entry in the worker-capacity set (the "auto" step cap counts it).
        self.capacity_entry: str | None = None

    def hold(self, claim: Claim) -> None:
        with self._lock:
            self._held[claim.key] = (claim, utcnow())

    def release(self, claim: Claim) -> None:
        with self._lock:
            self._held.pop(claim.key, None)

    def held(self) -> list[tuple[Claim, datetime]]:
        with self._lock:
            return list(self._held.values())

    def beat(self) -> int:
        """Renew now; a database outage is logged and tried again at the next beat."""
        try:
            held = self.held()
            if self.capacity_entry is not None:
                slots.register(self.services, self.capacity_entry)
                slots.rescue(self.services)
            slots.renew(self.services, {(c.company_id, c.slot) for c, _ in held if c.slot is not None})
            return engine.renew_leases(self.services, held)
        except Exception:
            logger.warning("could not renew step leases; retrying", exc_info=True)
            return 0

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="baton-lease-heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self.beat()


class ProcessServices(Middleware):
    """This process's services for the step actor; starts the heartbeat with the worker."""

    current: ProcessServices | None = None

    def __init__(self, services: Services) -> None:
        self.services = services
        self.leases = LeaseHeartbeat(services)
        self.time_limit = StepTimeLimit()
        ProcessServices.current = self

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        slots.set_process_threads(worker.worker_threads)
        self.leases.capacity_entry = slots.worker_entry(worker.worker_threads)
        slots.register(self.services, self.leases.capacity_entry)
        self.leases.start()
        publisher = events.publisher_for(self.services.db)
        if publisher is not None:
            publisher.start_shipping()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.leases.stop()
        publisher = events.publisher_for(self.services.db)
        if publisher is not None:
            publisher.stop_shipping()
        if self.leases.capacity_entry is not None:
            slots.unregister(self.services, self.leases.capacity_entry)
