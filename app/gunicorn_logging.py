"""gunicorn's own log lines (its error and access logs) in Baton's format (``BATON_LOG_FORMAT``)."""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger

from app.config import Config
from app.logs import ContextFilter, formatter


class GunicornLogger(Logger):
    """gunicorn's logger with Baton's JSON formatter when JSON is configured (text stays gunicorn's)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        config = Config.from_env()
        if config.log_format != "json":
            return
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.addFilter(ContextFilter())
                handler.setFormatter(formatter("json"))
