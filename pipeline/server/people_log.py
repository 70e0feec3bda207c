"""One image's append-only event log in a people round, shared by every server on the root.

``people/events/<key>/<NNNNNN>.json`` holds the image's events numbered from ``000000``: lease,
renew, release, accept, remove, skip, submit. An event is published with create-if-absent
(:func:`dataengine.pipeline.core.storage.create_json`: a hard link locally, a conditional PUT with
``If-None-Match: *`` on S3), so of several servers racing for the next number exactly one wins;
the others read the winner's event and decide again. The state of an image is the replay of its
log, the same on every server.

A lease is an event with an owner and an absolute expiry; renewing it, or accepting a mask under
it, writes the next expiry. Taking an image whose lease has expired is appending a new lease
event: if the holder renewed first, the taker's append loses and it sees the renewal. So an image
is never leased to two people, and no accepted mask is lost, whatever the number of servers.

Each server caches every log up to the number it has read and reads on from there before it
decides (one read of the next number, never a listing).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dataengine.pipeline.core import storage

EVENT_RE = re.compile(r"(\d{6})\.json")
LEGACY_EVENT_RE = re.compile(r"\d{17}-[0-9a-f]{8}\.json")  # time-named events of older servers
MAX_ATTEMPTS = 32


class Conflict(Exception):
    """A write that the image's state forbids (expired or foreign lease, finished image)."""


@dataclass
class Lease:
    """A person's hold on one image until ``expires`` (seconds since the epoch)."""

    lease_id: str
    annotator: str
    key: str
    expires: float


@dataclass
class ImageState:
    """Replay of one image's events (``seq``: the next event number to read)."""

    key: str
    shard: str
    width: int
    height: int
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> annotation
    removed_prefill: set[str] = field(default_factory=set)
    status: str = "todo"          # todo | submitted | skipped
    by: str = ""                  # who submitted / skipped
    skip_reason: str = ""
    lease: Lease | None = None
    seq: int = 0
    idempotency: dict[str, str] = field(default_factory=dict)  # key -> uid of its accept
    prompts: dict[str, str] = field(default_factory=dict)  # prompt digest -> uid of its accept
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def final(self) -> bool:
        return self.status != "todo"

    def live_lease(self, now: float) -> Lease | None:
        """The lease in force at ``now`` (None when free, expired or finished)."""
        if self.final or self.lease is None or self.lease.expires <= now:
            return None
        return self.lease


def apply(st: ImageState, ev: dict[str, Any], lease_seconds: float) -> None:
    """Fold one event into the image's state."""
    t = ev["type"]
    if t == "lease":
        st.lease = Lease(ev["lease_id"], ev["annotator"], st.key,
                         float(ev.get("expires", ev["ts"] + lease_seconds)))
    elif t == "renew":
        if st.lease and st.lease.lease_id == ev.get("lease_id"):
            st.lease.expires = float(ev["expires"])
    elif t == "accept":
        st.accepted[ev["uid"]] = ev["annotation"]
        if ev.get("idempotency_key"):
            st.idempotency[ev["idempotency_key"]] = ev["uid"]
        if ev.get("prompt"):
            st.prompts[ev["prompt"]] = ev["uid"]
        if st.lease and st.lease.lease_id == ev.get("lease_id"):
            st.lease.expires = max(st.lease.expires,
                                   float(ev.get("expires", ev["ts"] + lease_seconds)))
    elif t == "remove":
        if ev["uid"].startswith("p"):
            st.removed_prefill.add(ev["uid"])
        else:
            st.accepted.pop(ev["uid"], None)
    elif t in ("skip", "submit"):
        st.status = "skipped" if t == "skip" else "submitted"
        st.by = ev["annotator"]
        st.skip_reason = ev.get("reason", "")
        st.lease = None
    elif t == "release":
        if st.lease and st.lease.lease_id == ev.get("lease_id"):
            st.lease = None


class EventLog:
    """Reads and appends the event logs of one round's images (``events_url/<key>/``)."""

    def __init__(self, events_url: str, number: int, lease_seconds: float,
                 on_event: Callable[[ImageState, dict[str, Any]], None] | None = None) -> None:
        self.url = events_url
        self.number = number
        self.lease_seconds = lease_seconds
        self.on_event = on_event

    def event_url(self, key: str, seq: int) -> str:
        return storage.join(self.url, key, f"{seq:06d}.json")

    def _apply(self, st: ImageState, ev: dict[str, Any]) -> None:
        apply(st, ev, self.lease_seconds)
        if self.on_event:
            self.on_event(st, ev)

    def replay_all(self, images: dict[str, ImageState]) -> None:
        """Read every image's log with one recursive listing (start-up), then the events."""
        fs, path = storage.get_fs(self.url)
        try:
            found = storage.retry(lambda: fs.find(path), what=self.url)
        except FileNotFoundError:
            found = []
        numbered: dict[str, set[int]] = {}
        legacy: dict[str, list[str]] = {}
        for f in found:
            parts = f.rstrip("/").split("/")
            if len(parts) < 2 or parts[-2] not in images:
                continue
            m = EVENT_RE.fullmatch(parts[-1])
            if m:
                numbered.setdefault(parts[-2], set()).add(int(m.group(1)))
            elif LEGACY_EVENT_RE.fullmatch(parts[-1]):
                legacy.setdefault(parts[-2], []).append(parts[-1])
        for key, st in images.items():
            for name in sorted(legacy.get(key, [])):
                self._apply(st, storage.read_json(storage.join(self.url, key, name)))
            seqs = numbered.get(key, set())
            while st.seq in seqs:
                self._apply(st, storage.read_json(self.event_url(key, st.seq)))
                st.seq += 1
            self.sync(st)  # anything published since the listing

    def sync(self, st: ImageState) -> None:
        """Read the image's events this server has not seen yet (one read when none)."""
        while True:
            try:
                ev = storage.read_json(self.event_url(st.key, st.seq))
            except FileNotFoundError:
                return
            self._apply(st, ev)
            st.seq += 1

    def append(self, st: ImageState, ev: dict[str, Any]) -> bool:
        """Publish ``ev`` as the image's next event; False when another writer took that
        number first (then :meth:`sync` and decide again)."""
        ev = {"round": self.number, "key": st.key, "ts": time.time(), **ev}
        if not storage.create_json(self.event_url(st.key, st.seq), ev):
            return False
        self._apply(st, ev)
        st.seq += 1
        return True

    def commit(self, st: ImageState, decide: Callable[[ImageState], Any]) -> Any:
        """Read on, let ``decide`` look at the current state and return an event to append
        (a dict) or an answer (anything else, returned as it is); retried when another writer
        appended first. ``decide`` raises Conflict when the state forbids the write."""
        with st.lock:
            for _ in range(MAX_ATTEMPTS):
                self.sync(st)
                out = decide(st)
                if not isinstance(out, dict):
                    return out
                if self.append(st, out):
                    return out
        raise Conflict(f"image {st.key}: too many concurrent writers; try again")
