"""What the dashboard knows about a corpus, answered from the partitioned index and manifests and
small JSON records only (never by scanning shards, never holding a manifest in memory).

The light columns of the index and of every manifest part live in a DuckDB file on local disk
(:class:`dataengine.pipeline.server.mask_store.MaskStore`), read part by part as parts appear;
Overview aggregates and Browse pages are SQL over it with bounded memory, per-image pages read the
RLEs of one image from the manifest parts that hold it. Listings are cached: a complete round's
parts never change, round 0 is re-listed when its ``metrics.json`` changes, quarantine files are
re-listed at most every ``listing_seconds``, the curation log is listed incrementally.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataengine.pipeline.core import index, storage
from dataengine.pipeline.core.curation import DecisionLog
from dataengine.pipeline.core.layout import STAGES, Corpus
from dataengine.pipeline.core.rounds import MANIFEST_SCHEMA
from dataengine.pipeline.server.browse_query import (  # noqa: F401 - re-exported for the app
    CURATION_STATES,
    KEY_RE,
    MASK_ID_RE,
    MAX_PER_PAGE,
    SORT_FIELDS,
    VERSION_RE,
    BadQuery,
    BrowseQuery,
    NotFound,
)
from dataengine.pipeline.server.mask_store import MaskStore, shard_number
from dataengine.pipeline.server.model_records import ModelRecords, find_flag, find_metric  # noqa: F401

logger = logging.getLogger(__name__)

MASK_ITEM_COLS = ("key", "round", "ann_id", "stage", "model_version", "annotator", "category",
                  "area", "predicted_iou", "stability_score", "n_clicks", "seconds", "prefilled",
                  "bbox_x", "bbox_y", "bbox_w", "bbox_h", "width", "height")
STATE_SQL = ("CASE WHEN dm.d = 'reject' OR di.d = 'reject' THEN 'rejected' "
             "WHEN dm.d IS NOT NULL OR di.d IS NOT NULL THEN 'approved' ELSE 'pending' END")
DEC_JOIN = ("LEFT JOIN dec_mask dm ON m.round = dm.round AND m.key = dm.key AND "
            "m.ann_id = dm.ann_id LEFT JOIN dec_image di ON m.key = di.key")
IMAGE_AGGS = {"n_masks": "count(*)", "predicted_iou": "min(m.predicted_iou)",
              "stability_score": "min(m.stability_score)", "area": "min(m.area)",
              "round": "max(m.round)", "n_clicks": "sum(m.n_clicks)",
              "seconds": "sum(m.seconds)", "model_version": "max(m.model_version)",
              "stage": "max(m.stage)"}


def mask_id_of(rnd: int, key: str, ann_id: int) -> str:
    """``round-NNNN/<key>/<ann id>``."""
    return f"round-{int(rnd):04d}/{key}/{int(ann_id)}"


class CorpusView:
    """Out-of-core, manifest-only view of a corpus for the dashboard."""

    def __init__(self, corpus: Corpus, refresh_seconds: float = 2.0,
                 cache_dir: str | None = None, memory_limit: str = "1GB",
                 listing_seconds: float = 30.0) -> None:
        self.corpus = corpus
        self.refresh_seconds = refresh_seconds
        self.listing_seconds = listing_seconds
        self.curation = DecisionLog(corpus, skip_unreadable=True)  # shown, never trained on
        self.records = ModelRecords(corpus, refresh_seconds)
        path = os.path.join(cache_dir, "view.duckdb") if cache_dir else None
        self.store = MaskStore(path, memory_limit=memory_limit)
        self._lock = threading.RLock()
        self._checked = -1e9
        self._rounds: dict[int, dict[str, Any]] = {}
        self._round_sig: dict[int, Any] = {}
        self._quarantine_seen = -1e9
        self._quarantine_parts: dict[str, list[str]] = {}
        self._quarantine: dict[str, Any] = {"total": 0, "reasons": []}
        self._decisions_version = -1
        self._cache: dict[str, tuple[Any, Any]] = {}

    # refresh ------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Pick up new index entries, manifest parts, rounds, quarantine files and decisions."""
        now = time.monotonic()
        if not force and now - self._checked < self.refresh_seconds:
            return
        with self._lock:
            if not force and now - self._checked < self.refresh_seconds:
                return
            self._refresh_index()
            self._refresh_manifests(force)
            self._refresh_quarantine(force)
            self.curation.refresh()
            if self.curation.version != self._decisions_version:
                log = self.curation
                self.store.set_decisions({m: v[0] for m, v in log._mask_latest.items()},
                                         {k: v[0] for k, v in log._image_latest.items()})
                self._decisions_version = log.version
            self._checked = time.monotonic()

    @property
    def version(self) -> tuple[int, int]:
        """Changes whenever the data or the decisions change."""
        return self.store.version, self.curation.version

    def _listing(self, url: str, pattern: str) -> dict[str, tuple[str, dict[str, Any]]]:
        fs, path = storage.get_fs(url)
        try:
            entries = storage.retry(lambda: fs.ls(path, detail=True), what=url)
        except FileNotFoundError:
            return {}
        out = {}
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if re.fullmatch(pattern, name):
                out[storage.join(url, name)] = (name[: -len(".parquet")], e)
        return out

    def _refresh_index(self) -> None:
        found = self._listing(self.corpus.path("images", "index"), r"part-\d{8,}\.parquet")
        if not found and storage.exists(self.corpus.index):  # a corpus with the old single file
            found = self._listing(self.corpus.images, r"index\.parquet")
        else:  # an entry is shown once its shard's done record exists (it is then immutable)
            known = self.store.known_parts("index")
            found = {u: v for u, v in found.items()
                     if u in known or index.entry_published(self.corpus, u)}
        self.store.sync_parts("index", {u: (n, e, -1) for u, (n, e) in found.items()})

    def _refresh_manifests(self, force: bool) -> None:
        numbers = self.corpus.rounds()
        for number in numbers:
            rdir = self.corpus.round_dir(number)
            info = self._rounds.setdefault(number, {"round": number})
            if "started" not in info and storage.exists(storage.join(rdir, "round.json")):
                info["started"] = storage.read_json(storage.join(rdir, "round.json"))
            sig = self._metrics_sig(rdir)
            if sig is not None and sig == self._round_sig.get(number) and not force:
                continue  # complete and unchanged since its parts were listed
            if sig is not None:
                info["metrics"] = storage.read_json(storage.join(rdir, "metrics.json"))
            found = self._listing(storage.join(rdir, "manifest"), r"shard-\d+\.parquet")
            self.store.sync_parts("round", {u: (n, e, number) for u, (n, e) in found.items()},
                                  prefix=storage.join(rdir, "manifest") + "/")
            self._round_sig[number] = sig
        for gone in set(self._rounds) - set(numbers):
            self._rounds.pop(gone)

    def _metrics_sig(self, rdir: str) -> Any:
        fs, path = storage.get_fs(storage.join(rdir, "metrics.json"))
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return None
        return (info.get("size"), info.get("mtime") or info.get("LastModified") or
                info.get("ETag"))

    def _refresh_quarantine(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._quarantine_seen < self.listing_seconds:
            return
        self._quarantine_seen = now
        files = storage.listdir(self.corpus.quarantine, r".+\.parquet")
        new = [f for f in files if f not in self._quarantine_parts]
        for f in new:  # quarantine files are append-only: read each once
            try:
                t = storage.read_table(f)
                self._quarantine_parts[f] = t["reason"].to_pylist() \
                    if "reason" in t.column_names else [""] * t.num_rows
            except Exception as exc:  # noqa: BLE001
                logger.error("dashboard: cannot read quarantine file %s: %s", f, exc)
                self._quarantine_parts[f] = []
        for f in set(self._quarantine_parts) - set(files):
            self._quarantine_parts.pop(f)
        if not new and len(files) == len(self._quarantine_parts) and self._quarantine["total"]:
            return
        reasons: dict[str, int] = {}
        total = 0
        for rs in self._quarantine_parts.values():
            total += len(rs)
            for r in rs:
                short = re.split(r"[:(\n]", str(r), maxsplit=1)[0].strip()[:80] or "unknown"
                reasons[short] = reasons.get(short, 0) + 1
        self._quarantine = {"total": total,
                            "reasons": sorted(reasons.items(), key=lambda kv: -kv[1])}

    def _cached(self, name: str, sig: Any, fn):
        hit = self._cache.get(name)
        if hit is not None and hit[0] == sig:
            return hit[1]
        value = fn()
        self._cache[name] = (sig, value)
        return value

    # per image ----------------------------------------------------------------------------
    def image_info(self, key: str) -> dict[str, Any]:
        """Index row of an image key; NotFound when the key is unknown."""
        if not KEY_RE.fullmatch(key or ""):
            raise BadQuery(f"image key {key!r} is malformed")
        self.refresh()
        sql = ("SELECT key, shard, width, height, bytes, sha256, source, split, uri, orig_width, "
               "orig_height, format FROM images WHERE key = ? LIMIT 1")
        rows = self.store.dicts(sql, [key])
        if not rows:  # an index entry may be pending: look once more before refusing
            self.refresh(force=True)
            rows = self.store.dicts(sql, [key])
        if not rows:
            raise NotFound(f"image key {key!r} is not in the corpus index")
        return rows[0]

    def mask_rows(self, key: str) -> pa.Table:
        """Manifest rows of one image (every round, RLE included), round by round."""
        self.refresh()
        try:
            shard = self.image_info(key)["shard"]
        except NotFound:
            return MANIFEST_SCHEMA.empty_table()
        tables = [self._part_rows(self.corpus.round_dir(n), shard, key)
                  for n in self.store.round_parts().get(shard, [])]
        tables = [t for t in tables if t.num_rows]
        return pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()

    def _part_rows(self, rdir: str, shard: str, key: str) -> pa.Table:
        """Rows of ``key`` in one manifest part: its key column, then the row groups that
        hold the key (parts are written in small row groups)."""
        url = storage.join(rdir, "manifest", f"{shard}.parquet")
        local = storage.plain_local(url)
        src = local if local is not None else io.BytesIO(storage.read_bytes(url))
        pf = pq.ParquetFile(src)
        keys = pf.read(columns=["key"])["key"]
        hits = pc.indices_nonzero(pc.equal(keys, key)).to_pylist()
        if not hits:
            return MANIFEST_SCHEMA.empty_table()
        bounds, start = [], 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            bounds.append((start, start + n))
            start += n
        groups = sorted({i for h in hits for i, (a, b) in enumerate(bounds) if a <= h < b})
        t = pf.read_row_groups(groups)
        return t.filter(pc.equal(t["key"], key)).cast(MANIFEST_SCHEMA)

    def mask_row(self, mask_id: str) -> dict[str, Any]:
        """One manifest row as a dict; NotFound when unknown."""
        if not MASK_ID_RE.fullmatch(mask_id or ""):
            raise BadQuery(f"mask_id {mask_id!r} is malformed (round-NNNN/<key>/<ann id>)")
        rnd, key, ann = _parse(mask_id)
        for row in self.mask_rows(key).to_pylist():
            if row["round"] == rnd and row["ann_id"] == ann:
                return row
        raise NotFound(f"mask_id {mask_id!r} is not in any round manifest")

    def has_mask(self, mask_id: str) -> bool:
        """Whether ``mask_id`` is in a manifest (a zone-map pruned lookup, no RLE read)."""
        if not MASK_ID_RE.fullmatch(mask_id or ""):
            return False
        self.refresh()
        rnd, key, ann = _parse(mask_id)
        got = self.store.query("SELECT shard FROM images WHERE key = ? LIMIT 1", [key])
        if not got:
            return False
        return bool(self.store.query(
            "SELECT 1 FROM masks WHERE shard_no = ? AND key = ? AND round = ? AND ann_id = ? "
            "LIMIT 1", [shard_number(got[0][0]), key, rnd, ann]))

    def sample(self, key: str) -> dict[str, Any]:
        """An image's index info and every mask on it with provenance, state and RLE."""
        info = self.image_info(key)
        masks = self.mask_rows(key).to_pylist()
        log = self.curation
        for m in masks:
            m["state"] = log.mask_state(m["mask_id"], key)
            dec = log.mask_decision(m["mask_id"])
            if dec:
                dec["ts"] = dec["ts"].isoformat()
            m["decision"] = dec
        img_dec = log.image_decision(key)
        if img_dec:
            img_dec["ts"] = img_dec["ts"].isoformat()
        return {"key": key, "image": info, "image_decision": img_dec, "masks": masks}

    # overview -----------------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        """Counts, per-round series, model metrics, quarantine and curation totals."""
        self.refresh()
        models = self.records.sam_metrics()
        rounds_sig = tuple(sorted((n, "metrics" in r) for n, r in self._rounds.items()))
        out = dict(self._cached("overview", (self.version, rounds_sig), self._overview))
        out["quarantine"] = self._quarantine
        out["engine_reports"] = self.records.engine_reports()
        out["sam_models"] = models
        out["per_round"] = self.records.attach_model_metrics(out["per_round"], models)
        return out

    def _overview(self) -> dict[str, Any]:
        images, shards, splits = self._image_counts()
        stages, versions, total = self._stage_counts()
        return {"root": self.corpus.root, "images": images, "shards": shards, "splits": splits,
                "masks": total, "rounds": len(self._rounds), "stages": stages,
                "model_versions": versions, "curation": self._curation_counts(total),
                "per_round": self._per_round()}

    def _image_counts(self) -> tuple[int, int, dict[str, int]]:
        rows = self.store.query("SELECT split, count(*) FROM images GROUP BY ALL")
        splits = {str(s): int(n) for s, n in rows if s is not None}
        shards = self.store.query("SELECT count(DISTINCT shard) FROM images")[0][0]
        return sum(int(n) for _, n in rows), int(shards or 0), splits

    def _stage_counts(self) -> tuple[dict[str, int], list[str], int]:
        stages = {s: 0 for s in STAGES}
        versions: set[str] = set()
        total = 0
        for stage, version, n in self.store.query(
                "SELECT stage, model_version, count(*) FROM masks GROUP BY ALL"):
            stages[str(stage)] = stages.get(str(stage), 0) + int(n)
            total += int(n)
            if version:
                versions.add(str(version))
        return stages, sorted(versions), total

    def _curation_counts(self, total: int) -> dict[str, Any]:
        counts = {s: 0 for s in CURATION_STATES}
        log = self.curation
        if log._mask_latest or log._image_latest:
            # only images someone decided on can be anything but pending
            for state, n in self.store.query(
                    f"SELECT {STATE_SQL} AS state, count(*) FROM masks m {DEC_JOIN} "
                    "WHERE m.key IN (SELECT key FROM dec_mask UNION SELECT key FROM dec_image) "
                    "GROUP BY state"):
                counts[state] = int(n)
        counts["pending"] = total - counts["approved"] - counts["rejected"]
        return {**counts, "rejected_images": len(log.rejected_image_keys()),
                "decisions": log.table.num_rows}

    def _per_round(self) -> list[dict[str, Any]]:
        agg = {r[0]: r for r in self.store.query(
            "SELECT round, count(*), sum(n_clicks), sum(seconds), avg(predicted_iou), "
            "sum(CASE WHEN prefilled THEN 1 ELSE 0 END) FROM masks GROUP BY round")}
        out = []
        for n in sorted(set(agg) | set(self._rounds)):
            info = self._rounds.get(n, {})
            metrics = info.get("metrics") or {}
            started = info.get("started") or {}
            stage = started.get("stage") or metrics.get("stage")
            row = {"round": n, "stage": stage,
                   "model_version": started.get("model_version") or metrics.get("model_version"),
                   "complete": "metrics" in info, "images": 0, "masks": 0}
            if n in agg:
                _, masks, clicks, seconds, iou, prefilled = agg[n]
                imgs = metrics.get("images") or self._distinct_keys(n)
                # clicks and seconds only mean something where people (or the simulated
                # annotator) clicked: manual and semi rounds, pre-filled masks excluded
                clicked = masks - (prefilled or 0) if stage in ("manual", "semi") else 0
                row.update({"images": imgs, "masks": int(masks),
                            "masks_per_image": masks / imgs if imgs else None,
                            "clicks_per_mask": (clicks / clicked) if clicked else None,
                            "seconds_per_mask": (seconds / clicked) if clicked else None,
                            "mean_predicted_iou": iou, "prefilled": int(prefilled or 0)})
            out.append(row)
        return out

    def _distinct_keys(self, number: int) -> int:
        return int(self.store.query("SELECT count(DISTINCT key) FROM masks WHERE round = ?",
                                    [number])[0][0])

    # browse -------------------------------------------------------------------------------
    def browse(self, q: BrowseQuery) -> dict[str, Any]:
        """One page of masks (or images) matching the filters, sorted."""
        self.refresh()
        where, params = _where(q)
        join = DEC_JOIN if q.states else ""
        if q.view == "images":
            return self._browse_images(q, where, params, join)
        total = self._cached(f"count:{where}:{params}", self.version, lambda: self.store.query(
            f"SELECT count(*) FROM masks m {join} {where}", params)[0][0])
        sort = "key" if q.sort in ("mask_id", "n_masks") else q.sort
        order = "ASC" if q.order == "asc" else "DESC"
        cols = ", ".join(f"m.{c}" for c in MASK_ITEM_COLS)
        page = self.store.dicts(
            f"SELECT {cols} FROM masks m {join} {where} "
            # ties in storage order (append-only: stable across refreshes), not by string
            f"ORDER BY m.{sort} {order}, m.rowid LIMIT ? OFFSET ?",
            [*params, q.per_page, q.page * q.per_page])
        log = self.curation
        for item in page:
            item["mask_id"] = mask_id_of(item["round"], item["key"], item.pop("ann_id"))
            item["state"] = log.mask_state(item["mask_id"], item["key"])
        return {"view": "masks", "total": int(total), "page": q.page, "per_page": q.per_page,
                "items": page}

    def _browse_images(self, q: BrowseQuery, where: str, params: list[Any],
                       join: str) -> dict[str, Any]:
        total = self._cached(f"icount:{where}:{params}", self.version, lambda: self.store.query(
            f"SELECT count(DISTINCT m.key) FROM masks m {join} {where}", params)[0][0])
        aggs = ", ".join(f"{expr} AS {name}" for name, expr in IMAGE_AGGS.items())
        sort = q.sort if q.sort in IMAGE_AGGS else "key"
        order = "ASC" if q.order == "asc" else "DESC"
        items = self.store.dicts(
            f"SELECT m.key AS key, {aggs} FROM masks m {join} {where} GROUP BY m.key "
            f"ORDER BY {sort} {order}, key LIMIT ? OFFSET ?",
            [*params, q.per_page, q.page * q.per_page])
        return {"view": "images", "total": int(total), "page": q.page, "per_page": q.per_page,
                "items": items}

    # models and engine --------------------------------------------------------------------
    def models(self, kind: str) -> list[dict[str, Any]]:
        """Versions of one model kind: version.json, every ``*.json`` metrics file, PNG files."""
        return self.records.models(kind)

    def sam_metrics(self) -> list[dict[str, Any]]:
        """Held-out mIoU@1 / NoC@90 per SAM version."""
        return self.records.sam_metrics()

    def engine_reports(self) -> list[dict[str, Any]]:
        """JSON reports under ``ROOT/engine/``."""
        return self.records.engine_reports()


def _parse(mask_id: str) -> tuple[int, str, int]:
    head, key, ann = mask_id.split("/")
    return int(head.split("-", 1)[1]), key, int(ann)


def _where(q: BrowseQuery) -> tuple[str, list[Any]]:
    """The WHERE clause of a Browse query (column names are fixed; values are parameters)."""
    conds, params = [], []

    def isin(col: str, values: tuple) -> None:
        if values:
            conds.append(f"{col} IN ({', '.join('?' * len(values))})")
            params.extend(values)

    isin("m.round", q.rounds)
    isin("m.stage", q.stages)
    isin("m.model_version", q.model_versions)
    if q.states:
        isin(f"({STATE_SQL})", q.states)
    if q.key:
        conds.append("m.key = ?")
        params.append(q.key)
    for col, lo, hi in (("predicted_iou", q.min_iou, q.max_iou),
                        ("stability_score", q.min_stability, q.max_stability),
                        ("area", q.min_area, q.max_area)):
        if lo is not None:
            conds.append(f"m.{col} >= ?")
            params.append(lo)
        if hi is not None:
            conds.append(f"m.{col} <= ?")
            params.append(hi)
    return ("WHERE " + " AND ".join(conds)) if conds else "", params
