"""What the dashboard knows about a corpus, answered from the parquet manifests and small JSON
records only (never by scanning shards): image index, per-mask manifests of every round, round
and model records, quarantine and the curation log.

Everything is cached in memory and refreshed at most every ``refresh_seconds``; append-only
areas are read incrementally (only new manifest parts and decision files).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.curation import DecisionLog
from dataengine.pipeline.core.layout import MODEL_KINDS, STAGES, Corpus
from dataengine.pipeline.core.rounds import MANIFEST_SCHEMA

logger = logging.getLogger(__name__)

KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MASK_ID_RE = re.compile(r"round-\d{4,}/[A-Za-z0-9][A-Za-z0-9_.-]{0,127}/\d{1,9}")
VERSION_RE = re.compile(r"v\d{4,}")
SORT_FIELDS = ("predicted_iou", "stability_score", "area", "round", "n_clicks", "seconds",
               "key", "mask_id", "model_version", "stage", "n_masks")
CURATION_STATES = ("approved", "rejected", "pending")
MAX_PER_PAGE = 200


class BadQuery(ValueError):
    """A malformed or unknown query parameter; the message names it."""


class NotFound(KeyError):
    """An unknown image key, mask id, round or file."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "not found"


@dataclass
class BrowseQuery:
    """Validated filters, sort and paging of the Browse page."""

    view: str = "masks"
    rounds: tuple[int, ...] = ()
    stages: tuple[str, ...] = ()
    model_versions: tuple[str, ...] = ()
    states: tuple[str, ...] = ()
    key: str | None = None
    min_iou: float | None = None
    max_iou: float | None = None
    min_stability: float | None = None
    max_stability: float | None = None
    min_area: int | None = None
    max_area: int | None = None
    sort: str = "predicted_iou"
    order: str = "asc"
    page: int = 0
    per_page: int = 48

    PARAMS = ("view", "round", "stage", "model_version", "state", "key", "min_iou", "max_iou",
              "min_stability", "max_stability", "min_area", "max_area", "sort", "order", "page",
              "per_page", "token")

    @classmethod
    def parse(cls, params: dict[str, str]) -> BrowseQuery:
        """Build from query parameters; BadQuery naming the parameter on anything malformed."""
        unknown = sorted(set(params) - set(cls.PARAMS))
        if unknown:
            raise BadQuery(f"unknown query parameter(s) {unknown}; allowed: {list(cls.PARAMS)}")

        def lst(name: str) -> list[str]:
            raw = params.get(name, "")
            return [v.strip() for v in raw.split(",") if v.strip()] if raw else []

        def num(name: str, kind=float):
            raw = params.get(name)
            if raw in (None, ""):
                return None
            try:
                v = kind(raw)
            except ValueError:
                raise BadQuery(f"{name}={raw!r} is not a {kind.__name__}") from None
            if isinstance(v, float) and not np.isfinite(v):
                raise BadQuery(f"{name}={raw!r} is not finite")
            return v

        q = cls()
        q.view = params.get("view", "masks")
        if q.view not in ("masks", "images"):
            raise BadQuery(f"view={q.view!r}: allowed ['masks', 'images']")
        try:
            q.rounds = tuple(int(v) for v in lst("round"))
        except ValueError:
            raise BadQuery(f"round={params.get('round')!r} must be comma-separated integers") \
                from None
        bad = [s for s in lst("stage") if s not in STAGES]
        if bad:
            raise BadQuery(f"stage {bad} unknown; allowed {list(STAGES)}")
        q.stages = tuple(lst("stage"))
        bad = [v for v in lst("model_version") if len(v) > 64 or not KEY_RE.fullmatch(v)]
        if bad:
            raise BadQuery(f"model_version {bad} is malformed")
        q.model_versions = tuple(lst("model_version"))
        bad = [s for s in lst("state") if s not in CURATION_STATES]
        if bad:
            raise BadQuery(f"state {bad} unknown; allowed {list(CURATION_STATES)}")
        q.states = tuple(lst("state"))
        if params.get("key"):
            if not KEY_RE.fullmatch(params["key"]):
                raise BadQuery(f"key={params['key']!r} is malformed")
            q.key = params["key"]
        q.min_iou, q.max_iou = num("min_iou"), num("max_iou")
        q.min_stability, q.max_stability = num("min_stability"), num("max_stability")
        q.min_area, q.max_area = num("min_area", int), num("max_area", int)
        q.sort = params.get("sort", "predicted_iou")
        if q.sort not in SORT_FIELDS:
            raise BadQuery(f"sort={q.sort!r}: allowed {list(SORT_FIELDS)}")
        q.order = params.get("order", "asc")
        if q.order not in ("asc", "desc"):
            raise BadQuery(f"order={q.order!r}: allowed ['asc', 'desc']")
        q.page = num("page", int) or 0
        q.per_page = num("per_page", int) or 48
        if q.page < 0:
            raise BadQuery(f"page={q.page} must be >= 0")
        if not 1 <= q.per_page <= MAX_PER_PAGE:
            raise BadQuery(f"per_page={q.per_page} must be within 1..{MAX_PER_PAGE}")
        return q


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


