"""Run events over real HTTP (Server-Sent Events), fed by a real worker: every change of a run in
order, resume after a disconnect with Last-Event-ID (nothing lost, nothing twice), the company feed
filtered by workflow and by company, heartbeats, and the errors in the envelope."""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import requests

import api.events
from app import keys
from app.keys import WORKFLOWS_WRITE
from app.timeutil import iso, utcnow
from tests.conftest import baton_api, new_key, wait_for


@dataclass
class Sse:
    """One parsed SSE block: an event (id, event, data) or a comment."""

    id: str | None = None
    event: str | None = None
    data: Any = None
    comment: str | None = None


def parse_block(block: str) -> Sse:
    item, data = Sse(), []
    for line in block.split("\n"):
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "":
            item.comment = value
        elif name == "id":
            item.id = value
        elif name == "event":
            item.event = value
        elif name == "data":
            data.append(value)
    if data:
        item.data = json.loads("\n".join(data))
    return item


class Stream:
    """An open SSE response read in a thread of its own, so a test can wait on what arrived; closing
    shuts the socket down, as a browser tab that goes away does."""

    def __init__(self, base: str, path: str, headers: dict[str, str], **params: str) -> None:
        url = urlsplit(base)
        self.connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        query = f"?{urlencode(params)}" if params else ""
        self.connection.request("GET", f"{path}{query}", headers=headers)
        self.response = self.connection.getresponse()
        self.status, self.headers = self.response.status, self.response.headers
        self.items: list[Sse] = []
        self.closed = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        try:
            while chunk := self.response.read1(65536):
                buffer += chunk
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    self.items.append(parse_block(block.decode()))
        except (OSError, ValueError, http.client.HTTPException):
            pass  # the test closed the connection
        finally:
            self.closed.set()

    @property
    def events(self) -> list[Sse]:
        return [i for i in self.items if i.event is not None]

    def wait_events(self, count: int, timeout: float = 20.0) -> list[Sse]:
        return wait_for(lambda: len(self.events) >= count and self.events, timeout, f"{count} events")

    def wait_closed(self, timeout: float = 20.0) -> list[Sse]:
        wait_for(self.closed.is_set, timeout, "the server to end the stream")
        return self.events

    def close(self) -> None:
        if self.connection.sock is not None:
            with contextlib.suppress(OSError):
                self.connection.sock.shutdown(socket.SHUT_RDWR)
        self.connection.close()


@pytest.fixture
def open_stream(live_server: str, headers: dict[str, str]) -> Iterator[Any]:
    opened: list[Stream] = []

    def open_(path: str, extra: dict[str, str] | None = None, **params: str) -> Stream:
        stream = Stream(live_server, path, {**headers, **(extra or {})}, **params)
        opened.append(stream)
        return stream

    yield open_
    for stream in opened:
        stream.close()


def _moves(items: list[Sse]) -> list[tuple[str | None, str | None, str]]:
    return [(i.event, i.data.get("stepId"), i.data["status"]) for i in items]


def _ids(items: list[Sse]) -> list[tuple[int, int]]:
    return [tuple(int(p) for p in i.id.split("-")) for i in items]  # type: ignore[union-attr,misc]


FIVE_STEPS = [
    {"id": "one", "action": "transform", "input": {"n": 1}},
    {"id": "two", "action": "delay", "input": {"durationMs": 300}},
    {"id": "three", "action": "transform", "input": {"n": 3}},
    {"id": "four", "action": "delay", "input": {"durationMs": 300}},
    {"id": "five", "action": "transform", "input": {"n": "{{ steps.three.output.n }}"}},
]
# Every change of FIVE_STEPS's run, in order: the run, and each step's moves (a delay waits, then
# its due message runs it again to success).
FIVE_STEP_MOVES = [
    ("run", None, "pending"),
    ("step", "one", "queued"),
    ("step", "one", "running"),
    ("run", None, "running"),
    ("step", "one", "success"),
    ("step", "two", "running"),
    ("step", "two", "waiting"),
    ("step", "two", "running"),
    ("step", "two", "success"),
    ("step", "three", "running"),
    ("step", "three", "success"),
    ("step", "four", "running"),
    ("step", "four", "waiting"),
    ("step", "four", "running"),
    ("step", "four", "success"),
    ("step", "five", "running"),
    ("step", "five", "success"),
    ("run", None, "completed"),
]


