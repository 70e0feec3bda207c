"""The engine's append-only step records: ``ROOT/engine/<name>/steps/NNNN-*.json``.

A record's sequence number is claimed first (``steps/seq/NNNN``, created only if absent), so two
engine processes on one root never write two records with one number; a step another process
recorded meanwhile is returned instead of being recorded twice.
"""

from __future__ import annotations

import time
from typing import Any

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus

STEP_RE = r"\d{4,}-.*\.json"


class StepLog:
    """Append-only step records of one engine under ``ROOT/engine/<name>/steps/``."""

    def __init__(self, corpus: Corpus, name: str) -> None:
        self.dir = corpus.path("engine", name)
        self.records: list[dict[str, Any]] = []
        self._read: set[str] = set()
        self.refresh()

    def refresh(self) -> None:
        """Read records published since the last read (by this or another process)."""
        for u in storage.listdir(storage.join(self.dir, "steps"), STEP_RE):
            if u not in self._read:
                self._read.add(u)
                self.records.append(storage.read_json(u))
        self.records.sort(key=lambda r: int(r["seq"]))

    def find(self, kind: str, round_index: int | None = None) -> dict[str, Any] | None:
        for r in self.records:
            if r["kind"] == kind and r.get("round_index") == round_index:
                return r
        return None

    def _claim_seq(self) -> int:
        seq = max((int(r["seq"]) for r in self.records), default=0) + 1
        while not storage.create_bytes(storage.join(self.dir, "steps", "seq", f"{seq:04d}"),
                                       b""):
            seq += 1
        return seq

    def add(self, kind: str, round_index: int | None, data: dict[str, Any]) -> dict[str, Any]:
        """Record a finished step (or return the record another process made of it)."""
        self.refresh()
        prior = self.find(kind, round_index)
        if prior is not None:
            return prior
        seq = self._claim_seq()
        slug = kind if round_index is None else f"r{round_index:03d}-{kind}"
        rec = {"seq": seq, "kind": kind, "round_index": round_index,
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **data}
        url = storage.join(self.dir, "steps", f"{seq:04d}-{slug}.json")
        storage.write_json(url, rec, overwrite=False)
        self._read.add(url)
        self.records.append(rec)
        return rec
