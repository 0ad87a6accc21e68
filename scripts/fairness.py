#!/usr/bin/env python3
"""Fairness between companies on real processes: one company starts N slow runs, then another
company triggers a 1-step run; how long does that run take? (issue "Hostile tenants")

    .venv/bin/python scripts/fairness.py            # 40 slow runs, 3 rounds, about 1 minute
    .venv/bin/python scripts/fairness.py --slow-runs 80 --hold-s 3

``baton api`` and ``baton worker`` (2 processes x 8 threads) run as child processes against a
dedicated PostgreSQL database and Redis db, as in ``scripts/bench.py``. Each slow step is an
``http.request`` to a local listener that holds every request ``--hold-s`` seconds. Rounds
alternate the default configuration (``BATON_COMPANY_MAX_CONCURRENT_STEPS`` unset: auto) with the
cap turned off (``0``), the in-run baseline. Printed per mode: the other company's run, trigger
to completed (median and worst), and the most slow requests the listener saw at once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests
from bench import VAR, Api, Bench, BenchError, Children, Interrupted, free_port, log, signals_raise

MODES = {"auto (default)": None, "off (0)": "0"}


class SlowListener:
    """Holds each request ``hold_s`` seconds and records how many were in flight at once."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s, self.in_flight, self.peak, self.lock = hold_s, 0, 0, threading.Lock()
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                with listener.lock:
                    listener.in_flight += 1
                    listener.peak = max(listener.peak, listener.in_flight)
                time.sleep(listener.hold_s)
                with listener.lock:
                    listener.in_flight -= 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/slow"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            self.peak = self.in_flight

    def close(self) -> None:
        self.server.shutdown()


def wait_until(label: str, condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"{label}: not within {timeout:.0f} s")
        time.sleep(0.02)


def run_status(api: Api, run_id: str) -> dict[str, Any]:
    response = api.session.get(f"{api.base_url}/api/v1/runs/{run_id}", timeout=10)
    response.raise_for_status()
    return response.json()["data"]


def one_round(bench: Bench, other: Api, listener: SlowListener, slow: str, quick: str) -> dict[str, float]:
    args = bench.args
    listener.reset()
    slow_runs = [bench.api.trigger(slow) for _ in range(args.slow_runs)]
    wait_until("slow steps started", lambda: listener.in_flight >= min(8, args.slow_runs), 30)
    time.sleep(0.3)  # let the busy company settle at whatever the pool gives it
    sent = time.monotonic()
    run_id = other.trigger(quick)
    while (status := run_status(other, run_id))["status"] not in ("completed", "failed"):
        if time.monotonic() - sent > 60:
            raise BenchError("the other company's run did not finish within 60 s")
        time.sleep(0.005)
    took = time.monotonic() - sent
    if status["status"] != "completed":
        raise BenchError(f"the other company's run ended {status['status']}: {status.get('error')}")
    peak = listener.peak
    wait_until(
        "the slow runs to finish",
        lambda: (
            all(run_status(bench.api, r)["status"] == "completed" for r in slow_runs[-3:])
            and listener.in_flight == 0
        ),
        args.slow_runs * args.hold_s + 60,
    )
    return {"ms": took * 1000, "peak": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow-runs", type=int, default=40)
    parser.add_argument("--hold-s", type=float, default=2.0, help="how long each slow step takes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (alternating)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--pg", default="postgresql://root@127.0.0.1:5432")
    parser.add_argument("--db-name", default="baton_fairness")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/3")
    args = parser.parse_args(argv)
    children = Children()
    bench = Bench(args, children)
    bench.env["BATON_HTTP_ALLOW_NETWORKS"] = "127.0.0.0/8"
    listener = SlowListener(args.hold_s)
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    try:
        with signals_raise():
            try:
                bench.setup()
                other = Api(bench.api.base_url)
                other.key = bench._baton("keys", "create", "--company", "other").strip()
                body = {"method": "GET", "url": listener.url}
                steps = [{"id": "slow", "action": "http.request", "input": body}]
                slow = bench.api.post("/api/v1/workflows", {"name": "slow", "steps": steps}, 201)["id"]
                quick = other.create_workflow("quick", 1)
                for index in range(args.rounds):
                    for mode, cap in MODES.items():
                        env = dict(bench.env)
                        env.pop("BATON_COMPANY_MAX_CONCURRENT_STEPS", None)
                        if cap is not None:
                            env["BATON_COMPANY_MAX_CONCURRENT_STEPS"] = cap
                        saved, bench.env = bench.env, env
                        bench.start_baton_workers()
                        bench.env = saved
                        try:
                            result = one_round(bench, other, listener, slow, quick)
                        finally:
                            children.stop("baton-worker")
                        log(f"round {index + 1} {mode}: {result['ms']:.0f} ms, peak {result['peak']}")
                        results[mode].append(result)
            finally:
                children.stop_all()
                listener.close()
                bench.close()
    except Interrupted:
        return 130
    except (BenchError, requests.RequestException) as exc:
        log(f"FAILED: {exc}")
        return 1
    print(
        f"\n{args.slow_runs} slow runs ({args.hold_s:g} s each) of one company; another company's 1-step run"
    )
    print(f"{args.processes} worker processes x {args.threads} threads, {args.rounds} rounds per mode\n")
    print(f"{'per-company cap':<18}{'median ms':>10}{'worst ms':>10}{'peak slow':>11}")
    for mode, rows in results.items():
        ms = [r["ms"] for r in rows]
        print(
            f"{mode:<18}{statistics.median(ms):>10.0f}{max(ms):>10.0f}{max(r['peak'] for r in rows):>11.0f}"
        )
    log(f"logs in {VAR.name}/bench-*.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
