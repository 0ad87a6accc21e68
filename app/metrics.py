"""Prometheus metrics (DESIGN §12): each process counts in its own registry, in memory; a snapshot
thread shares the counts through Redis so that the API's ``/metrics`` shows every process.

Why snapshots in Redis rather than prometheus-client's multiprocess mode: the API, the worker pool
and the scheduler are separate commands, often on separate machines; multiprocess mode needs one
shared directory (one machine) and a cleanup hook per process type. Here every process writes its
cumulative samples to a hash under the queue namespace every ``INTERVAL_S``; a scrape sums the live
hashes, its own registry and the ``retired`` hash. A process that stops folds its last snapshot into
``retired`` (so no counter goes backwards), and a scrape folds the hash of a process that stopped
writing (killed) for ``STALE_S``, leaving a tombstone so that process, if merely stalled, re-bases
instead of counting twice.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import event
from sqlalchemy.orm import Session

from app import db

logger = logging.getLogger("baton.metrics")

INTERVAL_S = 2.0
STALE_S = 30.0  # a process silent this long is folded into the retired totals
TOMBSTONE_TTL_S = 7 * 24 * 3600
LIVE_TTL_S = 24 * 3600  # a backstop: scrapes fold stale hashes long before
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

REGISTRY = CollectorRegistry(auto_describe=True)
RUNS_STARTED = Counter(
    "baton_runs_started", "Runs created (trigger, retry, restart)", ["workflow_id"], registry=REGISTRY
)
RUNS_FINISHED = Counter(
    "baton_runs_finished", "Runs that reached a final status", ["workflow_id", "status"], registry=REGISTRY
)
STEP_DURATION = Histogram(
    "baton_step_duration_seconds",
    "Duration of finished step attempts",
    ["action"],
    buckets=STEP_BUCKETS,
    registry=REGISTRY,
)
STEP_ATTEMPTS = Counter(
    "baton_step_attempts",
    "Step attempts recorded, by outcome (success, error, retry, skipped)",
    ["action", "outcome"],
    registry=REGISTRY,
)
SWEEPER_RECOVERIES = Counter(
    "baton_sweeper_recoveries", "Rows the recovery sweeps acted on, by sweep", ["kind"], registry=REGISTRY
)
HTTP_DURATION = Histogram(
    "baton_http_request_duration_seconds",
    "API request latency by URL rule",
    ["route", "method", "status"],
    registry=REGISTRY,
)


class _StatementsCollector:
    """``baton_db_statements_total``: read from the database module's counter at each collection, so
    the hot path pays one locked increment per statement and nothing for Prometheus."""

    name = "baton_db_statements"
    documentation = "SQL statements sent to the database (an executemany counts once)"

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=db.statements_executed())

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation)


DB_STATEMENTS = _StatementsCollector()
REGISTRY.register(DB_STATEMENTS)  # type: ignore[arg-type]
DB_STATEMENTS_SERIES = "baton_db_statements_total"

# The sweeps' result keys (``engine.sweep``) as label values.
SWEEP_KINDS = {
    "resent": "broker_restart",
    "timedOut": "run_timeout",
    "approvalsExpired": "approval_timeout",
    "requeued": "lost_message",
    "leasesExpired": "lease_expired",
    "slotsReconciled": "concurrency_slot",
}

# --------------------------------------------------------------------------- counting


_PENDING = "baton_metrics_pending"


def on_commit(session: Session, count: Callable[[], None]) -> None:
    """Count once ``session``'s transaction commits (a rolled-back write is never counted)."""
    session.info.setdefault(_PENDING, []).append(count)


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    for count in session.info.pop(_PENDING, ()):
        count()


@event.listens_for(Session, "after_soft_rollback")
def _after_rollback(session: Session, _previous: Any) -> None:
    session.info.pop(_PENDING, None)


def run_started(workflow_id: str, count: int = 1) -> None:
    RUNS_STARTED.labels(workflow_id).inc(count)


def run_finished(session: Session, workflow_id: str, status: str) -> None:
    on_commit(session, RUNS_FINISHED.labels(workflow_id, str(status)).inc)


