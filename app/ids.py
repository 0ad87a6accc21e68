"""Prefixed, time-ordered identifiers (UUIDv7 keeps index inserts local)."""

from __future__ import annotations

import re
import secrets
import uuid

from uuid6 import uuid7

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
RUN_ID = re.compile(rf"^run_{_UUID}\Z")  # \Z: `$` would accept a trailing newline
BULK_ID = re.compile(rf"^bulk_{_UUID}\Z")
WORKFLOW_ID = re.compile(r"^wf_[a-z0-9][a-z0-9_-]{0,63}\Z")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid7()}"


def new_short_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def new_secret(nbytes: int = 24) -> str:
    return secrets.token_urlsafe(nbytes)