class CorpusView:
    """Cached, manifest-only view of a corpus for the dashboard."""

    def __init__(self, corpus: Corpus, refresh_seconds: float = 2.0) -> None:
        self.corpus = corpus
        self.refresh_seconds = refresh_seconds
        self.curation = DecisionLog(corpus, skip_unreadable=True)  # shown, never trained on
        self._lock = threading.RLock()
        self._checked = -1e9
        self._index: pa.Table | None = None
        self._index_sig: Any = None
        self._key_rows: dict[str, int] = {}
        self._parts: dict[str, pa.Table] = {}
        self._manifest: pa.Table = MANIFEST_SCHEMA.empty_table()
        self._by_key: dict[str, np.ndarray] = {}
        self._mask_row: dict[str, int] = {}
        self._states: np.ndarray | None = None
        self._states_version = (-1, -1)
        self.manifest_version = 0
        self._rounds: dict[int, dict[str, Any]] = {}
        self._quarantine_files: tuple[str, ...] = ()
        self._quarantine: dict[str, Any] = {"total": 0, "reasons": []}
        self._overview_cache: tuple[Any, dict[str, Any]] | None = None
        self._ttl: dict[str, tuple[float, Any]] = {}

    # refresh ------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Pick up new manifest parts, index, rounds, quarantine files and decisions."""
        now = time.monotonic()
        if not force and now - self._checked < self.refresh_seconds:
            return
        with self._lock:
            if not force and now - self._checked < self.refresh_seconds:
                return
            self._refresh_index()
            self._refresh_manifests()
            self._refresh_quarantine()
            self.curation.refresh()
            self._checked = time.monotonic()

    def _refresh_index(self) -> None:
        url = self.corpus.index
        fs, path = storage.get_fs(url)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            self._index, self._key_rows = None, {}
            return
        sig = (info.get("size"), info.get("mtime") or info.get("LastModified") or info.get("ETag"))
        if sig == self._index_sig and self._index is not None:
            return
        table = storage.read_table(url)
        self._index, self._index_sig = table, sig
        self._key_rows = {k: i for i, k in enumerate(table["key"].to_pylist())}

    def _refresh_manifests(self) -> None:
        changed = False
        for number in self.corpus.rounds():
            rdir = self.corpus.round_dir(number)
            info = self._rounds.setdefault(number, {"round": number})
            if "started" not in info:
                url = storage.join(rdir, "round.json")
                if storage.exists(url):
                    info["started"] = storage.read_json(url)
            if "metrics" not in info:
                url = storage.join(rdir, "metrics.json")
                if storage.exists(url):
                    info["metrics"] = storage.read_json(url)
            for part in storage.listdir(storage.join(rdir, "manifest"), r"shard-\d+\.parquet"):
                if part in self._parts:
                    continue
                try:
                    self._parts[part] = storage.read_table(part).cast(MANIFEST_SCHEMA)
                except Exception as exc:  # noqa: BLE001 - one bad part must not hide the rest
                    logger.error("dashboard: cannot read manifest part %s: %s", part, exc)
                    self._parts[part] = MANIFEST_SCHEMA.empty_table()
                changed = True
        if not changed:
            return
        tables = [t for _, t in sorted(self._parts.items()) if t.num_rows]
        table = pa.concat_tables(tables).combine_chunks() if tables else \
            MANIFEST_SCHEMA.empty_table()
        keys = table["key"].to_numpy(zero_copy_only=False).astype(object)
        by_key: dict[str, np.ndarray] = {}
        if len(keys):
            uniq, inverse = np.unique(keys.astype(str), return_inverse=True)
            order = np.argsort(inverse, kind="stable")
            bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
            for i, k in enumerate(uniq):
                by_key[str(k)] = order[bounds[i]:bounds[i + 1]]
        self._manifest = table
        self._by_key = by_key
        self._mask_row = {m: i for i, m in enumerate(table["mask_id"].to_pylist())}
        self.manifest_version += 1

    def _refresh_quarantine(self) -> None:
        files = tuple(storage.listdir(self.corpus.quarantine, r".+\.parquet"))
        if files == self._quarantine_files:
            return
        try:
            table = storage.read_tables(list(files))
        except Exception as exc:  # noqa: BLE001
            logger.error("dashboard: cannot read quarantine: %s", exc)
            table = pa.table({})
        reasons: dict[str, int] = {}
        if table.num_rows and "reason" in table.column_names:
            for r in table["reason"].to_pylist():
                short = re.split(r"[:(\n]", str(r), maxsplit=1)[0].strip()[:80] or "unknown"
                reasons[short] = reasons.get(short, 0) + 1
        self._quarantine = {"total": table.num_rows,
                            "reasons": sorted(reasons.items(), key=lambda kv: -kv[1])}
        self._quarantine_files = files

    # basic lookups ------------------------------------------------------------------------
    @property
    def manifest(self) -> pa.Table:
        self.refresh()
        return self._manifest

    def states(self) -> np.ndarray:
        """Effective curation state of every manifest row (object array of strings)."""
        self.refresh()
        ver = (self.manifest_version, self.curation.version)
        with self._lock:
            if self._states is not None and self._states_version == ver:
                return self._states
            t = self._manifest
            n = t.num_rows
            log = self.curation
            mask_dec = {m: v[0] for m, v in log._mask_latest.items()}
            img_dec = {k: v[0] for k, v in log._image_latest.items()}
            states = np.full(n, "pending", dtype=object)
            if n and (mask_dec or img_dec):
                def isin(col: str, values: list[str]) -> np.ndarray:
                    if not values:
                        return np.zeros(n, dtype=bool)
                    return pc.is_in(t[col], pa.array(values, pa.string())).to_numpy(
                        zero_copy_only=False)
                m_rej = isin("mask_id", [m for m, d in mask_dec.items() if d == "reject"])
                m_app = isin("mask_id", [m for m, d in mask_dec.items() if d == "approve"])
                i_rej = isin("key", [k for k, d in img_dec.items() if d == "reject"])
                i_app = isin("key", [k for k, d in img_dec.items() if d == "approve"])
                rejected = m_rej | i_rej
                states[~rejected & (m_app | i_app)] = "approved"
                states[rejected] = "rejected"
            self._states, self._states_version = states, ver
            return states

    def image_info(self, key: str) -> dict[str, Any]:
        """Index row of an image key; NotFound when the key is unknown."""
        if not KEY_RE.fullmatch(key or ""):
            raise BadQuery(f"image key {key!r} is malformed")
        self.refresh()
        row = self._key_rows.get(key)
        if row is None:
            # an index republish may be pending: look once more before refusing
            self.refresh(force=True)
            row = self._key_rows.get(key)
        if row is None:
            raise NotFound(f"image key {key!r} is not in the corpus index")
        assert self._index is not None
        return {c: self._index[c][row].as_py() for c in self._index.column_names}

    def has_mask(self, mask_id: str) -> bool:
        self.refresh()
        return mask_id in self._mask_row

    def mask_rows(self, key: str) -> pa.Table:
        """Manifest rows of one image (every round), in manifest order."""
        self.refresh()
        rows = self._by_key.get(key)
        if rows is None:
            return self._manifest.slice(0, 0)
        return self._manifest.take(pa.array(rows))

    def mask_row(self, mask_id: str) -> dict[str, Any]:
        """One manifest row as a dict; NotFound when unknown."""
        if not MASK_ID_RE.fullmatch(mask_id or ""):
            raise BadQuery(f"mask_id {mask_id!r} is malformed (round-NNNN/<key>/<ann id>)")
        self.refresh()
        row = self._mask_row.get(mask_id)
        if row is None:
            raise NotFound(f"mask_id {mask_id!r} is not in any round manifest")
        return {c: self._manifest[c][row].as_py() for c in self._manifest.column_names}

    # pages --------------------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        """Counts, per-round series, model metrics, quarantine and curation totals."""
        self.refresh()
        sig = (self.manifest_version, self.curation.version, self._index_sig,
               self._quarantine_files, tuple(sorted((n, "metrics" in r)
                                                    for n, r in self._rounds.items())))
        models = self.sam_metrics()
        if self._overview_cache and self._overview_cache[0] == sig:
            out = dict(self._overview_cache[1])
            out["sam_models"] = models
            out["per_round"] = self._attach_model_metrics(out["per_round"], models)
            return out
        t = self._manifest
        index = self._index
        images = index.num_rows if index is not None else 0
        splits: dict[str, int] = {}
        shards = 0
        if index is not None and index.num_rows:
            if "split" in index.column_names:
                for v in pc.value_counts(index["split"]).to_pylist():
                    splits[str(v["values"])] = v["counts"]
            if "shard" in index.column_names:
                shards = pc.count_distinct(index["shard"]).as_py()
        states = self.states()
        state_counts = {s: int((states == s).sum()) for s in CURATION_STATES}
        stage_counts = {s: 0 for s in STAGES}
        for v in pc.value_counts(t["stage"]).to_pylist() if t.num_rows else []:
            stage_counts[str(v["values"])] = v["counts"]
        per_round = []
        if t.num_rows:
            g = t.group_by("round").aggregate([
                ("mask_id", "count"), ("key", "count_distinct"), ("n_clicks", "sum"),
                ("seconds", "sum"), ("predicted_iou", "mean"), ("prefilled", "sum")])
            rows = sorted(g.to_pylist(), key=lambda r: r["round"])
            for r in rows:
                n = r["round"]
                info = self._rounds.get(n, {})
                metrics = info.get("metrics") or {}
                started = info.get("started") or {}
                masks = r["mask_id_count"]
                imgs = metrics.get("images") or r["key_count_distinct"]
                stage = started.get("stage") or metrics.get("stage")
                # clicks and seconds only mean something where people (or the simulated
                # annotator) clicked: manual and semi rounds, pre-filled masks excluded
                clicked = masks - (r["prefilled_sum"] or 0) if stage in ("manual", "semi") else 0
                per_round.append({
                    "round": n, "stage": stage,
                    "model_version": started.get("model_version") or metrics.get("model_version"),
                    "complete": "metrics" in info, "images": imgs, "masks": masks,
                    "masks_per_image": masks / imgs if imgs else None,
                    "clicks_per_mask": (r["n_clicks_sum"] / clicked) if clicked else None,
                    "seconds_per_mask": (r["seconds_sum"] / clicked) if clicked else None,
                    "mean_predicted_iou": r["predicted_iou_mean"],
                    "prefilled": r["prefilled_sum"] or 0,
                })
        rounds_without_masks = [n for n in self._rounds if n not in {r["round"] for r in per_round}]
        for n in rounds_without_masks:
            info = self._rounds[n]
            started = info.get("started") or {}
            per_round.append({"round": n, "stage": started.get("stage"),
                              "model_version": started.get("model_version"),
                              "complete": "metrics" in info, "images": 0, "masks": 0})
        per_round.sort(key=lambda r: r["round"])
        out = {
            "root": self.corpus.root,
            "images": images, "shards": shards, "splits": splits, "masks": t.num_rows,
            "rounds": len(self._rounds), "stages": stage_counts,
            "model_versions": sorted({v for v in t["model_version"].to_pylist() if v})
            if t.num_rows else [],
            "curation": {**state_counts,
                         "rejected_images": len(self.curation.rejected_image_keys()),
                         "decisions": self.curation.table.num_rows},
            "quarantine": self._quarantine,
            "per_round": per_round,
            "engine_reports": self.engine_reports(),
        }
        self._overview_cache = (sig, out)
        out = dict(out)
        out["sam_models"] = models
        out["per_round"] = self._attach_model_metrics(per_round, models)
        return out

    def _attach_model_metrics(self, per_round: list[dict[str, Any]],
                              models: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Held-out mIoU@1 / NoC@90 of each round's model: from the model version's eval
        files, else from the engine report's row for that round."""
        by_version = {m["version"]: m for m in models}
        engine = self.engine_rounds()
        out = []
        for r in per_round:
            m = by_version.get(r.get("model_version") or "") or {}
            e = engine.get(r["round"], {})
            pick = (lambda k, ek: m.get(k) if m.get(k) is not None else e.get(ek))
            out.append({**r, "heldout_miou1": pick("miou1", "miou1"),
                        "heldout_noc90": pick("noc90", "noc90"),
                        "nomodel_miou1": pick("nomodel_miou1", "nomodel_miou1"),
                        "nomodel_noc90": pick("nomodel_noc90", "nomodel_noc90")})
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

    def browse(self, q: BrowseQuery) -> dict[str, Any]:
        """One page of masks (or images) matching the filters, sorted."""
        t = self._filter(q)
        if q.view == "images":
            return self._browse_images(t, q)
        total = t.num_rows
        sort = "mask_id" if q.sort == "n_masks" else q.sort
        order = "ascending" if q.order == "asc" else "descending"
        idx = pc.sort_indices(t, sort_keys=[(sort, order), ("mask_id", "ascending")])
        start = q.page * q.per_page
        page = t.take(idx.slice(start, q.per_page))
        cols = ["mask_id", "key", "round", "stage", "model_version", "annotator", "category",
                "area", "predicted_iou", "stability_score", "n_clicks", "seconds", "prefilled",
                "bbox_x", "bbox_y", "bbox_w", "bbox_h", "width", "height", "state"]
        items = page.select(cols).to_pylist()
        return {"view": "masks", "total": total, "page": q.page, "per_page": q.per_page,
                "items": items}

    def _browse_images(self, t: pa.Table, q: BrowseQuery) -> dict[str, Any]:
        if t.num_rows:
            g = t.group_by("key").aggregate([
                ("mask_id", "count"), ("predicted_iou", "min"), ("stability_score", "min"),
                ("area", "min"), ("round", "max"), ("n_clicks", "sum"), ("seconds", "sum"),
                ("model_version", "max"), ("stage", "max")])
            g = g.rename_columns([c.replace("_count", "").replace("_min", "").replace("_max", "")
                                  .replace("_sum", "") for c in g.column_names])
            g = g.rename_columns(["n_masks" if c == "mask_id" else c for c in g.column_names])
        else:
            g = pa.table({"key": pa.array([], pa.string()), "n_masks": pa.array([], pa.int64())})
        sort = q.sort if q.sort in g.column_names else "key"
        order = "ascending" if q.order == "asc" else "descending"
        total = g.num_rows
        if total:
            idx = pc.sort_indices(g, sort_keys=[(sort, order), ("key", "ascending")])
            g = g.take(idx.slice(q.page * q.per_page, q.per_page))
        return {"view": "images", "total": total, "page": q.page, "per_page": q.per_page,
                "items": g.to_pylist() if total else []}

    def _filter(self, q: BrowseQuery) -> pa.Table:
        t = self.manifest
        states = self.states()
        t = t.drop_columns(["rle"]).append_column("state", pa.array(states, pa.string()))
        conds = []
        if q.rounds:
            conds.append(pc.is_in(t["round"], pa.array(q.rounds, pa.int32())))
        if q.stages:
            conds.append(pc.is_in(t["stage"], pa.array(q.stages, pa.string())))
        if q.model_versions:
            conds.append(pc.is_in(t["model_version"], pa.array(q.model_versions, pa.string())))
        if q.states:
            conds.append(pc.is_in(t["state"], pa.array(q.states, pa.string())))
        if q.key:
            conds.append(pc.equal(t["key"], q.key))
        for col, lo, hi in (("predicted_iou", q.min_iou, q.max_iou),
                            ("stability_score", q.min_stability, q.max_stability),
                            ("area", q.min_area, q.max_area)):
            if lo is not None:
                conds.append(pc.greater_equal(t[col], lo))
            if hi is not None:
                conds.append(pc.less_equal(t[col], hi))
        if conds:
            mask = conds[0]
            for c in conds[1:]:
                mask = pc.and_(mask, c)
            t = t.filter(mask)
        return t

    def sample(self, key: str) -> dict[str, Any]:
        """An image's index info and every mask on it with provenance, state and RLE."""
        info = self.image_info(key)
        rows = self.mask_rows(key)
        states = self.states()
        idx = self._by_key.get(key)
        log = self.curation
        masks = rows.to_pylist()
        for i, m in enumerate(masks):
            m["state"] = states[idx[i]] if idx is not None else "pending"
            dec = log.mask_decision(m["mask_id"])
            if dec:
                dec["ts"] = dec["ts"].isoformat()
            m["decision"] = dec
        img_dec = log.image_decision(key)
        if img_dec:
            img_dec["ts"] = img_dec["ts"].isoformat()
        return {"key": key, "image": info, "image_decision": img_dec, "masks": masks}


def find_flag(metrics: dict[str, Any], name: str) -> bool | None:
    """A boolean flag anywhere in nested JSON (e.g. ``gate.promoted``)."""
    for path, v in _flatten(metrics).items():
        if isinstance(v, bool) and path.lower().rsplit(".", 1)[-1] == name:
            return v
    return None
