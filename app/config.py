"""Configuration: the one place that reads the environment."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path


def _networks(value: str) -> tuple[str, ...]:
    """Comma-separated CIDRs, normalised; a bad one is a configuration error, never ignored."""
    networks = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError as exc:
            raise ValueError(f"BATON_HTTP_ALLOW_NETWORKS: {item!r} is not a CIDR ({exc})") from None
    return tuple(networks)


def _step_cap(value: str) -> int:
    """``auto`` (or unset) is -1; otherwise a number of steps, 0 for no cap."""
    value = value.strip().lower()
    if value in ("", "auto"):
        return -1
    if not value.isdigit():
        raise ValueError(f"BATON_COMPANY_MAX_CONCURRENT_STEPS: {value!r} is not a number or 'auto'")
    return int(value)


def _cli_config_dir(env: Mapping[str, str]) -> Path:
    """Where `baton login` keeps its profile: the XDG config directory, else ~/.config."""
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "baton"


def _log_format(value: str) -> str:
    """``json`` or ``text``; anything else is a configuration error, never ignored."""
    if value.strip().lower() not in ("json", "text"):
        raise ValueError(f"BATON_LOG_FORMAT: {value!r} is not json or text")
    return value.strip().lower()


@dataclass(frozen=True)
class Config:
    """Settings for every Baton process; build with ``Config.from_env()``."""

    database_url: str | None = None
    redis_url: str | None = None
    broker_url: str | None = None
    secret_key: str = "dev-secret-key"
    action_modules: tuple[str, ...] = ()
    log_level: str = "INFO"
    # One JSON object per line (production) or plain text lines (the default, and `baton dev`).
    log_format: str = "text"
    # When set, GET /metrics needs ``Authorization: Bearer <token>``; public otherwise.
    metrics_token: str | None = None
    var_dir: Path = field(default_factory=lambda: Path.cwd() / "var")
    queue_namespace: str = "baton"
    # Dramatiq's idle consumer polls with back-off up to this many ms (its default of 1 s
    # would dominate step-to-step latency).
    worker_idle_timeout_ms: int = 20
    max_content_length: int = 1024 * 1024
    # Request bodies nested deeper are refused (a parser, and every walk of the value, recurses).
    json_max_depth: int = 64
    # Outbound calls (http.request): CIDRs that may be reached although loopback, private or
    # otherwise non-public (production default: none), and the cap on a response body.
    http_allow_networks: tuple[str, ...] = ()
    http_max_response_bytes: int = 1024 * 1024
    # Fairness (a rate string in the `limits` package's syntax): requests per API key, anonymous
    # webhook deliveries per workflow, concurrently executing steps per company (0 = no cap),
    # the shortest cron interval and the schedules one company may keep.
    rate_limit: str = "3000/minute"
    webhook_rate_limit: str = "600/minute"
    # -1 ("auto", the default): three quarters of the live worker threads; 0: no cap (app/slots.py).
    company_max_concurrent_steps: int = -1
    schedule_min_interval_s: int = 60
    max_schedules_per_company: int = 100
    # Fernet keys for the secrets store: the first encrypts, all decrypt (rotation). Empty means a
    # development key derived from secret_key; production must set BATON_SECRETS_KEYS.
    secrets_keys: tuple[str, ...] = ()
    # The CLI's client side: the API it talks to and the key it sends. Unset (None) falls back to
    # the profile `baton login` wrote under cli_config_dir, then to the local API.
    api_url: str | None = None
    api_key: str | None = None
    cli_config_dir: Path = field(default_factory=lambda: Path.home() / ".config" / "baton")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        env = os.environ if environ is None else environ
        modules = tuple(m.strip() for m in env.get("BATON_ACTION_MODULES", "").split(",") if m.strip())
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            redis_url=env.get("REDIS_URL") or None,
            broker_url=env.get("BROKER_URL") or None,
            secret_key=env.get("SECRET_KEY") or "dev-secret-key",
            action_modules=modules,
            log_level=(env.get("BATON_LOG_LEVEL") or "INFO").upper(),
            log_format=_log_format(env.get("BATON_LOG_FORMAT") or "text"),
            metrics_token=env.get("BATON_METRICS_TOKEN") or None,
            var_dir=Path(env.get("BATON_VAR_DIR") or Path.cwd() / "var"),
            queue_namespace=env.get("BATON_QUEUE_NAMESPACE") or "baton",
            http_allow_networks=_networks(env.get("BATON_HTTP_ALLOW_NETWORKS", "")),
            http_max_response_bytes=int(env.get("BATON_HTTP_MAX_RESPONSE_BYTES") or 1024 * 1024),
            rate_limit=env.get("BATON_RATE_LIMIT") or "3000/minute",
            webhook_rate_limit=env.get("BATON_WEBHOOK_RATE_LIMIT") or "600/minute",
            company_max_concurrent_steps=_step_cap(env.get("BATON_COMPANY_MAX_CONCURRENT_STEPS", "")),
            schedule_min_interval_s=int(env.get("BATON_SCHEDULE_MIN_INTERVAL_S") or 60),
            max_schedules_per_company=int(env.get("BATON_MAX_SCHEDULES_PER_COMPANY") or 100),
            secrets_keys=tuple(k.strip() for k in env.get("BATON_SECRETS_KEYS", "").split(",") if k.strip()),
            json_max_depth=int(env.get("BATON_JSON_MAX_DEPTH") or 64),
            api_url=env.get("BATON_URL") or None,
            api_key=env.get("BATON_API_KEY") or None,
            cli_config_dir=_cli_config_dir(env),
        )

    def with_overrides(self, **changes: object) -> Config:
        return replace(self, **changes)

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def embedded_redis(self) -> bool:
        return self.redis_url is None

    @property
    def sqlite_path(self) -> Path:
        return self.var_dir / "baton.sqlite3"

    @property
    def redis_socket(self) -> Path:
        return self.var_dir / "redis.sock"

    def resolved_database_url(self) -> str:
        if self.database_url:
            url = self.database_url
            # Accept the common postgres:// spellings and select psycopg 3.
            for prefix in ("postgres://", "postgresql://"):
                if url.startswith(prefix):
                    return "postgresql+psycopg://" + url[len(prefix) :]
            return url
        return f"sqlite:///{self.sqlite_path}"

    def resolved_redis_url(self) -> str:
        if self.redis_url:
            return self.redis_url
        return f"unix://{self.redis_socket}"

    @property
    def cli_profile_path(self) -> Path:
        return self.cli_config_dir / "profile.json"

    def resolved_broker_url(self) -> str:
        return self.broker_url or self.resolved_redis_url()

    @property
    def rabbitmq_broker(self) -> bool:
        """``BROKER_URL=amqp://…`` (or ``amqps://``) selects RabbitMQ; anything else is Redis."""
        return self.resolved_broker_url().startswith(("amqp://", "amqps://"))
