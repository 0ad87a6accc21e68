"""Per-company step slots: one company cannot occupy every worker thread.

A slot is a member of the sorted set ``{ns}:slots:{company_id}`` (``<run id>/<step id>`` of the
message that took it: a chain keeps it, and each parallel branch of a run holds its own) scored by
its lease expiry; the worker's heartbeat renews it and a dead worker's slot lapses with its lease.

The message carries its company, so the check costs one Redis call before any database work. A
message over the cap is *parked* in the company's list ``{ns}:parked:{company_id}`` (same call), and
the thread that frees one of the company's slots takes the oldest parked message with it (one call):
the company keeps exactly its cap of threads busy and the rest stay free for other companies, with
no message bouncing through the broker. Each worker process also keeps one of its own threads free
of any one company (a message prefetched by a process waits for that process's threads). Parked
messages live in Redis only; if Redis loses them, their steps are still ``queued`` in the database
and the lost-message sweep sends them again.

The cap (``BATON_COMPANY_MAX_CONCURRENT_STEPS``): a number, 0 for none, or by default ``auto`` —
three quarters of the worker threads alive now (each worker process registers its thread count
in ``{ns}:capacity`` while it runs), so a lone company uses most of the pool and another company
always finds threads free. Redis down → fail open (the step runs).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from redis.commands.core import Script

from app.engine.states import LEASE
from app.services import Services

logger = logging.getLogger("baton.slots")
LEASE_S = LEASE.total_seconds()
AUTO = -1  # the configured cap meaning "three quarters of the live worker threads"
PARK = -2  # passed as the cap: park the message whatever the count (this process is the limit)
CAPACITY_TTL_S = 3 * 5.0  # a worker process's registration lapses after three missed heartbeats

# KEYS: the company's slots, its parked list, the capacity set.
# ARGV: member, now, lease expiry, cap (-1 auto), key ttl (s), the message to park if over the cap.
# Returns 1 for a new slot, 2 when the member already holds one, 0 when parked.
# "auto": three quarters of the live worker threads (``none`` when no worker is registered).
_AUTO_CAP = """
local function auto_cap(capacity, now, none)
  redis.call('ZREMRANGEBYSCORE', capacity, '-inf', now)
  local total = 0
  for _, entry in ipairs(redis.call('ZRANGE', capacity, 0, -1)) do
    total = total + tonumber(string.match(entry, '(%d+)$'))
  end
  if total == 0 then
    return none
  end
  return math.max(1, total - math.max(1, math.floor(total / 4)))
end
"""

_ENTER = (
    _AUTO_CAP
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 2
end
local cap = tonumber(ARGV[4])
if cap == -2 then
  redis.call('RPUSH', KEYS[2], ARGV[6])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  return 0
end
if cap < 0 then
  cap = auto_cap(KEYS[3], ARGV[2], 0)
end
if cap > 0 and redis.call('ZCARD', KEYS[1]) >= cap then
  redis.call('RPUSH', KEYS[2], ARGV[6])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
)

# KEYS: the company's slots, its parked list. ARGV: member, lease expiry, key ttl (s).
# Frees the member's slot; if a message is parked, it takes the slot and is returned.
_LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
local parked = redis.call('LPOP', KEYS[2])
if not parked then
  return false
end
local message = cjson.decode(parked)
redis.call('ZADD', KEYS[1], ARGV[2], message[1] .. '/' .. message[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return parked
"""

_ENTER_SCRIPT = Script(None, _ENTER.encode())  # EVALSHA; loaded on first use by each Redis
_LEAVE_SCRIPT = Script(None, _LEAVE.encode())


@dataclass(frozen=True)
class Message:
    """An ``execute_step`` message, as parked."""

    run_id: str
    step_id: str
    attempt: int
    company_id: str

    @property
    def member(self) -> str:
        """Its slot's member: the message's run and step (a step id has no slash)."""
        return f"{self.run_id}/{self.step_id}"


class _Local:
    """This process's threads per company (a company may hold all but one of them)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy: Counter[str] = Counter()
        self.limit = 0  # 0: not a worker process, no local limit

    def take(self, company_id: str) -> bool:
        with self.lock:
            if self.limit and self.busy[company_id] >= self.limit:
                return False
            self.busy[company_id] += 1
            return True

    def add(self, company_id: str) -> None:
        with self.lock:
            self.busy[company_id] += 1

    def give(self, company_id: str) -> None:
        with self.lock:
            self.busy[company_id] -= 1
            if self.busy[company_id] <= 0:
                del self.busy[company_id]


local = _Local()


def set_process_threads(threads: int) -> None:
    """Called at worker boot: one company may use at most threads - 1 of this process's threads."""
    local.limit = max(1, threads - 1)


def slots_key(services: Services, company_id: str) -> str:
    return services.key("slots", company_id)


def parked_key(services: Services, company_id: str) -> str:
    return services.key("parked", company_id)


def capacity_key(services: Services) -> str:
    return services.key("capacity")


def cap(services: Services) -> int:
    return services.config.company_max_concurrent_steps


