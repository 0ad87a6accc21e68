"""``baton dev`` on the embedded default (SQLite, embedded Redis): its scheduler fires cron schedules."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import requests

from tests.conftest import wait_for

BATON = str(Path(sys.executable).with_name("baton"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lines(stream: Any, into: list[str]) -> None:
    for line in stream:
        into.append(line)


def test_dev_starts_the_scheduler_and_a_per_second_cron_fires(tmp_path: Path) -> None:
    """The embedded default, as a new user runs it: the scheduler is announced, a per-second
    schedule makes completed runs, and SIGTERM stops everything with exit 0."""
    embedded = ("DATABASE_URL", "REDIS_URL", "BROKER_URL", "BATON_VAR_DIR")
    env = {k: v for k, v in os.environ.items() if k not in embedded}
    env["BATON_SCHEDULE_MIN_INTERVAL_S"] = "1"  # the default refuses a per-second cron
    port = _free_port()
    proc = subprocess.Popen(
        [BATON, "dev", "--port", str(port), "--processes", "1", "--threads", "2"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: list[str] = []
    err: list[str] = []
    for stream, into in ((proc.stdout, out), (proc.stderr, err)):
        threading.Thread(target=_lines, args=(stream, into), daemon=True).start()
    try:
        key_line = wait_for(
            lambda: next((line for line in out if line.startswith("API key: ")), None), 120, "the dev key"
        )
        base = f"http://127.0.0.1:{port}/api/v1"
        headers = {"x-api-key": key_line.split()[-1]}
        schedule = {"cron": "* * * * * *", "input": {"tick": True}}
        created = requests.post(
            f"{base}/workflows",
            json={
                "name": "tick",
                "steps": [{"id": "a", "action": "transform", "input": {"n": 1}}],
                "triggers": {"schedule": schedule},
            },
            headers=headers,
            timeout=30,
        )
        assert created.status_code == 201, created.text
        wid = created.json()["data"]["id"]

        def completed() -> list[dict[str, Any]]:
            page = requests.get(f"{base}/runs", params={"workflowId": wid}, headers=headers, timeout=30)
            done = [r for r in page.json()["data"] if r["status"] == "completed"]
            return done if len(done) >= 2 else []

        runs = wait_for(completed, 60, "two completed scheduled runs")
        assert {r["triggerType"] for r in runs} == {"schedule"}
        assert any("starting the scheduler" in line for line in err), "".join(err[-20:])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
    assert proc.returncode == 0, "".join(err[-20:])
    assert not any("database is locked" in line for line in err), "".join(err[-40:])
