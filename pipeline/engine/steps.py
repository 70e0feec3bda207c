"""The engine's append-only step records: ``ROOT/engine/<name>/steps/NNNN-*.json``."""

from __future__ import annotations

import time
from typing import Any

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus


class StepLog:
    """Append-only step records of one engine under ``ROOT/engine/<name>/steps/``."""

    def __init__(self, corpus: Corpus, name: str) -> None:
        self.dir = corpus.path("engine", name)
        self.records = [storage.read_json(u) for u in
                        sorted(storage.listdir(storage.join(self.dir, "steps"), r"\d{4}-.*\.json"))]

    def find(self, kind: str, round_index: int | None = None) -> dict[str, Any] | None:
        for r in self.records:
            if r["kind"] == kind and r.get("round_index") == round_index:
                return r
        return None

    def add(self, kind: str, round_index: int | None, data: dict[str, Any]) -> dict[str, Any]:
        seq = len(self.records) + 1
        slug = kind if round_index is None else f"r{round_index:03d}-{kind}"
        rec = {"seq": seq, "kind": kind, "round_index": round_index,
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **data}
        storage.write_json(storage.join(self.dir, "steps", f"{seq:04d}-{slug}.json"), rec,
                           overwrite=False)
        self.records.append(rec)
        return rec