def test_a_five_step_run_streams_every_change_in_order(
    worker, make_workflow, trigger, open_stream, client, headers
):
    run_id = trigger(make_workflow(FIVE_STEPS))["id"]
    stream = open_stream(f"/api/v1/runs/{run_id}/events")
    assert stream.status == 200
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    assert stream.headers["Cache-Control"] == "no-cache"
    assert stream.headers["X-Accel-Buffering"] == "no"
    received = stream.wait_closed()  # it ends by itself after the run's final event
    assert _moves(received) == FIVE_STEP_MOVES
    assert all(i.id for i in received) and _ids(received) == sorted(set(_ids(received)))
    run = client.get(f"/api/v1/runs/{run_id}", headers=headers).get_json()["data"]
    final = received[-1].data
    assert final == {
        k: run[k] for k in ("workflowId", "status", "startedAt", "completedAt", "durationMs", "error")
    } | {"runId": run_id}
    last_of = {i.data["stepId"]: i.data for i in received if i.event == "step"}
    for result in run["stepResults"]:
        shown = {
            k: result[k] for k in ("stepId", "status", "attempt", "startedAt", "completedAt", "durationMs")
        }
        assert {k: last_of[result["stepId"]][k] for k in shown} == shown


def test_a_finished_run_replays_its_history_and_closes(worker, make_workflow, trigger, wait_run, open_stream):
    run_id = trigger(make_workflow(FIVE_STEPS[:1]))["id"]
    wait_run(run_id)
    received = open_stream(f"/api/v1/runs/{run_id}/events").wait_closed()
    assert _moves(received) == [
        ("run", None, "pending"),
        ("step", "one", "queued"),
        ("step", "one", "running"),
        ("run", None, "running"),
        ("step", "one", "success"),
        ("run", None, "completed"),
    ]


def test_resuming_with_last_event_id_loses_and_repeats_nothing(
    worker, make_workflow, trigger, wait_run, open_stream
):
    run_id = trigger(make_workflow(FIVE_STEPS))["id"]
    first = open_stream(f"/api/v1/runs/{run_id}/events")
    seen = first.wait_events(7)  # up to the first delay, waiting; the rest happens while disconnected
    first.close()
    seen = list(seen)
    assert wait_run(run_id)["status"] == "completed"
    rest = open_stream(f"/api/v1/runs/{run_id}/events", {"Last-Event-ID": seen[-1].id}).wait_closed()
    assert _moves(seen + rest) == FIVE_STEP_MOVES
    assert len({i.id for i in seen + rest}) == len(FIVE_STEP_MOVES)
    # The query parameter does the same for clients that cannot set headers.
    again = open_stream(f"/api/v1/runs/{run_id}/events", lastEventId=seen[2].id).wait_closed()
    assert [i.id for i in again] == [i.id for i in (seen + rest)[3:]]


def test_resuming_after_the_final_event_is_204_so_eventsource_stops(
    worker, make_workflow, trigger, wait_run, live_server, headers, open_stream
):
    run_id = trigger(make_workflow(FIVE_STEPS[:1]))["id"]
    wait_run(run_id)
    final = open_stream(f"/api/v1/runs/{run_id}/events").wait_closed()[-1]
    response = requests.get(
        f"{live_server}/api/v1/runs/{run_id}/events",
        headers={**headers, "Last-Event-ID": final.id},
        timeout=10,
    )
    assert response.status_code == 204 and response.content == b""


def test_a_live_stream_ends_after_a_cancel(worker, make_workflow, trigger, client, headers, open_stream):
    run_id = trigger(make_workflow([{"id": "wait", "action": "delay", "input": {"durationMs": 60_000}}]))[
        "id"
    ]
    stream = open_stream(f"/api/v1/runs/{run_id}/events")
    # Cancel once the delay is parked (cancelling a step still running races its own record).
    wait_for(lambda: ("step", "wait", "waiting") in _moves(stream.events), what="the delay to park")
    assert client.post(f"/api/v1/runs/{run_id}/cancel", headers=headers).status_code == 200
    received = stream.wait_closed()
    assert _moves(received)[-2:] == [("step", "wait", "skipped"), ("run", None, "cancelled")]


def _company_key(services) -> tuple[str, dict[str, str]]:
    key = new_key(services, "events")
    return key, {"x-api-key": key}


def _workflow(client, hdrs: dict[str, str]) -> str:
    body = {"name": "events", "steps": [{"id": "a", "action": "transform", "input": {}}]}
    response = client.post("/api/v1/workflows", json=body, headers=hdrs)
    assert response.status_code == 201, response.get_json()
    return response.get_json()["data"]["id"]


