"""Per-step retry policy (Baton's own: the attempt number lives in the database, DESIGN §5.4)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RetryPolicy:
    """A step's ``retry`` block: how many attempts, and the delay before each next one."""

    max_attempts: int = 1
    backoff: str = "exponential"
    initial_delay_ms: int = 1000
    max_delay_ms: int = 60_000

    @classmethod
    def of(cls, step: dict[str, Any]) -> RetryPolicy:
        retry = step.get("retry") or {}
        return cls(
            max_attempts=retry.get("maxAttempts", 1),
            backoff=retry.get("backoff", "exponential"),
            initial_delay_ms=retry.get("initialDelayMs", 1000),
            max_delay_ms=retry.get("maxDelayMs", 60_000),
        )

    def exhausted(self, attempt: int) -> bool:
        """True when ``attempt`` was the last one allowed."""
        return attempt >= self.max_attempts

    def base_delay_ms(self, attempt: int) -> int:
        """The delay before attempt ``attempt + 1`` without jitter, capped at ``max_delay_ms``."""
        initial = self.initial_delay_ms
        if self.backoff == "fixed":
            delay = initial
        elif self.backoff == "linear":
            delay = initial * attempt
        else:
            delay = initial * 2 ** (attempt - 1)
        return min(self.max_delay_ms, delay)

    def delay_ms(self, attempt: int, retry_after_ms: int | None = None, rand: Any = random) -> int:
        """Equal jitter (keep half, randomise half) so synchronized failures spread out; never
        less than the target's ``Retry-After`` (itself capped at ``max_delay_ms``)."""
        delay = self.base_delay_ms(attempt)
        if delay > 1:
            delay = delay // 2 + rand.randint(0, delay - delay // 2)
        if retry_after_ms:
            delay = max(delay, min(retry_after_ms, self.max_delay_ms))
        return int(delay)
