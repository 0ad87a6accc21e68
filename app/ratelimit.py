"""Request limits: per API key (or client address) on the API, per workflow on anonymous webhooks.

Counters live in the deployment's Redis under its namespace; when Redis is down the limiter fails
open (requests go through, a warning is logged) rather than turning an outage into refusals.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app, request
from flask_limiter import Limiter, RateLimitExceeded
from flask_limiter.util import get_remote_address
from limits import RateLimitItem, parse, parse_many
from limits.storage import RedisStorage
from limits.strategies import FixedWindowRateLimiter
from redis.exceptions import NoScriptError

from app.config import Config
from app.errors import RateLimited

logger = logging.getLogger("baton.ratelimit")
KEY_HEADER = "x-api-key"
KEY_PREFIX = "bk_"
# Probes and the API document stay reachable whatever a client has spent.
UNLIMITED_BLUEPRINTS = ("health", "api-docs", "metrics")
WEBHOOK_BLUEPRINT = "webhooks"
EXTENSION = "baton_limiter"
# Flask-Limiter's scope of application-wide limits: part of their counters' keys.
APPLICATION_SCOPE = "global"


def storage_uri(config: Config) -> str:
    """The ``limits`` storage URI of the deployment's Redis (a socket path needs ``redis+unix``)."""
    url = config.resolved_redis_url()
    return "redis+unix://" + url[len("unix://") :] if url.startswith("unix://") else url


def client_key() -> str:
    """The API key's prefix (its public part), or the client address for requests without a key."""
    key = request.headers.get(KEY_HEADER)
    if key:
        return key_client(key)
    return f"addr:{get_remote_address()}"


def key_client(key: str) -> str:
    """``client_key`` of a request that carries this API key."""
    prefix = key[len(KEY_PREFIX) :].split("_", 1)[0] if key.startswith(KEY_PREFIX) else key[:32]
    return f"key:{prefix}"