def count_run_finished(workflow_id: str, status: str) -> None:
    """``run_finished`` for a transaction that already committed."""
    RUNS_FINISHED.labels(workflow_id, str(status)).inc()


def attempt_recorded(session: Session, action: str, outcome: str, seconds: float | None) -> None:
    """One step attempt ended: its outcome and (when it ran) its duration, counted at commit."""
    on_commit(session, lambda: count_attempt(action, outcome, seconds))


def count_attempt(action: str, outcome: str, seconds: float | None) -> None:
    """``attempt_recorded`` for a transaction that already committed."""
    STEP_ATTEMPTS.labels(action, outcome).inc()
    if seconds is not None:
        STEP_DURATION.labels(action).observe(max(0.0, seconds))


def swept(counts: dict[str, int]) -> None:
    for key, value in counts.items():
        if value:
            SWEEPER_RECOVERIES.labels(SWEEP_KINDS.get(key, key)).inc(value)


def http_request(route: str, method: str, status: int, seconds: float) -> None:
    HTTP_DURATION.labels(route, method, str(status)).observe(seconds)


# --------------------------------------------------------------------------- snapshots

Series = str  # json.dumps([sample name, sorted label pairs])


def series_key(name: str, labels: dict[str, str]) -> Series:
    return json.dumps([name, sorted(labels.items())], separators=(",", ":"))


