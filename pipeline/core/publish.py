"""Many writers, one corpus: the one publish protocol every writer follows.

Several shard runs, annotation rounds, trainings, dashboards and people write to the same root
(a local folder or an S3 prefix) at once, and any of them may be killed at any moment. Every
writer follows three rules, built on one primitive, :func:`storage.create_bytes` (create the
name only if it is absent: ``os.link`` locally, a PUT with ``If-None-Match: *`` on S3):

1. **Numbers are claimed.** A shard, round or model version number is taken by creating its
   claim record (``images/shard-NNNNNN.claim.json``, ``round-NNNN/round.json``,
   ``vNNNN/run.json``) if absent, at the first free number; a writer that loses the race takes
   the next one. The claim names its owner (:class:`Owner`) and an expiry, and, for image
   shards, the whole work order, so anyone can finish it.
2. **Data files are created, never replaced; the done record is created last.** Of two writers
   of one unit, the first data file published wins; the other derives its done record from what
   was published. A unit is done when its done record exists.
3. **Aggregates are derived.** ``index.parquet``, ``manifest.parquet`` and summaries are
   re-derived from the done records and re-published until the records they were derived from
   stop changing (:func:`publish_derived`), so the last publish reflects every done record.

A claim without its done record is **stale** when its owner is gone (a dead process on this
host) or it is past its expiry; whoever re-runs the stage finishes it from the claim. Finishing
it twice is harmless (rule 2), so an owner that is merely slow loses only work, never data.

:func:`fault` is the test hook that kills the process at a named publish step
(``DATAENGINE_FAULT=after:<step>[,after:<step>...]``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from dataengine.pipeline.core import storage

logger = logging.getLogger(__name__)

T = TypeVar("T")
FAULT_ENV = "DATAENGINE_FAULT"


def _proc_start(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks since boot) or "" when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: host, process id (with its start time, so a reused pid is not taken
    for the owner) and a random run id."""

    host: str
    pid: int
    started: str
    run: str

    @staticmethod
    def current() -> Owner:
        """This process (a forked child is a new owner)."""
        pid = os.getpid()
        if pid not in _CURRENT:
            _CURRENT[pid] = Owner(socket.gethostname(), pid, _proc_start(pid),
                                  uuid.uuid4().hex[:12])
        return _CURRENT[pid]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_CURRENT: dict[int, Owner] = {}


def owner_alive(owner: dict[str, Any]) -> bool | None:
    """Whether the owning process still runs: True/False on this host, None on another."""
    if not owner or owner.get("host") != socket.gethostname():
        return None
    pid = int(owner.get("pid") or 0)
    if pid <= 0:
        return False
    if pid == os.getpid():
        return owner.get("started", "") in ("", _proc_start(pid))
    started = _proc_start(pid)
    if started:
        return not owner.get("started") or owner["started"] == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_record(ttl_seconds: float, **info: Any) -> dict[str, Any]:
    """A claim's common fields: owner, creation time, expiry (epoch seconds), plus ``info``."""
    now = time.time()
    return {"owner": Owner.current().to_dict(), "created": now, "expires": now + ttl_seconds,
            **info}


def is_stale(claim: dict[str, Any], now: float | None = None) -> bool:
    """Whether an unfinished claim may be finished by someone else: its owner is gone or its
    expiry has passed. (Finishing it twice is harmless; see the module docstring.)"""
    now = time.time() if now is None else now
    if now >= float(claim.get("expires") or 0):
        return True
    return owner_alive(claim.get("owner") or {}) is False


def mine(claim: dict[str, Any]) -> bool:
    """Whether this process holds ``claim``."""
    return (claim.get("owner") or {}).get("run") == Owner.current().run


def claim_next(url_of: Callable[[int], str], start: int, record: dict[str, Any],
               on_taken: Callable[[int, str], None] | None = None) -> int:
    """Create ``url_of(n)`` with ``record`` at the first free ``n >= start``; returns ``n``.

    ``on_taken(n, url)`` is called for each number another writer holds (e.g. to read its
    claim). Every number below the returned one was taken when this call tried it.
    """
    n = start
    while True:
        url = url_of(n)
        if storage.create_json(url, record):
            return n
        if on_taken is not None:
            on_taken(n, url)
        n += 1


def publish_derived(listing: Callable[[], T], publish: Callable[[T], None],
                    max_rounds: int = 50) -> T:
    """Publish an aggregate derived from append-only records until the records it was derived
    from no longer change: ``publish(listing())``, list again, repeat while it differs.

    With several writers doing this at once, the last publish of all reflects every record
    that existed when it was derived, and any later record's writer publishes after it.
    """
    seen = listing()
    for _ in range(max_rounds):
        publish(seen)
        now = listing()
        if now == seen:
            return seen
        seen = now
    logger.warning("aggregate still changing after %d publishes; the last one stands",
                   max_rounds)
    return seen


def fault(step: str) -> None:
    """Kill this process with SIGKILL when ``DATAENGINE_FAULT`` names ``after:<step>`` (the
    crash-safety tests inject a crash at each publish step this way)."""
    spec = os.environ.get(FAULT_ENV)
    if spec and f"after:{step}" in {p.strip() for p in spec.split(",")}:
        logger.warning("%s=%s: killing process %d after step %s", FAULT_ENV, spec, os.getpid(),
                       step)
        for h in logging.getLogger().handlers:
            h.flush()
        os.kill(os.getpid(), signal.SIGKILL)
