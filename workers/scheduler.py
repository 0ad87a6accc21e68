"""The scheduler process: fires cron schedules; one active instance (a Redis lock) runs the sweeps."""

from __future__ import annotations

import logging
import os
import signal
import threading
import uuid
from typing import Any

from app import bulk, schedules
from app.engine import sweep
from app.services import Services

logger = logging.getLogger("baton.scheduler")
LOCK_TTL_MS = 5_000


class Scheduler:
    """Holds the leader lock while alive; the other instances stand by and take over on expiry."""

    def __init__(self, services: Services, interval_s: float = 0.5) -> None:
        self.services = services
        self.interval_s = interval_s
        # The pid in the token tells an operator (and the failover test) which process leads.
        self.token = f"{os.getpid()}:{uuid.uuid4().hex}"
        self.lock_key = f"{services.namespace}:scheduler:lock"
        self.stopping = threading.Event()
        self.leader = False

    def _hold_lock(self) -> bool:
        redis = self.services.redis
        if redis.set(self.lock_key, self.token, nx=True, px=LOCK_TTL_MS):
            return True
        # Renew only our own lock (compare-and-extend in one script).
        renewed = redis.eval(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
            "else return 0 end",
            1,
            self.lock_key,
            self.token,
            LOCK_TTL_MS,
        )
        return bool(renewed)

    def _release(self) -> None:
        self.services.redis.eval(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) "
            "else return 0 end",
            1,
            self.lock_key,
            self.token,
        )

    def run_once(self) -> dict[str, int] | None:
        # Every instance fires due schedules: each fire time is an idempotency key, so two
        # schedulers still make one run, and killing one leaves no gap.
        fired = schedules.fire_due(self.services)
        if fired:
            logger.info("fired %d scheduled run(s)", fired)
        leader = self._hold_lock()
        if leader != self.leader:
            logger.info("scheduler %s", "is the leader" if leader else "stands by")
            self.leader = leader
        if not leader:
            return None
        counts = sweep(self.services)
        counts["bulkResent"] = bulk.sweep(self.services)
        if any(counts.values()):
            logger.info("sweep: %s", counts)
        return counts

    def run(self) -> None:
        logger.info("scheduler started")
        while not self.stopping.is_set():
            try:
                self.run_once()
            except Exception:  # a database or Redis blip must not end the scheduler
                logger.exception("sweep failed; retrying")
            self.stopping.wait(self.interval_s)
        self._release()
        logger.info("scheduler stopped")

    def stop(self, *_: Any) -> None:
        self.stopping.set()


def main() -> None:
    from app.config import Config
    from app.services import build_services, configure_logging

    config = Config.from_env()
    configure_logging(config)
    from app import metrics

    scheduler = Scheduler(build_services(config, pool_size=2))
    metrics.start_publisher(scheduler.services.redis, scheduler.services.namespace)
    signal.signal(signal.SIGTERM, scheduler.stop)
    signal.signal(signal.SIGINT, scheduler.stop)
    scheduler.run()
    metrics.stop_publisher()
