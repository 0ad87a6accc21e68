"""The ``baton worker`` pool: N Dramatiq worker processes; a dead one is restarted alone.

Dramatiq's own CLI stops every worker process when one of them dies. This supervisor keeps the
others running and starts a replacement. ``python -m workers.pool -p N -t T`` runs the supervisor;
each child (``--child``) runs one ``dramatiq.Worker`` on the broker that ``workers.main`` sets.
Every child holds the write end of a pipe: it writes one byte once its worker runs, and the
supervisor sees end-of-file the moment it dies (however it dies), so a restart starts at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from app.config import Config

logger = logging.getLogger("baton.pool")

# The same shape as the Baton processes' own log lines (the supervisor imports no engine code,
# so a broken engine cannot stop it from reporting why its children do not start).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
SHUTDOWN_TIMEOUT_S = 30.0
QUICK_DEATH_S = 5.0  # a child dying sooner than this after its start is crash-looping
BACKOFF_CAP_S = 5.0  # plus a child's start-up (~1.5 s), a crash-looping child is back within 10 s
MAX_FAILED_STARTS = 5  # children in a row that exited on their own before running a worker
EXIT_BOOT_FAILED = 3  # a child's exit code when it could not start its worker
POLL_S = 0.5


def restart_delay(quick_deaths: int) -> float:
    """Seconds before restarting a child after ``quick_deaths`` quick deaths in a row."""
    if quick_deaths <= 1:
        return 0.0
    return min(BACKOFF_CAP_S, 0.5 * 2 ** (quick_deaths - 2))


def describe_exit(returncode: int) -> str:
    """``exited with code 3`` or ``was killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass
class Slot:
    """One place in the pool: the child running there now and its restart history."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None  # read end of the child's pipe; end-of-file when it dies
    ready: bool = False
    started_at: float = 0.0
    quick_deaths: int = 0
    restart_at: float = 0.0


class Pool:
    """The supervisor: starts, watches, restarts and finally stops the worker processes."""

    def __init__(self, processes: int, threads: int, shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        self.slots = [Slot(index) for index in range(processes)]
        self.threads = threads
        self.shutdown_timeout_s = shutdown_timeout_s
        self.stopping = False
        self.failed_starts = 0
        self.last_failure = ""
        self._wakeup_r, self._wakeup_w = os.pipe()

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT (0) or until the children cannot start (1)."""
        self._install_signals()
        logger.info("starting %d worker processes x %d threads", len(self.slots), self.threads)
        while not self.stopping:
            self._reap()
            if self._given_up():
                self.stopping = True
                self._stop_children()
                logger.error(
                    "worker processes cannot start: %d failed starts in a row (the last %s); "
                    "see the errors above",
                    self.failed_starts,
                    self.last_failure,
                )
                return 1
            self._start_due()
            self._wait(self._next_timeout())
        logger.info("stopping worker processes (in-flight steps finish first)")
        self._stop_children()
        logger.info("worker pool stopped")
        return 0

    def _install_signals(self) -> None:
        os.set_blocking(self._wakeup_w, False)
        # Wakes select() at once; a plain handler would only run after its timeout.
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stopping = True

    def _given_up(self) -> bool:
        alive = any(slot.ready and slot.proc is not None for slot in self.slots)
        return self.failed_starts >= MAX_FAILED_STARTS and not alive

    def _start_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is None and slot.restart_at <= now:
                self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                self._child_args(write_fd), pass_fds=(write_fd,), stdin=subprocess.DEVNULL
            )
        except OSError as exc:
            os.close(read_fd)
            self._record_failed_start(f"could not be started ({exc})")
            slot.quick_deaths += 1
            slot.restart_at = time.monotonic() + restart_delay(slot.quick_deaths)
            return
        finally:
            os.close(write_fd)
        slot.proc, slot.ready_fd, slot.ready, slot.started_at = proc, read_fd, False, time.monotonic()
        logger.info("worker process %d started (slot %d)", proc.pid, slot.index)

    def _child_args(self, ready_fd: int) -> list[str]:
        # The child's worker.stop() gets most of the shutdown window; the rest is for closing.
        stop_timeout_ms = int(max(1.0, self.shutdown_timeout_s - 5.0) * 1000)
        return [
            sys.executable,
            "-m",
            "workers.pool",
            "--child",
            "--threads",
            str(self.threads),
            "--ready-fd",
            str(ready_fd),
            "--parent-pid",
            str(os.getpid()),
            "--stop-timeout-ms",
            str(stop_timeout_ms),
        ]

    def _next_timeout(self) -> float:
        now = time.monotonic()
        pending = [slot.restart_at - now for slot in self.slots if slot.proc is None]
        return max(0.0, min([POLL_S, *pending]))

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal, a child's ready byte or a child's death, or ``timeout``."""
        by_fd = {slot.ready_fd: slot for slot in self.slots if slot.ready_fd is not None}
        readable, _, _ = select.select([self._wakeup_r, *by_fd], [], [], timeout)
        for fd in readable:
            if fd == self._wakeup_r:
                os.read(fd, 512)
                continue
            slot = by_fd[fd]
            if os.read(fd, 64):
                slot.ready, self.failed_starts = True, 0
                assert slot.proc is not None
                elapsed = time.monotonic() - slot.started_at
                logger.info("worker process %d ready after %.2f s", slot.proc.pid, elapsed)
                continue
            self._close_ready_fd(slot)
            try:
                if slot.proc is not None:
                    slot.proc.wait(timeout=1)  # it is exiting: reap it now, restart it now
            except subprocess.TimeoutExpired:
                pass

    def _close_ready_fd(self, slot: Slot) -> None:
        if slot.ready_fd is not None:
            os.close(slot.ready_fd)
            slot.ready_fd = None

    def _reap(self) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is not None:
                self._on_exit(slot)

    def _on_exit(self, slot: Slot) -> None:
        """Log a child's end and, unless the pool is stopping, schedule its replacement."""
        assert slot.proc is not None
        pid, returncode = slot.proc.pid, slot.proc.returncode
        lived = time.monotonic() - slot.started_at
        self._close_ready_fd(slot)
        slot.proc = None
        how = describe_exit(returncode)
        if self.stopping:
            logger.info("worker process %d %s", pid, how)
            return
        if not slot.ready and returncode >= 0:
            # It ended on its own before running a worker (a kill from outside is no failed start).
            self._record_failed_start(how)
            if self._given_up():
                logger.warning("worker process %d %s after %.1f s", pid, how, lived)
                return
        slot.quick_deaths = slot.quick_deaths + 1 if lived < QUICK_DEATH_S else 0
        delay = restart_delay(slot.quick_deaths)
        slot.restart_at = time.monotonic() + delay
        logger.warning(
            "worker process %d %s after %.1f s; restarting it%s",
            pid,
            how,
            lived,
            f" in {delay:.2f} s" if delay else "",
        )

    def _record_failed_start(self, how: str) -> None:
        self.failed_starts += 1
        self.last_failure = how

    def _stop_children(self) -> None:
        """SIGTERM every child, wait for them up to the shutdown timeout, SIGKILL the rest."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout_s
        while any(slot.proc is not None for slot in self.slots) and time.monotonic() < deadline:
            self._wait(min(POLL_S, max(0.0, deadline - time.monotonic())))
            self._reap()
        for slot in self.slots:
            if slot.proc is not None:
                logger.warning(
                    "worker process %d did not stop within %.0f s; killing it",
                    slot.proc.pid,
                    self.shutdown_timeout_s,
                )
                slot.proc.kill()
                slot.proc.wait()
                self._on_exit(slot)


# --------------------------------------------------------------------------- child


def run_child(threads: int, ready_fd: int, parent_pid: int, stop_timeout_ms: int) -> NoReturn:
    """One worker process: a Dramatiq worker on Baton's broker until SIGTERM or SIGINT."""
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()  # a second signal changes nothing: the supervisor SIGKILLs when it must

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    os.set_inheritable(ready_fd, False)
    if not _exit_with_parent(parent_pid):
        _exit(0)
    try:
        worker, broker = _start_worker(threads)
    except BaseException:
        if not logging.getLogger().handlers:
            logging.basicConfig(format=LOG_FORMAT)
        logger.exception("worker process could not start")
        _exit(EXIT_BOOT_FAILED)
    try:
        os.write(ready_fd, b"r")
    except BrokenPipeError:
        stop.set()  # the supervisor is gone (and has sent its death signal, or will)
    while not stop.wait(POLL_S):
        pass
    logger.info("worker process stopping: in-flight messages finish, queued ones go back")
    worker.stop(timeout=stop_timeout_ms)
    broker.close()
    from app import metrics

    metrics.stop_publisher()  # its counts join the retired totals (os._exit skips atexit)
    _exit(0)