def _start(client, hdrs: dict[str, str], workflow_id: str) -> str:
    response = client.post(f"/api/v1/workflows/{workflow_id}/runs", json={"input": {}}, headers=hdrs)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["data"]["id"]


def _completed(stream: Stream, run_id: str) -> bool:
    return any(
        i.event == "run" and i.data["runId"] == run_id and i.data["status"] == "completed"
        for i in stream.events
    )


def test_the_company_feed_filters_by_workflow_and_never_shows_another_company(
    worker, services, client, headers, wait_run, open_stream
):
    mine, other_wf = _workflow(client, headers), _workflow(client, headers)
    _other_key, other = _company_key(services)
    theirs = _workflow(client, other)
    only_mine = open_stream("/api/v1/events", workflowId=mine)
    everything = open_stream("/api/v1/events")
    for stream in (only_mine, everything):
        wait_for(lambda s=stream: s.items, what="the stream to open")  # ": connected": reading from now
    their_run = _start(client, other, theirs)
    other_run = _start(client, headers, other_wf)
    my_run = _start(client, headers, mine)
    for run_id in (my_run, other_run):
        wait_run(run_id)
    wait_for(lambda: _completed(only_mine, my_run), what="my run's final event")
    wait_for(lambda: _completed(everything, my_run) and _completed(everything, other_run), what="both runs")
    assert {i.data["runId"] for i in only_mine.events} == {my_run}
    assert {i.data["runId"] for i in everything.events} == {my_run, other_run}
    assert their_run not in {i.data["runId"] for i in everything.events}
    assert _moves([i for i in only_mine.events]) == [
        ("run", None, "pending"),
        ("step", "a", "queued"),
        ("step", "a", "running"),
        ("run", None, "running"),
        ("step", "a", "success"),
        ("run", None, "completed"),
    ]
    # Resume the company feed after its first event: exactly the rest of it.
    first = everything.events[0]
    resumed = open_stream("/api/v1/events", {"Last-Event-ID": first.id})
    count = len(everything.events) - 1
    assert [i.id for i in resumed.wait_events(count)][:count] == [i.id for i in everything.events[1:]]


def test_heartbeats_arrive_while_nothing_happens(open_stream, monkeypatch):
    monkeypatch.setattr(api.events, "HEARTBEAT_S", 0.2)
    stream = open_stream("/api/v1/events")
    beats = wait_for(
        lambda: (b := [i for i in stream.items if i.comment == "heartbeat"]) and len(b) >= 2 and b,
        what="two heartbeats",
    )
    assert len(beats) >= 2 and not stream.events


def test_a_stream_ends_at_its_time_limit_and_resumes(monkeypatch, open_stream):
    monkeypatch.setattr(api.events, "STREAM_MAX_S", 0.3)
    stream = open_stream("/api/v1/events")
    stream.wait_closed(timeout=10)
    assert stream.status == 200


def test_streams_end_promptly_at_shutdown(open_stream):
    stream = open_stream("/api/v1/events")
    wait_for(lambda: stream.items, what="the stream to open")
    api.events.SHUTDOWN.set()
    try:
        stream.wait_closed(timeout=5)
    finally:
        api.events.SHUTDOWN.clear()


# ------------------------------------------------------------------ errors, in the envelope


def _error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.data
    assert response.get_json() == {"success": False, "error": response.get_json()["error"]}
    assert response.get_json()["error"]["code"] == code


@pytest.mark.parametrize(
    "path", ["/api/v1/events", "/api/v1/runs/run_0190f0a0-0000-7000-8000-000000000000/events"]
)
def test_no_key_is_401_and_a_key_without_runs_read_is_403(client, services, path):
    _error(client.get(path), 401, "UNAUTHORIZED")
    _error(client.get(path, headers={"x-api-key": "bk_nope_nope"}), 401, "UNAUTHORIZED")
    with services.db.session() as session:
        company = keys.get_or_create_company(session, "events-scopes")
        key = keys.create_key(session, company, "writer", [WORKFLOWS_WRITE])
        session.commit()
    _error(client.get(path, headers={"x-api-key": key}), 403, "FORBIDDEN")


