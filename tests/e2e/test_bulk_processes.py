"""Bulk retry of 1,000 failed runs against a real ``baton api`` and ``baton worker``: the dry run
counts 1,000, and the request sent twice (at once) with one Idempotency-Key is one action that
makes 1,000 linked runs, once each, executed by the worker processes."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, insert, select

from app.config import Config
from app.queue import StepQueue, make_broker
from app.services import Services
from app.timeutil import utcnow
from models import Run, RunStatus, StepRun
from tests import factories
from tests.conftest import BATON, baton_api, new_key, session_env, wait_for

RUNS = 1_000


@pytest.fixture
def bulk_config(config: Config, services: Services) -> Iterator[Config]:
    """The session's database, and a queue namespace of this test's own: only the worker started
    here consumes its messages (not the session's in-process worker)."""
    scoped = config.with_overrides(queue_namespace=f"{config.queue_namespace}-bulk{uuid.uuid4().hex[:6]}")
    yield scoped
    for key in services.redis.scan_iter(f"{scoped.queue_namespace}:*"):
        services.redis.delete(key)
    broker = make_broker(scoped)
    StepQueue(broker).delete_queues()
    broker.close()


def _seed_failed_runs(services: Services, key: str) -> tuple[str, list[str]]:
    """A two-step workflow and 1,000 of its runs failed at the second step (rows, no messages)."""
    from app import keys

    with services.db.session() as session:
        company_id = keys.authenticate(session, key).company_id
        workflow = factories.workflow(
            session,
            company_id,
            [
                {"id": "fetch", "action": "transform", "input": {"n": "{{ input.n }}"}},
                {"id": "charge", "action": "transform", "input": {"n": "{{ steps.fetch.output.n }}"}},
            ],
        )
        start = utcnow() - timedelta(hours=2)
        runs = [
            factories.run_values(
                workflow, "failed", input={"n": i}, created_at=start + timedelta(milliseconds=i)
            )
            for i in range(RUNS)
        ]
        factories.insert_runs(session, runs)
        steps = []
        for run in runs:
            began = run["started_at"]
            common = {"run_id": run["id"], "attempt": 1, "started_at": began, "completed_at": began}
            steps.append(
                {**common, "step_id": "fetch", "position": 0, "status": "success", "duration_ms": 3}
                | {"input": {"n": run["input"]["n"]}, "output": {"n": run["input"]["n"]}, "reused": False}
            )
            steps.append(
                {**common, "step_id": "charge", "position": 1, "status": "error", "duration_ms": 5}
                | {"input": {"n": run["input"]["n"]}, "error": factories.STEP_ERROR, "reused": False}
            )
        session.execute(insert(StepRun), steps)
        session.commit()
    return workflow.id, [run["id"] for run in runs]


def _start_worker(config: Config, log: Path) -> subprocess.Popen[bytes]:
    env = session_env(config)
    env.update(
        DATABASE_URL=str(config.database_url),
        REDIS_URL=str(config.redis_url),
        BATON_QUEUE_NAMESPACE=config.queue_namespace,
        BATON_LOG_LEVEL="INFO",
    )
    with open(log, "wb") as out:
        return subprocess.Popen(
            [BATON, "worker", "-p", "1", "-t", "4"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _children(services: Services, originals: list[str]) -> list[tuple[str, str, str, RunStatus]]:
    with services.db.session() as session:
        return list(
            session.execute(
                select(Run.id, Run.restarted_from_run_id, Run.restart_from_step_id, Run.status).where(
                    Run.restarted_from_run_id.in_(originals)
                )
            ).all()
        )


def test_bulk_retry_of_a_thousand_failed_runs_makes_a_thousand_linked_runs_once(
    bulk_config: Config, services: Services, tmp_path: Path
) -> None:
    key = new_key(services, "bulk")
    workflow_id, originals = _seed_failed_runs(services, key)
    worker = _start_worker(bulk_config, tmp_path / "worker.log")
    try:
        with baton_api(bulk_config, tmp_path / "api.log", workers=2) as (base, _api):
            wait_for(
                lambda: "ready after" in (tmp_path / "worker.log").read_text(errors="replace"),
                60,
                "the worker to start",
            )
            headers = {"x-api-key": key}
            url = f"{base}/api/v1/runs/bulk/retry"
            body = {"filter": {"workflowId": workflow_id, "status": "failed"}}

            dry = requests.post(url, json={**body, "dryRun": True}, headers=headers, timeout=30)
            assert dry.status_code == 200, dry.text
            assert dry.json()["data"]["count"] == RUNS
            assert dry.json()["data"]["sampleRunIds"] == originals[:10]

            sent_at = time.monotonic()
            twice = {**headers, "Idempotency-Key": f"after-the-fix-{uuid.uuid4().hex[:8]}"}
            with ThreadPoolExecutor(2) as pool:
                answers = list(
                    pool.map(lambda _: requests.post(url, json=body, headers=twice, timeout=60), range(2))
                )
            assert [a.status_code for a in answers] == [202, 202], [a.text for a in answers]
            [bulk_id] = {a.json()["data"]["id"] for a in answers}
            assert sorted(a.headers.get("Idempotent-Replayed", "") for a in answers) == ["", "true"]

            def progress() -> dict[str, Any]:
                answer = requests.get(f"{base}/api/v1/bulk-actions/{bulk_id}", headers=headers, timeout=30)
                assert answer.status_code == 200, answer.text
                return answer.json()["data"]

            seen: list[int] = []

            def finished() -> dict[str, Any] | None:
                data = progress()
                seen.append(data["done"])
                if data["status"] != "running":
                    return data
                time.sleep(0.2)  # a poll as a client would make it, not a tight loop on the API
                return None

            final = wait_for(finished, 300, f"the bulk action to finish\n{progress()}")
            acted_s = time.monotonic() - sent_at
            assert final == {
                "id": bulk_id,
                "action": "retry",
                "status": "completed",
                "total": RUNS,
                "done": RUNS,
                "failed": 0,
            }
            assert seen == sorted(seen)  # progress only moves forward

            # A third send with the key, after it finished: the same action, nothing more made.
            third = requests.post(url, json=body, headers=twice, timeout=60)
            assert third.status_code == 202 and third.json()["data"]["id"] == bulk_id

            children = _children(services, originals)
            assert len(children) == RUNS
            assert sorted(parent for _, parent, _, _ in children) == sorted(originals)
            assert {step for _, _, step, _ in children} == {"charge"}
            # Linked as a single retry links them: the original lists its child.
            sample = requests.get(f"{base}/api/v1/runs/{originals[0]}", headers=headers, timeout=30).json()
            assert sample["data"]["restartedRunIds"] == [c for c, p, _, _ in children if p == originals[0]]

            def all_completed() -> bool:
                statuses = [status for *_, status in _children(services, originals)]
                return statuses.count(RunStatus.COMPLETED) == RUNS

            wait_for(all_completed, 300, "the retried runs to complete")
            executed_s = time.monotonic() - sent_at
            with services.db.session() as session:
                outputs = session.execute(
                    select(func.count()).where(
                        Run.restarted_from_run_id.in_(originals), Run.output.is_not(None)
                    )
                ).scalar_one()
            assert outputs == RUNS
            print(
                f"\nbulk retry of {RUNS} runs: action completed in {acted_s:.1f} s, "
                f"the {RUNS} new runs executed by {executed_s:.1f} s (progress polls: {len(seen)})"
            )
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=40)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