def _start_worker(threads: int) -> tuple[Any, Any]:
    """Import ``workers.main`` (broker, actors, logging) and start a worker on its broker."""
    import dramatiq

    config = Config.from_env()
    import workers.main

    if not logging.getLogger().handlers:
        logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
    broker = workers.main.broker
    # What Dramatiq's CLI does for each worker process (TimeLimit starts its watchdog here).
    broker.emit_after("process_boot")
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=config.worker_idle_timeout_ms)
    worker.start()
    return worker, broker


def _exit_with_parent(parent_pid: int) -> bool:
    """Have Linux SIGTERM this child when the supervisor dies; False if it is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    return os.getppid() == parent_pid


def _exit(code: int) -> NoReturn:
    """Exit now: a thread left behind by a user's action must not keep a stopped worker alive."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --------------------------------------------------------------------------- entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The supervisor's options, and the child's (``--child``, set by the supervisor)."""
    parser = argparse.ArgumentParser(prog="python -m workers.pool", description=__doc__)
    parser.add_argument("--processes", "-p", type=int, default=2)
    parser.add_argument("--threads", "-t", type=int, default=8)
    parser.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT_S, help="seconds")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stop-timeout-ms", type=int, default=25_000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.processes < 1 or args.threads < 1:
        parser.error("--processes and --threads must be at least 1")
    if args.child and (args.ready_fd is None or args.parent_pid is None):
        parser.error("--child needs --ready-fd and --parent-pid")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the supervisor, or (``--child``) one worker process."""
    args = parse_args(argv)
    if args.child:
        run_child(args.threads, args.ready_fd, args.parent_pid, args.stop_timeout_ms)
    from app.logs import setup_logging

    setup_logging(Config.from_env())
    sys.exit(Pool(args.processes, args.threads, args.shutdown_timeout).run())


if __name__ == "__main__":
    main()