def enter(services: Services, message: Message) -> bool:
    """Take (or keep) the message's slot: True to execute now, False when the message was parked."""
    if cap(services) == 0:
        return True
    now = time.time()
    keys = [
        slots_key(services, message.company_id),
        parked_key(services, message.company_id),
        capacity_key(services),
    ]
    body = json.dumps([message.run_id, message.step_id, message.attempt])
    # A company already on all but one of this process's threads: park whatever the global count.
    limit = cap(services) if local.take(message.company_id) else PARK
    args = [message.member, now, now + LEASE_S, limit, int(LEASE_S * 4), body]
    try:
        entered = int(_ENTER_SCRIPT(keys=keys, args=args, client=services.redis)) != 0
    except redis.RedisError as exc:
        logger.warning("step slots not enforced, Redis is unavailable: %s", exc)
        entered = True  # fail open
    # Every thread that goes on holds one local count (its leave or release gives it back).
    if entered and limit == PARK:
        local.add(message.company_id)
    elif not entered and limit != PARK:
        local.give(message.company_id)
    return entered


def leave(services: Services, company_id: str, member: str) -> Message | None:
    """Free the message's slot, or hand it to the company's oldest parked message (returned)."""
    if cap(services) == 0:
        return None
    local.give(company_id)
    args = [member, time.time() + LEASE_S, int(LEASE_S * 4)]
    keys = [slots_key(services, company_id), parked_key(services, company_id)]
    try:
        parked = _LEAVE_SCRIPT(keys=keys, args=args, client=services.redis)
    except redis.RedisError as exc:
        logger.warning("could not free the step slot of %s (Redis down): %s", member, exc)
        return None
    if not parked:
        return None
    local.add(company_id)  # this thread goes on with the company's parked message
    next_run, step_id, attempt = json.loads(parked)
    return Message(next_run, step_id, int(attempt), company_id)


def renew(services: Services, held: Iterable[tuple[str, str]]) -> None:
    """The heartbeat: push the lease of every (company, member) slot this process holds."""
    held = list(held)
    if cap(services) == 0 or not held:
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


def worker_entry(threads: int) -> str:
    """This process's member of the capacity set: ``host:pid:threads``."""
    return f"{socket.gethostname()}:{os.getpid()}:{threads}"


def register(services: Services, entry: str) -> None:
    """Count this process's threads in the pool (renewed by the heartbeat; best effort)."""
    if cap(services) != AUTO:
        return
    try:
        services.redis.zadd(capacity_key(services), {entry: time.time() + CAPACITY_TTL_S})
    except redis.RedisError as exc:
        logger.warning("could not register worker capacity (Redis down): %s", exc)


def unregister(services: Services, entry: str) -> None:
    if cap(services) != AUTO:
        return
    try:
        services.redis.zrem(capacity_key(services), entry)
    except redis.RedisError as exc:
        logger.warning("could not unregister worker capacity (Redis down): %s", exc)


def release(services: Services, company_id: str, member: str) -> None:
    """Free the message's slot without taking a parked message (the message itself failed)."""
    if cap(services) == 0:
        return
    local.give(company_id)
    try:
        services.redis.zrem(slots_key(services, company_id), member)
    except redis.RedisError as exc:
        logger.warning("could not free the step slot of %s (Redis down): %s", member, exc)


# KEYS: the company's slots, its parked list, the capacity set. ARGV: now, cap (-1 auto), most.
# Pops parked messages while the company is under its cap (the same cap ``enter`` applies).
_RESCUE = (
    _AUTO_CAP
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local cap = tonumber(ARGV[2])
if cap < 0 then
  cap = auto_cap(KEYS[3], ARGV[1], 1000000)
end
local room = math.min(cap - redis.call('ZCARD', KEYS[1]), tonumber(ARGV[3]))
if room <= 0 then
  return {}
end
local popped = {}
for _ = 1, room do
  local message = redis.call('LPOP', KEYS[2])
  if not message then
    break
  end
  popped[#popped + 1] = message
end
return popped
"""
)
_RESCUE_SCRIPT = Script(None, _RESCUE.encode())
RESCUE_MOST = 100  # messages sent back per company and beat


def rescue(services: Services) -> int:
    """Send parked messages back to the broker for every company under its cap (the heartbeat's
    safety net: normally the thread that frees a slot takes them, but a holder whose message failed
    frees its slot without doing so). Returns how many were sent; best effort."""
    if cap(services) == 0:
        return 0
    prefix = parked_key(services, "")
    sent = 0
    try:
        for key in services.redis.scan_iter(match=f"{prefix}*", count=100):
            company_id = (key.decode() if isinstance(key, bytes) else key)[len(prefix) :]
            keys = [slots_key(services, company_id), parked_key(services, company_id), capacity_key(services)]
            args = [time.time(), cap(services), RESCUE_MOST]
            for body in _RESCUE_SCRIPT(keys=keys, args=args, client=services.redis):
                run_id, step_id, attempt = json.loads(body)
                services.queue.enqueue(run_id, step_id, int(attempt), company_id=company_id)
                sent += 1
    except redis.RedisError as exc:
        logger.warning("could not look for parked step messages (Redis down): %s", exc)
    return sent
