"""Cached, incremental listings of append-only folders whose file names grow with time (the
curation log's ``decisions-<UTC time>-<random>.parquet``).

Listing a whole folder on every request costs O(files) (on S3, one request per 1,000 names).
:class:`IncrementalListing` keeps the names it has seen and, on each refresh, lists only the
names after the newest one minus a rewind window (S3 ``StartAfter``), so a refresh costs
O(new files). A writer whose clock lags by more than the window could publish a name that sorts
before it; a full listing every ``full_every`` seconds picks such names up too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from dataengine.pipeline.core import storage


class IncrementalListing:
    """The sorted basenames under ``url`` matching ``pattern``, refreshed incrementally."""

    def __init__(self, url: str, pattern: str, rewind: Callable[[str], str],
                 full_every: float = 300.0) -> None:
        self.url = url
        self.pattern = pattern
        self.rewind = rewind
        self.full_every = full_every
        self._names: set[str] = set()
        self._sorted: list[str] = []
        self._full_at = -1e18
        self._lock = threading.Lock()
        self.requests = 0  # listings made (full or incremental), for tests and benchmarks

    def names(self) -> list[str]:
        """Every name seen so far, sorted (a refresh first)."""
        with self._lock:
            now = time.monotonic()
            full = now - self._full_at >= self.full_every or not self._sorted
            after = "" if full else self.rewind(self._sorted[-1])
            found = list(storage.iter_names(self.url, self.pattern, after))
            self.requests += 1
            if full:
                self._full_at = now
                self._names = set(found)
            else:
                self._names.update(found)
            if len(self._names) != len(self._sorted) or full:
                self._sorted = sorted(self._names)
            return list(self._sorted)

    def urls(self) -> list[str]:
        """:meth:`names` as URLs under the folder."""
        return [storage.join(self.url, n) for n in self.names()]


def rewind_stamp(seconds: float) -> Callable[[str], str]:
    """A rewind for names ``<prefix>-<YYYYmmddTHHMMSSffffffZ>-...``: the same prefix at a time
    ``seconds`` earlier (names that do not parse rewind to the start)."""
    from datetime import datetime, timedelta

    def rewind(name: str) -> str:
        try:
            prefix, stamp = name.split("-")[:2]
            t = datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ") - timedelta(seconds=seconds)
        except ValueError:
            return ""
        return f"{prefix}-{t.strftime('%Y%m%dT%H%M%S%fZ')}"

    return rewind
