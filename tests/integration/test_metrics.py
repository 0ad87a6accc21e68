"""Metrics across processes (app/metrics.py) on the real Redis, and counting at commit on PostgreSQL.

Each "process" here is a Publisher over a registry of its own, so the merge, the retirement of a
process that stops, and the folding of one that died are seen exactly as a scrape sees them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import text

from app import metrics

STARTED = metrics.series_key("baton_runs_started_total", {"workflow_id": "wf_a"})


class Process:
    """One process's registry (the same metric names as Baton's) and its publisher."""

    def __init__(self, services: Any, namespace: str) -> None:
        self.registry = CollectorRegistry()
        self.started = Counter("baton_runs_started", "", ["workflow_id"], registry=self.registry)
        self.duration = Histogram(
            "baton_step_duration_seconds", "", ["action"], buckets=(0.1, 1), registry=self.registry
        )
        self.publisher = metrics.Publisher(services.redis, namespace, registry=self.registry)


@pytest.fixture
def namespace(services: Any) -> Iterator[str]:
    name = f"{services.namespace}-metrics-{uuid.uuid4().hex[:6]}"
    yield name
    for key in services.redis.scan_iter(f"{name}:*"):
        services.redis.delete(key)


def merged(services: Any, namespace: str) -> dict[str, float]:
    """What a scrape from a process with nothing of its own sees."""
    return dict(metrics.cluster_samples(services.redis, namespace, local={}))


def live(services: Any, namespace: str) -> int:
    return services.redis.zcard(f"{namespace}:metrics:live")


def test_live_processes_are_summed_and_a_stopped_one_is_retired(services, namespace):
    one, two = Process(services, namespace), Process(services, namespace)
    one.started.labels("wf_a").inc(3)
    two.started.labels("wf_a").inc(4)
    one.duration.labels("transform").observe(0.05)
    two.duration.labels("transform").observe(0.5)
    one.publisher.publish()
    two.publisher.publish()
    totals = merged(services, namespace)
    assert totals[STARTED] == 7
    bucket = metrics.series_key("baton_step_duration_seconds_bucket", {"action": "transform", "le": "0.1"})
    count = metrics.series_key("baton_step_duration_seconds_count", {"action": "transform"})
    assert (totals[bucket], totals[count]) == (1, 2)
    assert live(services, namespace) == 2

    one.started.labels("wf_a").inc(2)  # counted after its last snapshot, before it stops
    one.publisher.retire()
    assert live(services, namespace) == 1
    assert merged(services, namespace)[STARTED] == 9  # nothing lost, nothing backwards


def test_a_dead_process_is_folded_and_a_stalled_one_is_never_counted_twice(services, namespace):
    survivor, stalled = Process(services, namespace), Process(services, namespace)
    survivor.started.labels("wf_a").inc(1)
    stalled.started.labels("wf_a").inc(5)
    survivor.publisher.publish()
    stalled.publisher.publish()

    # Silent for longer than the stale limit: a scrape folds both into the retired totals.
    assert metrics.fold_stale(services.redis, namespace, stale_s=-1) == 2
    assert live(services, namespace) == 0
    assert merged(services, namespace)[STARTED] == 6

    # The stalled one was alive after all: it counts on from what was folded, under a new id.
    stalled.started.labels("wf_a").inc(2)
    old_id = stalled.publisher.id
    stalled.publisher.publish()
    assert stalled.publisher.id != old_id
    assert merged(services, namespace)[STARTED] == 8
    stalled.started.labels("wf_a").inc(1)
    stalled.publisher.retire()
    assert merged(services, namespace)[STARTED] == 9

    # Retiring after a fold adds only what came since the last published snapshot.
    survivor.started.labels("wf_a").inc(10)
    survivor.publisher.retire()
    assert merged(services, namespace)[STARTED] == 19


def test_families_render_counters_and_histograms_with_their_types(services, namespace):
    one = Process(services, namespace)
    one.started.labels("wf_a").inc()
    one.duration.labels("transform").observe(0.5)
    one.publisher.publish()
    found = {f.name: f for f in metrics.families(merged(services, namespace), one.registry)}
    assert found["baton_runs_started"].type == "counter"
    assert found["baton_step_duration_seconds"].type == "histogram"
    buckets = [s.labels["le"] for s in found["baton_step_duration_seconds"].samples if "le" in s.labels]
    assert buckets == ["0.1", "1.0", "+Inf"]


def test_counts_wait_for_the_commit_and_a_rollback_counts_nothing(services):
    seen: list[str] = []
    with services.db.session() as session:
        session.execute(text("SELECT 1"))
        metrics.on_commit(session, lambda: seen.append("rolled back"))
        session.rollback()
        session.execute(text("SELECT 1"))
        metrics.on_commit(session, lambda: seen.append("committed"))
        assert seen == []
        session.commit()
    assert seen == ["committed"]


def test_an_idle_process_only_says_it_is_alive_and_resends_all_after_redis_lost_it(services, namespace):
    one = Process(services, namespace)
    one.started.labels("wf_a").inc(2)
    one.publisher.publish()
    live_hash = f"{namespace}:metrics:proc:{one.publisher.id}"
    services.redis.hset(live_hash, "marker", "1")  # an unchanged publish rewrites nothing
    one.publisher.publish()
    assert services.redis.hget(live_hash, "marker") == b"1"

    services.redis.delete(live_hash)  # as after a Redis restart without persistence
    one.publisher.publish()
    assert merged(services, namespace)[STARTED] == 2