class FailOpenLimiter(Limiter):
    """A Limiter that lets requests through when its storage is down, with one warning per minute."""

    _warned_at = 0.0
    webhook_limit: RateLimitItem | None = None
    # The per-request limits (BATON_RATE_LIMIT), as ``hit_request_limits`` counts them.
    request_limits: list[RateLimitItem] = []
    # Clients refused recently, until their window frees a request (``start_request_limits``).
    _refused: dict[str, float]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = {}

    def check(self, item: RateLimitItem | None, *key: str) -> None:
        """Hit one limit by hand (outside the per-request ones); fails open like them."""
        if item is None:
            return
        try:
            wait = None if self.limiter.hit(item, self._key_prefix, *key) else self._wait_s(item, *key)
        except Exception as exc:
            self._warn(exc)
            return
        if wait is not None:
            raise RateLimited(headers={"Retry-After": str(wait)})

    def hit_request_limits(self, client: str) -> None:
        """Count one request of ``client`` (a ``client_key`` value) as the per-request check does,
        for a route served before Flask's request cycle: the same counters (so every route shares
        the key's budget), every limit hit, RateLimited past any of them; fails open like it."""
        if not self.enabled:
            return
        key = (client, APPLICATION_SCOPE)
        try:
            breached = [
                item for item in self.request_limits if not self.limiter.hit(item, self._key_prefix, *key)
            ]
            waits = [self._wait_s(item, *key) for item in breached]
        except Exception as exc:
            self._warn(exc)
            return
        if waits:
            raise RateLimited(headers={"Retry-After": str(max(waits))})

    def start_request_limits(self, client: str) -> Callable[[], None]:
        """``hit_request_limits`` in two halves, for a route whose own round trip (a read-only
        query) can overlap the counters': the increments are sent now without waiting, and the
        returned callable reads them, raising RateLimited past any limit (fails open like it).
        The counters and their Lua script are Flask-Limiter's own (fixed window on Redis); on any
        other storage, and for a client refused less than a window ago (so a client over its
        budget costs no query), the check is made here, in full, before returning."""
        storage = self.limiter.storage
        if (
            not self.enabled
            or type(storage) is not RedisStorage  # not its cluster and sentinel variants
            or type(self.limiter) is not FixedWindowRateLimiter
            or self._refused.get(client, 0.0) > time.monotonic()
        ):
            self._hit_noting_refusal(client)
            return _nothing
        key = (client, APPLICATION_SCOPE)
        script = storage.lua_incr_expire
        pool = script.registered_client.connection_pool
        try:
            conn = pool.get_connection()
        except Exception as exc:
            self._warn(exc)
            return _nothing
        try:
            for item in self.request_limits:
                counter = storage.prefixed_key(item.key_for(self._key_prefix, *key))
                conn.send_command("EVALSHA", script.sha, 1, counter, item.get_expiry(), 1)
        except Exception as exc:
            conn.disconnect()
            pool.release(conn)
            self._warn(exc)
            return _nothing

        def finish() -> None:
            counts: list[int] = []
            try:
                for _ in self.request_limits:
                    counts.append(int(conn.read_response()))
            except NoScriptError:  # the server lost the script (restart, SCRIPT FLUSH): nothing counted
                conn.disconnect()
                pool.release(conn)
                self._hit_noting_refusal(client)
                return
            except Exception as exc:
                conn.disconnect()
                pool.release(conn)
                self._warn(exc)
                return
            pool.release(conn)
            breached = [item for item, n in zip(self.request_limits, counts, strict=True) if n > item.amount]
            if breached:
                self._refuse(client, [self._wait_s(item, *key) for item in breached])

        return finish

    def _hit_noting_refusal(self, client: str) -> None:
        try:
            self.hit_request_limits(client)
        except RateLimited as exc:
            self._refused_until(client, int(exc.headers["Retry-After"]))
            raise

    def _refuse(self, client: str, waits: list[int]) -> None:
        self._refused_until(client, max(waits))
        raise RateLimited(headers={"Retry-After": str(max(waits))})

    def _refused_until(self, client: str, wait_s: int) -> None:
        if len(self._refused) > 10_000:
            self._refused.clear()
        self._refused[client] = time.monotonic() + wait_s

    def _wait_s(self, item: RateLimitItem, *key: str) -> int:
        """Seconds until the window of a breached limit frees a request (at least 1)."""
        reset_at = self.limiter.get_window_stats(item, self._key_prefix, *key).reset_time
        return max(1, min(int(item.get_expiry()), math.ceil(reset_at - time.time())))

    def _warn(self, exc: Exception) -> None:
        if time.monotonic() - self._warned_at > 60:
            self._warned_at = time.monotonic()
            logger.warning("rate limits not enforced, their storage is unavailable: %s", exc)

    def _check_request_limit(self, *args: Any, **kwargs: Any) -> None:
        try:
            super()._check_request_limit(*args, **kwargs)
        except RateLimitExceeded as exc:
            raise RateLimited(headers={"Retry-After": str(self._retry_after_s(exc))}) from None
        except Exception as exc:
            self._warn(exc)

    def _retry_after_s(self, exc: RateLimitExceeded) -> int:
        """Seconds until the breached window frees a request (at least 1)."""
        window = int(exc.limit.limit.get_expiry())
        breached = self.current_limit
        if breached is not None and breached.breached:
            return max(1, min(window, math.ceil(breached.reset_at - time.time())))
        return max(1, window)


def init_app(app: Flask, config: Config) -> Limiter:
    """Attach the limits to ``app`` after its blueprints are registered."""
    limiter = FailOpenLimiter(
        key_func=client_key,
        application_limits=[config.rate_limit],
        storage_uri=storage_uri(config),
        storage_options={"socket_connect_timeout": 1, "socket_timeout": 2},
        key_prefix=f"{config.queue_namespace}:ratelimit",
        strategy="fixed-window",
        headers_enabled=False,
    )
    limiter.init_app(app)
    for name in UNLIMITED_BLUEPRINTS:
        if name in app.blueprints:
            limiter.exempt(app.blueprints[name])
    # Webhook deliveries have no key: their own limit per workflow (check_webhook), not the key's.
    limiter.exempt(app.blueprints[WEBHOOK_BLUEPRINT])
    limiter.webhook_limit = parse(config.webhook_rate_limit)
    limiter.request_limits = parse_many(config.rate_limit)
    app.extensions[EXTENSION] = limiter
    return limiter


def _nothing() -> None:
    """The second half of a check already made in full."""


def check_webhook(workflow_id: str) -> None:
    """Count one anonymous delivery to ``workflow_id``; RateLimited past the workflow's limit."""
    limiter: FailOpenLimiter | None = current_app.extensions.get(EXTENSION)
    if limiter is None:
        return
    limiter.check(limiter.webhook_limit, "webhook", workflow_id)
