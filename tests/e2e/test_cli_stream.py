"""``baton runs watch`` on an API with an event stream (the shapes of DESIGN §12): a local HTTP server
plays the API, drops the stream once, and checks that the CLI resumes with ``Last-Event-ID``."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from click.testing import CliRunner

from app.cli import cli

RUN_ID, WORKFLOW_ID = "run_0001", "wf_watch"


def _step(step_id: str, status: str, attempt: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "runId": RUN_ID,
        "stepId": step_id,
        "status": status,
        "attempt": attempt,
        "startedAt": "2024-01-15T10:30:00.000Z",
        "completedAt": None if status == "running" else "2024-01-15T10:30:01.000Z",
        "durationMs": None if status == "running" else 1000,
        "error": None,
        **extra,
    }


def _run(status: str) -> dict[str, Any]:
    return {"runId": RUN_ID, "workflowId": WORKFLOW_ID, "status": status, "error": None, "durationMs": 3000}


# Two connections: the first drops after step a; the second must resume after event 2-0.
FIRST = [
    ("1-0", "run", _run("running")),
    ("2-0", "step", _step("a", "running")),
    ("3-0", "step", _step("a", "success")),
]
SECOND = [
    ("4-0", "step", _step("b", "error", error={"code": "HTTP_ERROR", "message": "503"})),
    ("5-0", "step", _step("b", "success", attempt=2)),
    ("6-0", "step", _step("c", "success")),
    ("7-0", "run", _run("completed")),
]


class FakeApi:
    """The three routes `watch` reads; records the Last-Event-ID of each stream request."""

    def __init__(self) -> None:
        self.resumed_from: list[str | None] = []
        self.status = "running"
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.headers.get("x-api-key") != "bk_test":
                    return self._json(
                        401, {"success": False, "error": {"code": "UNAUTHORIZED", "message": "no"}}
                    )
                if self.path == f"/api/v1/runs/{RUN_ID}/events":
                    return self._events(self.headers.get("Last-Event-ID"))
                if self.path == f"/api/v1/runs/{RUN_ID}":
                    return self._json(200, {"success": True, "data": api.run_body()})
                if self.path == f"/api/v1/workflows/{WORKFLOW_ID}":
                    steps = [{"id": s, "action": "transform"} for s in "abc"]
                    return self._json(200, {"success": True, "data": {"id": WORKFLOW_ID, "steps": steps}})
                return self._json(
                    404, {"success": False, "error": {"code": "NOT_FOUND", "message": "Not found"}}
                )

            def _json(self, status: int, body: Any) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _events(self, last_id: str | None) -> None:
                api.resumed_from.append(last_id)
                batch = FIRST if last_id is None else [e for e in SECOND if e[0] > last_id]
                if last_id is not None:
                    api.status = "completed"
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(b": connected\n\n")
                for event_id, kind, data in batch:
                    self.wfile.write(f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode())
                    self.wfile.flush()
                self.close_connection = True  # the first stream "drops" before the run ends

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def run_body(self) -> dict[str, Any]:
        steps = [_step("a", "success"), _step("b", "success", attempt=2), _step("c", "success")]
        steps = steps if self.status == "completed" else []
        return {
            "id": RUN_ID,
            "workflowId": WORKFLOW_ID,
            "workflowVersion": 1,
            "status": self.status,
            "stepResults": steps,
            "durationMs": 3000 if self.status == "completed" else None,
            "error": None,
        }


@pytest.fixture
def fake_api() -> Iterator[FakeApi]:
    api = FakeApi()
    yield api
    api.server.shutdown()


def test_watch_follows_the_event_stream_and_resumes_after_a_drop(fake_api, tmp_path):
    env = {"BATON_URL": fake_api.url, "BATON_API_KEY": "bk_test", "XDG_CONFIG_HOME": str(tmp_path)}
    result = CliRunner().invoke(cli, ["runs", "watch", RUN_ID], env=env, prog_name="baton")
    assert result.exit_code == 0, result.output
    assert fake_api.resumed_from == [None, "3-0"]
    lines = result.stdout.splitlines()
    shown = [tuple(line.split()[1:5]) for line in lines[1:-1]]
    assert shown == [
        ("a", "running", "attempt", "1"),
        ("a", "success", "attempt", "1"),
        ("b", "error", "attempt", "1"),
        ("b", "success", "attempt", "2"),
        ("c", "success", "attempt", "1"),
    ], result.stdout
    assert "HTTP_ERROR: 503" in lines[3]
    assert re.fullmatch(r"run completed in 3\.0 s \(3/3 steps\)", lines[-1])