def local_samples(registry: CollectorRegistry = REGISTRY) -> dict[Series, float]:
    """This process's cumulative samples (``_created`` timestamps are per process: left out)."""
    samples: dict[Series, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                samples[series_key(sample.name, sample.labels)] = sample.value
    return samples


def _keys(namespace: str) -> tuple[str, str, str]:
    """(index of live processes, retired totals, prefix of the per-process hashes)."""
    return f"{namespace}:metrics:live", f"{namespace}:metrics:retired", f"{namespace}:metrics:proc:"


# Times are the Redis server's (TIME), so machines with skewed clocks agree on who is stale.
# KEYS: index, live hash, tombstone; ARGV: id, ttl, whether the hash should exist, then the
# series/value pairs that changed (series never leave a registry, so the hash is only updated).
# 0: folded by a scrape; 2: the hash is gone (Redis restarted empty), send everything again.
_WRITE = """
if redis.call('exists', KEYS[3]) == 1 then return 0 end
if ARGV[3] == '1' and redis.call('exists', KEYS[2]) == 0 then return 2 end
for i = 4, #ARGV, 2 do redis.call('hset', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('expire', KEYS[2], ARGV[2])
redis.call('zadd', KEYS[1], redis.call('time')[1], ARGV[1])
return 1
"""

# KEYS: index, live hash, retired, tombstone; ARGV: id, then series/final/published triples.
# Folded already (a scrape took ``published``): only what came since is added.
_RETIRE = """
local folded = redis.call('exists', KEYS[4]) == 1
for i = 2, #ARGV, 3 do
  local delta = tonumber(ARGV[i + 1])
  if folded then delta = delta - tonumber(ARGV[i + 2]) end
  if delta ~= 0 then redis.call('hincrbyfloat', KEYS[3], ARGV[i], delta) end
end
redis.call('del', KEYS[2])
redis.call('zrem', KEYS[1], ARGV[1])
return 1
"""

# KEYS: index, live hash, retired, tombstone; ARGV: id, cutoff, tombstone ttl.
_FOLD = """
local seen = redis.call('zscore', KEYS[1], ARGV[1])
if not seen or tonumber(seen) > tonumber(ARGV[2]) then return 0 end
local values = redis.call('hgetall', KEYS[2])
for i = 1, #values, 2 do redis.call('hincrbyfloat', KEYS[3], values[i], values[i + 1]) end
redis.call('del', KEYS[2])
redis.call('zrem', KEYS[1], ARGV[1])
redis.call('set', KEYS[4], '1', 'EX', ARGV[3])
return 1
"""


def _subtract(current: dict[Series, float], base: dict[Series, float]) -> dict[Series, float]:
    return {key: value - base.get(key, 0.0) for key, value in current.items()}


def _add(one: dict[Series, float], other: dict[Series, float]) -> dict[Series, float]:
    return {key: one.get(key, 0.0) + other.get(key, 0.0) for key in one.keys() | other.keys()}


class Publisher:
    """Writes this process's samples to Redis every ``interval_s`` and folds them in at ``stop``."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        interval_s: float = INTERVAL_S,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.redis = client
        self.registry = registry
        self.namespace = namespace
        self.interval_s = interval_s
        self.pid = os.getpid()
        self.id = self._new_id()
        self.baseline: dict[Series, float] = {}  # counted under an earlier id, folded by a scrape
        self.published: dict[Series, float] = {}  # what Redis holds under ``self.id``
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def _new_id(self) -> str:
        return f"{socket.gethostname()}:{self.pid}:{uuid.uuid4().hex[:8]}"

    def _proc_keys(self) -> tuple[str, str, str, str]:
        index, retired, prefix = _keys(self.namespace)
        return index, prefix + self.id, retired, f"{prefix}{self.id}:folded"

    def samples(self) -> dict[Series, float]:
        """What this process adds to the totals beyond what ``retired`` already holds for it."""
        return _subtract(local_samples(self.registry), self.baseline)

    def publish(self) -> None:
        with self._lock:
            current = self.samples()
            if self._write(current):
                return
            # A scrape took this process for dead and folded what it had published: that part is
            # now in the retired totals, so count on from there under a new id.
            logger.warning("metrics of this process were folded while it was alive; re-basing")
            self.baseline = _add(self.baseline, self.published)
            self.published, self.id = {}, self._new_id()
            self._write(self.samples())

    def _write(self, current: dict[Series, float]) -> bool:
        index, live, _retired, tomb = self._proc_keys()
        for _ in range(2):
            args: list[Any] = [self.id, int(LIVE_TTL_S), "1" if self.published else "0"]
            for key, value in current.items():
                if self.published.get(key) != value:  # an idle process only says it is alive
                    args += [key, repr(value)]
            written = self.redis.eval(_WRITE, 3, index, live, tomb, *args)
            if written != 2:
                break
            self.published = {}
        if not written:
            return False
        self.published = current
        return True

    def retire(self) -> None:
        """Fold the final counts into the retired totals and leave the live set."""
        with self._lock:
            current = self.samples()
            index, live, retired, tomb = self._proc_keys()
            args: list[Any] = [self.id]
            for key, value in current.items():
                args += [key, repr(value), repr(self.published.get(key, 0.0))]
            self.redis.eval(_RETIRE, 4, index, live, retired, tomb, *args)
            self.baseline, self.published = local_samples(self.registry), {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="baton-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        warned = 0.0
        while not self._stopping.wait(self.interval_s):
            try:
                self.publish()
            except Exception as exc:  # Redis down: the next snapshot carries everything
                if time.monotonic() - warned > 60:
                    warned = time.monotonic()
                    logger.warning("could not publish metrics: %s", exc)

    def stop(self) -> None:
        """Stop the thread and retire (best effort: Redis may be gone at shutdown)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            self.retire()
        except Exception as exc:
            logger.warning("could not retire this process's metrics: %s", exc)


_publisher: Publisher | None = None
_publisher_lock = threading.Lock()


def current_publisher() -> Publisher | None:
    """This process's publisher (None in a forked child until it starts its own)."""
    publisher = _publisher
    return publisher if publisher is not None and publisher.pid == os.getpid() else None


def start_publisher(client: redis.Redis, namespace: str, *, at_exit: bool = True) -> Publisher:
    """Start this process's publisher once (idempotent; a forked child gets its own)."""
    global _publisher
    with _publisher_lock:
        publisher = current_publisher()
        if publisher is None:
            publisher = _publisher = Publisher(client, namespace)
            publisher.start()
            if at_exit:
                atexit.register(publisher.stop)
        return publisher


def stop_publisher() -> None:
    """Retire this process's counts now (processes that leave through ``os._exit`` call this)."""
    publisher = current_publisher()
    if publisher is not None:
        atexit.unregister(publisher.stop)
        publisher.stop()


# --------------------------------------------------------------------------- scraping


def fold_stale(client: redis.Redis, namespace: str, stale_s: float = STALE_S) -> int:
    """Fold into ``retired`` every process that has not written for ``stale_s`` (it died)."""
    index, retired, prefix = _keys(namespace)
    cutoff = client.time()[0] - stale_s
    folded = 0
    for member in client.zrangebyscore(index, "-inf", cutoff):
        pid = member.decode() if isinstance(member, bytes) else member
        keys = (index, prefix + pid, retired, f"{prefix}{pid}:folded")
        folded += int(client.eval(_FOLD, 4, *keys, pid, cutoff, TOMBSTONE_TTL_S))
    return folded


def cluster_samples(
    client: redis.Redis, namespace: str, local: dict[Series, float] | None = None, own_id: str | None = None
) -> dict[Series, float]:
    """Every process's samples summed: the retired totals, the live snapshots but ``own_id``'s, and
    ``local`` (this process now; by default its registry less what it already retired)."""
    fold_stale(client, namespace)
    index, retired, prefix = _keys(namespace)
    if local is None:
        own = current_publisher()
        local = own.samples() if own is not None else local_samples()
        own_id = own.id if own is not None else None
    members = [m.decode() if isinstance(m, bytes) else m for m in client.zrange(index, 0, -1)]
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(retired)
    for member in members:
        if member != own_id:
            pipe.hgetall(prefix + member)
    totals: dict[Series, float] = defaultdict(float)
    for values in pipe.execute():
        for key, value in values.items():
            totals[key.decode() if isinstance(key, bytes) else key] += float(value)
    for key, value in local.items():
        totals[key] += value
    return totals


def _decoded(values: dict[Any, Any]) -> dict[Series, float]:
    return {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in values.items()}


def retired_samples(client: redis.Redis, namespace: str) -> dict[Series, float]:
    """The totals of processes that stopped (or were folded as dead), without folding anything: a
    caller that stops a set of processes reads their whole contribution as the change of this."""
    return _decoded(client.hgetall(_keys(namespace)[1]))


def live_samples(client: redis.Redis, namespace: str) -> dict[str, dict[Series, float]]:
    """Each live process's last snapshot, by publisher id (``host:pid:suffix``)."""
    index, _retired, prefix = _keys(namespace)
    members = [m.decode() if isinstance(m, bytes) else m for m in client.zrange(index, 0, -1)]
    pipe = client.pipeline(transaction=False)
    for member in members:
        pipe.hgetall(prefix + member)
    return {member: _decoded(values) for member, values in zip(members, pipe.execute(), strict=True)}


def _families(registry: CollectorRegistry) -> dict[str, tuple[str, str, str]]:
    """Sample name → (family name, type, help) for every metric this code defines."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    found = {}
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            found[family.name + suffix] = (family.name, family.type, family.documentation)
    return found


def _bucket_order(item: tuple[str, list[list[str]], float]) -> tuple[Any, ...]:
    name, labels, _value = item
    le = dict(labels).get("le")
    others = [pair for pair in labels if pair[0] != "le"]
    return (others, name, float(le) if le is not None else 0.0)


def families(totals: dict[Series, float], registry: CollectorRegistry = REGISTRY) -> Iterator[Metric]:
    """Merged samples as metric families (series of metrics this code does not define are left out)."""
    known = _families(registry)
    grouped: dict[str, list[tuple[str, list[list[str]], float]]] = defaultdict(list)
    for key, value in totals.items():
        try:
            name, labels = json.loads(key)
        except ValueError:  # not a series this code wrote
            continue
        if name in known:
            grouped[known[name][0]].append((name, labels, value))
    meta = {family: (kind, doc) for family, kind, doc in known.values()}
    for family_name in sorted(grouped):
        kind, doc = meta[family_name]
        metric = Metric(family_name, doc, kind)
        for name, labels, value in sorted(grouped[family_name], key=_bucket_order):
            metric.add_sample(name, dict(labels), value)
        yield metric


def queue_gauges(depth: int, oldest_age_s: float) -> Iterable[Metric]:
    yield GaugeMetricFamily("baton_queue_depth", "Steps queued and due, waiting for a worker", depth)
    yield GaugeMetricFamily(
        "baton_queue_oldest_age_seconds", "How long the oldest due queued step has waited", oldest_age_s
    )
