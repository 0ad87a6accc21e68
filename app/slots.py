"""Per-company step slots: at most ``company_max_concurrent_steps`` steps of one company execute at
once, so one tenant cannot occupy every worker thread.

A slot is a member of the sorted set ``{ns}:slots:{company_id}`` (the run id: a run executes one
step at a time and a chain keeps its slot) scored by its lease expiry; the worker's heartbeat
renews it and a dead worker's slot lapses with its lease. Redis down → fail open (the step runs).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from redis.commands.core import Script

from app.engine.states import LEASE
from app.services import Services

logger = logging.getLogger("baton.slots")
LEASE_S = LEASE.total_seconds()
RETRY_DELAY_MS = (250, 500)  # a message without a slot goes back to the broker for this long

# KEYS[1] the company's set; ARGV: member, now, lease expiry, cap, key ttl (s).
# Returns 1 for a new slot, 2 when the member already holds one, 0 when the company is at its cap.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 2
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


_SCRIPT = Script(None, _ACQUIRE.encode())  # EVALSHA; loaded on first use by each Redis


class NoFreeSlot(Exception):
    """The company already executes as many steps as its cap allows."""


@dataclass(frozen=True)
class Slot:
    """A slot this claim took (``fresh``) or found already held by its run."""

    company_id: str
    member: str
    fresh: bool


def slots_key(services: Services, company_id: str) -> str:
    return services.key("slots", company_id)


def cap(services: Services) -> int:
    return services.config.company_max_concurrent_steps


def acquire(services: Services, company_id: str, member: str) -> Slot | None:
    """One round trip; None when there is no cap or Redis is down; NoFreeSlot at the cap."""
    limit = cap(services)
    if limit <= 0:
        return None
    now = time.time()
    try:
        args = [member, now, now + LEASE_S, limit, int(LEASE_S * 4)]
        got = int(_SCRIPT(keys=[slots_key(services, company_id)], args=args, client=services.redis))
    except redis.RedisError as exc:
        logger.warning("step slots not enforced, Redis is unavailable: %s", exc)
        return None
    if got == 0:
        raise NoFreeSlot(company_id)
    return Slot(company_id, member, fresh=got == 1)


def give_back(services: Services, slot: Slot | None) -> None:
    """A claim that took a fresh slot and then found nothing to run returns it (returns None)."""
    if slot is not None and slot.fresh:
        release(services, slot.company_id, slot.member)


def release(services: Services, company_id: str, member: str) -> None:
    """Free a slot after its step (or chain) is recorded; best effort, the lease lapses anyway."""
    if cap(services) <= 0:
        return
    try:
        services.redis.zrem(slots_key(services, company_id), member)
    except redis.RedisError as exc:
        logger.warning("could not free the step slot of %s (Redis down): %s", member, exc)


def renew(services: Services, held: Iterable[tuple[str, str]]) -> None:
    """The heartbeat: push the lease of every (company, member) slot this process holds."""
    held = list(held)
    if cap(services) <= 0 or not held:
        return
    expiry = time.time() + LEASE_S
    pipe = services.redis.pipeline(transaction=False)
    for company_id, member in held:
        # Plain ZADD: a slot freed by a stale duplicate message comes back at the next beat.
        pipe.zadd(slots_key(services, company_id), {member: expiry})
    try:
        pipe.execute()
    except redis.RedisError as exc:
        logger.warning("could not renew step slots (Redis down): %s", exc)


def retry_delay_ms() -> int:
    """Jittered, so bounced messages of one company do not come back in lockstep."""
    return random.randint(*RETRY_DELAY_MS)
