"""What the dashboard shows about models and the engine: every version's JSON files, PNGs and
held-out metrics (found by tolerant name), the engine's reports. Small records, read with a TTL."""

from __future__ import annotations

import re
import time
from typing import Any

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import MODEL_KINDS, Corpus
from dataengine.pipeline.server.browse_query import BadQuery


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = obj
    return out


def find_metric(metrics: dict[str, Any], names: tuple[str, ...],
                want_reference: bool = False) -> float | None:
    """A scalar metric by tolerant name (``miou@1``, ``miou_at_1``, ``heldout.mIoU@1`` ...),
    preferring held-out entries; ``want_reference`` picks the no-model reference's instead."""
    hits = []
    for path, v in _flatten(metrics).items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        low = path.lower()
        if want_reference != any(w in low for w in ("nomodel", "no_model", "reference")):
            continue
        if "current" in low:  # a promotion record's figures of the other (current) model
            continue
        norm = re.sub(r"[^a-z0-9]", "", low)
        if any(norm.endswith(n) for n in names):
            hits.append((0 if ("held" in norm or "val" in norm) else 1, len(norm), float(v)))
    return sorted(hits)[0][2] if hits else None


MIOU1 = ("miou1", "miouat1", "miou1click", "miouclicks1")
NOC90 = ("noc90", "nocat90", "clicksto90", "clickstoiou90", "noc090")

def find_flag(metrics: dict[str, Any], name: str) -> bool | None:
    """A boolean flag anywhere in nested JSON (e.g. ``gate.promoted``)."""
    for path, v in _flatten(metrics).items():
        if isinstance(v, bool) and path.lower().rsplit(".", 1)[-1] == name:
            return v
    return None


class ModelRecords:
    """Model versions and engine reports of a corpus, cached for ``ttl`` seconds."""

    def __init__(self, corpus: Corpus, ttl: float = 2.0) -> None:
        self.corpus = corpus
        self.refresh_seconds = ttl
        self._ttl: dict[str, tuple[float, Any]] = {}

    def attach_model_metrics(self, per_round: list[dict[str, Any]],
                              models: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Held-out mIoU@1 / NoC@90 of each round's model: from the model version's eval
        files, else from the engine report's row for that round."""
        by_version = {m["version"]: m for m in models}
        engine = self.engine_rounds()
        out = []
        for r in per_round:
            m = by_version.get(r.get("model_version") or "") or {}
            e = engine.get(r["round"], {})
            out.append({**r, **{f"{p}": m.get(k) if m.get(k) is not None else e.get(k)
                                for p, k in (("heldout_miou1", "miou1"),
                                             ("heldout_noc90", "noc90"),
                                             ("nomodel_miou1", "nomodel_miou1"),
                                             ("nomodel_noc90", "nomodel_noc90"))}})
        return out

    def _ttl_cached(self, name: str, fn):
        now = time.monotonic()
        hit = self._ttl.get(name)
        if hit and now - hit[0] < self.refresh_seconds:
            return hit[1]
        value = fn()
        self._ttl[name] = (now, value)
        return value

    def engine_reports(self) -> list[dict[str, Any]]:
        """JSON reports under ``ROOT/engine/`` (name + content), newest name last."""
        return self._ttl_cached("engine", self._engine_reports)

    def _engine_reports(self) -> list[dict[str, Any]]:
        urls = [(u.rsplit("/", 1)[-1], u, None)
                for u in storage.listdir(self.corpus.engine, r"[A-Za-z0-9_.-]+\.json")]
        for d in storage.listdir(self.corpus.engine, r"[A-Za-z0-9_-]+"):
            rep = storage.join(d, "report.json")
            if storage.exists(rep):
                name = d.rsplit("/", 1)[-1]
                png = storage.exists(storage.join(d, "report.png"))
                urls.append((f"{name}/report.json", rep,
                             f"/api/file/engine/{name}/report.png" if png else None))
        out = []
        for name, u, png in urls:
            try:
                out.append({"name": name, "report": storage.read_json(u), "png": png})
            except Exception as exc:  # noqa: BLE001
                out.append({"name": name, "error": str(exc), "png": png})
        return out

    def engine_rounds(self) -> dict[int, dict[str, Any]]:
        """Per-round rows of the engine reports (``rounds`` lists), by round number."""
        out: dict[int, dict[str, Any]] = {}
        for rep in self.engine_reports():
            rows = (rep.get("report") or {}).get("rounds") if isinstance(rep.get("report"),
                                                                         dict) else None
            for row in rows or []:
                if isinstance(row, dict) and isinstance(row.get("round"), int):
                    out[row["round"]] = row
        return out

    def sam_metrics(self) -> list[dict[str, Any]]:
        """Held-out mIoU@1 / NoC@90 per SAM version (from its metrics JSON files)."""
        return [{"version": m["version"], "miou1": m["miou1"], "noc90": m["noc90"],
                 "nomodel_miou1": m["nomodel_miou1"], "nomodel_noc90": m["nomodel_noc90"],
                 "promoted": m["promoted"]} for m in self.models("sam")]

    def models(self, kind: str) -> list[dict[str, Any]]:
        """Versions of one model kind: version.json, every ``*.json`` metrics file, PNG files."""
        if kind not in MODEL_KINDS:
            raise BadQuery(f"model kind {kind!r}: allowed {list(MODEL_KINDS)}")
        return self._ttl_cached(f"models/{kind}", lambda: self._models(kind))

    def _models(self, kind: str) -> list[dict[str, Any]]:
        out = []
        for u in storage.listdir(self.corpus.path("models", kind), r"v\d{4,}"):
            version = u.rsplit("/", 1)[-1]
            files = [f.rsplit("/", 1)[-1] for f in storage.listdir(u)]
            jsons: dict[str, Any] = {}
            for name in files:
                if name.endswith(".json") and name != "config.json" and not name.startswith("."):
                    try:
                        jsons[name] = storage.read_json(storage.join(u, name))
                    except Exception as exc:  # noqa: BLE001
                        jsons[name] = {"error": f"unreadable: {exc}"}
            merged: dict[str, Any] = {}
            for name in sorted(jsons):
                if isinstance(jsons[name], dict):
                    merged[name[:-5]] = jsons[name]
            promoted = find_flag(merged, "promoted")
            out.append({
                "kind": kind, "version": version, "published": "version.json" in files,
                "json": jsons,
                "pngs": sorted(n for n in files if n.lower().endswith((".png", ".jpg")))
                + sorted(f"samples/{n.rsplit('/', 1)[-1]}" for n in storage.listdir(
                    storage.join(u, "samples"), r"[A-Za-z0-9_.-]+\.(png|jpg)")),
                "miou1": find_metric(merged, MIOU1), "noc90": find_metric(merged, NOC90),
                "nomodel_miou1": find_metric(merged, MIOU1, want_reference=True),
                "nomodel_noc90": find_metric(merged, NOC90, want_reference=True),
                "promoted": promoted,
            })
        return out