def test_another_companys_run_is_404(worker, services, client, headers, trigger, make_workflow):
    run_id = trigger(make_workflow(FIVE_STEPS[:1]))["id"]
    _key, other = _company_key(services)
    _error(client.get(f"/api/v1/runs/{run_id}/events", headers=other), 404, "NOT_FOUND")
    _error(client.get("/api/v1/runs/run_nope/events", headers=headers), 404, "NOT_FOUND")
    _error(
        client.get("/api/v1/runs/run_0190f0a0-0000-7000-8000-000000000000/events", headers=headers),
        404,
        "NOT_FOUND",
    )


def test_a_malformed_last_event_id_or_workflow_id_is_400(client, headers):
    _error(
        client.get("/api/v1/events", headers={**headers, "Last-Event-ID": "yesterday"}),
        400,
        "VALIDATION_ERROR",
    )
    _error(client.get("/api/v1/events?lastEventId=1-x", headers=headers), 400, "VALIDATION_ERROR")
    _error(client.get("/api/v1/events?workflowId=Not%20One", headers=headers), 400, "VALIDATION_ERROR")


# ------------------------------------------------------------------ degraded: the stream is gone


def test_a_run_whose_stream_is_gone_replays_its_rows_and_closes(
    worker, services, make_workflow, trigger, wait_run, open_stream, client, headers
):
    from app import events

    run_id = trigger(make_workflow(FIVE_STEPS[:1] + FIVE_STEPS[2:3]))["id"]
    wait_run(run_id)
    services.redis.delete(events.run_stream(services.namespace, run_id))  # expired, or Redis restarted empty
    received = open_stream(f"/api/v1/runs/{run_id}/events").wait_closed()
    assert _moves(received) == [
        ("step", "one", "success"),
        ("step", "three", "success"),
        ("run", None, "completed"),
    ]
    assert [i.id for i in received] == ["0-1", "0-2", "0-3"]
    run = client.get(f"/api/v1/runs/{run_id}", headers=headers).get_json()["data"]
    assert received[-1].data["completedAt"] == run["completedAt"]
    rest = open_stream(f"/api/v1/runs/{run_id}/events", {"Last-Event-ID": "0-1"}).wait_closed()
    assert [i.id for i in rest] == ["0-2", "0-3"]


# ------------------------------------------------------------------ restart lineage


def test_get_run_lists_the_runs_restarted_from_it_newest_first(
    worker, make_workflow, trigger, wait_run, client, headers
):
    failing = [{"id": "a", "action": "fail", "input": {"code": "X", "message": "no"}}]
    original = wait_run(trigger(make_workflow(failing))["id"])
    assert original["status"] == "failed" and original["restartedRunIds"] == []
    children = []
    for _ in range(2):
        response = client.post(f"/api/v1/runs/{original['id']}/retry", headers=headers)
        assert response.status_code == 202, response.get_json()
        data = response.get_json()["data"]
        children.append(data["newRunId"])
        wait_for(
            lambda c=data["createdAt"]: iso(utcnow()) > c, what="the next millisecond"
        )  # distinct createdAt
    shown = client.get(f"/api/v1/runs/{original['id']}", headers=headers).get_json()["data"]
    assert shown["restartedRunIds"] == children[::-1]
    child = wait_run(children[0])
    assert child["restartedFromRunId"] == original["id"] and child["restartedRunIds"] == []


# ------------------------------------------------------------------ under gunicorn (baton api)


@pytest.fixture
def gunicorn_api(config: Any, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """``baton api`` with one worker process on the session's database and Redis."""
    log = tmp_path / "api.log"
    with baton_api(config, log, workers=1) as (base, proc):
        yield base, proc, log


def test_open_streams_neither_starve_the_api_nor_hold_up_its_shutdown(gunicorn_api, headers):
    base, proc, log = gunicorn_api
    streams = [Stream(base, "/api/v1/events", headers) for _ in range(8)]  # more than the old 4 threads
    for stream in streams:
        wait_for(lambda s=stream: s.items, what="a stream to open")
    listed = requests.get(f"{base}/api/v1/runs", headers=headers, timeout=10)
    assert listed.status_code == 200 and listed.json()["success"] is True
    stopping = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    stopped_s = time.monotonic() - stopping
    print(f"\nbaton api stopped {stopped_s:.1f} s after SIGTERM with {len(streams)} streams open")
    for stream in streams:
        stream.wait_closed(timeout=5)
    assert proc.returncode == 0, log.read_text(errors="replace")
    # Its graceful timeout is 20 s: the streams ended on SIGTERM rather than being waited out.
    assert stopped_s < 15, log.read_text(errors="replace")
