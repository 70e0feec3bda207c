"""The sharding stage: raw images -> ``ROOT/images/shard-NNNNNN.tar`` + index, splits, round 0.

:func:`shard` runs in four steps:

1. **List** every source (:mod:`dataengine.pipeline.ingest.sources`); problems are quarantined.
2. **Hash** every input (threads): key = first 16 hex digits of the sha256 of the original bytes.
   Unreadable inputs are quarantined. Keys already in the corpus and exact duplicates within the
   run are dropped and counted.
3. **Plan**: the new keys, in input order, are cut into shards of ``samples_per_shard`` images or
   ``max_shard_bytes`` input bytes, numbered after the shards the index covers. The plan is a
   pure function of the inputs and the index, so a re-run after a crash recomputes the same plan
   and skips every shard whose done record carries the plan's id. (Done records of another plan
   that the index does not cover are adopted as existing, and the rest re-planned after them.)
   Splits of new keys are recorded before any shard is written.
4. **Write**: one Ray task per shard (:func:`dataengine.pipeline.core.distribute.map_tasks`;
   in-process for
   ``memory://`` roots or ``use_ray: false``) decodes, checks, converts and writes the tar
   (published atomically), then its quarantine part, then round-0 masks, then its
   ``.done.json`` (last). ``images/index.parquet`` is re-derived from all done records after the
   shards.

Imported masks (COCO, YOLO-seg) go to round 0 (stage ``imported``) through
:class:`dataengine.pipeline.core.rounds.RoundWriter`, one tar per image shard that has any. Round 0
grows when later shard runs import more masks, so its aggregates (``manifest.parquet``,
``metrics.json``) are re-published after each shard run that added round-0 shards; the per-shard
parts stay append-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import index, quarantine, rounds, splits, storage
from dataengine.pipeline.core.coco import annotation_mask
from dataengine.pipeline.core.layout import Corpus, shard_name
from dataengine.pipeline.core.masks import area, bbox, encode
from dataengine.pipeline.core.rounds import RoundWriter
from dataengine.pipeline.core.shards import BytesTarWriter
from dataengine.pipeline.ingest.images import BadImage, ImageConfig, apply_to_mask, process_image
from dataengine.pipeline.ingest.sources import Item, kind_of, list_items, matches, normalize

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class ShardConfig:
    """Settings of the sharding stage (``dataengine shard``)."""

    samples_per_shard: int = 10_000
    max_shard_bytes: int = 1_000_000_000
    holdout: float = 0.0
    holdout_sources: list[str] = field(default_factory=list)
    image: ImageConfig = field(default_factory=ImageConfig)
    use_ray: bool = True
    task_cpus: float = 1.0
    read_threads: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.image, dict):
            self.image = config_mod.from_dict(ImageConfig, self.image, where="image")
        if not isinstance(self.samples_per_shard, int) or self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard!r}: must be >= 1")
        if not isinstance(self.max_shard_bytes, int) or self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes={self.max_shard_bytes!r}: must be >= 1")
        if not 0.0 <= float(self.holdout) < 1.0:
            raise ValueError(f"holdout={self.holdout!r}: must be a fraction in [0, 1)")
        if self.holdout and self.holdout_sources:
            raise ValueError("holdout and holdout_sources: give one of them, not both")
        if not 0 < float(self.task_cpus) <= 64:
            raise ValueError(f"task_cpus={self.task_cpus!r}: must be in (0, 64]")
        if not isinstance(self.read_threads, int) or self.read_threads < 1:
            raise ValueError(f"read_threads={self.read_threads!r}: must be >= 1")


def content_key(data: bytes) -> tuple[str, str]:
    """(key, sha256 hex) of an image's original bytes."""
    digest = hashlib.sha256(data).hexdigest()
    return digest[:16], digest


# --------------------------------------------------------------------------------------------
# worker side: one shard

def _imported_annotations(item: dict[str, Any], geometry, uri: str, key: str, shard: str,
                          qrows: list[dict]) -> list[dict[str, Any]]:
    frame = geometry.upright_size if item["upright"] else geometry.raw_size
    out = []
    for ann in item["annotations"] or []:
        where = f"{uri}#annotation={ann['id']}"
        try:
            raw = annotation_mask(ann, frame[1], frame[0])
            stored = apply_to_mask(raw, geometry, upright=item["upright"])
        except (ValueError, KeyError, TypeError) as exc:
            qrows.append(quarantine.record(item["source"], where, f"bad annotation: {exc}",
                                           "annotation", key, shard))
            continue
        if not stored.any():
            continue  # cropped away or too small after resize
        rle = encode(stored)
        # Ids are per image (1..n): the manifest's ann_id is int32, COCO crowd ids are not.
        out.append({"id": len(out) + 1, "source_id": ann["id"], "segmentation": rle,
                    "bbox": bbox(rle), "area": area(rle), "predicted_iou": 1.0,
                    "stability_score": 1.0,
                    "point_coords": [], "crop_box": [0, 0, geometry.size[0], geometry.size[1]],
                    "stage": "imported", "round": 0, "model_version": "", "clicks": [],
                    "annotator": item["annotator"], "seconds": 0.0,
                    "category_id": ann["category_id"], "category": ann["category"],
                    "iscrowd": ann.get("iscrowd", 0)})
    return out


def _publish_tar(url: str, samples: Iterable[dict[str, Any]]) -> None:
    """Publish an image tar atomically (staged beside its final name on local disk)."""
    with storage.open_atomic(url) as f, BytesTarWriter(f) as sink:
        for sample in samples:
            sink.write(sample)


def write_one_shard(task: dict[str, Any], root: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Write image shard ``task["shard"]`` (a Ray task body; also runs in-process).

    Publishes the tar, the shard's quarantine part, its round-0 masks, then the done record.
    Returns the shard's stats.
    """
    t0 = time.time()
    corpus = Corpus(root)
    root = corpus.root
    icfg = config_mod.from_dict(ImageConfig, cfg["image"])
    name = task["shard"]
    rows: list[dict[str, Any]] = []
    qrows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []

    def samples():
        for it in task["items"]:
            key, uri = it["key"], it["uri"]
            known, local = it.get("known"), storage.plain_local(uri)
            try:
                st = os.stat(local) if known and local is not None else None
                data = storage.read_bytes(uri)
            except Exception as exc:  # noqa: BLE001 - any read failure is data
                qrows.append(quarantine.record(it["source"], uri, f"unreadable: {exc}", "read",
                                               key, name))
                continue
            if st is not None and [st.st_size, st.st_mtime_ns] == known[1:] and \
                    len(data) == known[1]:
                k, sha = known[0][:16], known[0]  # hashed by the driver, file unchanged since
            else:
                k, sha = content_key(data)
            if k != key:
                qrows.append(quarantine.record(it["source"], uri, "file changed while sharding",
                                               "read", key, name))
                continue
            try:
                img = process_image(data, icfg)
            except BadImage as exc:
                qrows.append(quarantine.record(it["source"], uri, str(exc), "decode", key, name))
                continue
            meta = {"key": key, "source": it["source"], "uri": uri, "sha256": sha,
                    "width": img.width, "height": img.height, "orig_width": img.orig_width,
                    "orig_height": img.orig_height, "orig_format": img.orig_format,
                    "orig_mode": img.orig_mode, "passthrough": img.passthrough,
                    "bytes": len(img.data), "split": it["split"], **it["meta"]}
            if it["annotations"]:
                anns = _imported_annotations(it, img.geometry, uri, key, name, qrows)
                if anns:
                    records.append({"image": {"image_id": key, "width": img.width,
                                              "height": img.height, "file_name": uri},
                                    "annotations": anns})
            rows.append({"key": key, "shard": name, "width": img.width, "height": img.height,
                         "bytes": len(img.data), "sha256": sha, "source": it["source"],
                         "split": it["split"], "uri": uri, "orig_width": img.orig_width,
                         "orig_height": img.orig_height, "format": img.ext})
            yield {"__key__": key, img.ext: img.data,
                   "json": json.dumps(meta, sort_keys=True).encode()}

    _publish_tar(corpus.image_shard(name), samples())
    quarantine.write(corpus, name, qrows)
    masks = 0
    if records:
        writer = RoundWriter(corpus, 0, "imported")
        if not writer.shard_done(name):
            masks = writer.write_shard(name, records, {"source_shard": name})
        else:
            masks = sum(len(r["annotations"]) for r in records)
    stats = {"shard": name, "plan": task["plan"], "ok": len(rows), "quarantined": len(qrows),
             "masks": masks, "round0_images": len(records),
             "bytes": sum(r["bytes"] for r in rows), "seconds": round(time.time() - t0, 3)}
    done = {**stats, "keys": [it["key"] for it in task["items"]], "rows": rows,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        storage.write_json(corpus.image_done(name), done, overwrite=False)
    except FileExistsError:
        logger.info("%s was already done", name)
    return stats


# --------------------------------------------------------------------------------------------
# driver side

def _hash_inputs(items: list[Item], threads: int, progress: Progress | None,
                 known: dict[str, list] | None = None
                 ) -> list[tuple[Item, str | None, int, str]]:
    """``(item, key or None, bytes, error)`` per input; for local files ``known[uri]`` gets
    ``[sha256, size, mtime_ns]`` so a shard task can skip hashing a file that did not change."""
    known = {} if known is None else known

    def one(item: Item) -> tuple[Item, str | None, int, str]:
        try:
            local = storage.plain_local(item.uri)
            if local is not None:  # streamed through one buffer, no whole-file bytes object
                with open(local, "rb") as f:
                    st = os.fstat(f.fileno())
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                    known[item.uri] = [digest, f.tell(), st.st_mtime_ns]
                    return item, digest[:16], f.tell(), ""
            data = storage.read_bytes(item.uri)
        except Exception as exc:  # noqa: BLE001
            return item, None, 0, f"unreadable: {type(exc).__name__}: {exc}"
        return item, content_key(data)[0], len(data), ""

    chunk = 1
    if all(storage.plain_local(i.uri) is not None for i in items):
        # local reads are CPU-bound (sha256): more threads than cores only contend for the GIL,
        # and one pool task per file costs as much as hashing it
        threads, chunk = min(threads, os.cpu_count() or 1), 32
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    out: list[tuple[Item, str | None, int, str]] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for part in pool.map(lambda c: [one(it) for it in c], chunks):
            before = len(out)
            out.extend(part)
            if progress and (len(out) // 64 > before // 64 or len(out) == len(items)):
                progress("hash", len(out), len(items))
    return out


def _done_records(corpus: Corpus) -> dict[str, dict[str, Any]]:
    names = corpus.image_shards()
    with ThreadPoolExecutor(max_workers=16) as pool:
        recs = list(pool.map(lambda n: storage.read_json(corpus.image_done(n)), names))
    return dict(zip(names, recs, strict=True))


def _indexed_shards(corpus: Corpus) -> set[str]:
    return index.indexed_shards(corpus)


def plan_shards(candidates: list[tuple[Item, str, int]], start: int, cfg: ShardConfig
                ) -> tuple[str, list[tuple[str, list[tuple[Item, str]]]]]:
    """(plan id, [(shard name, [(item, key)])]): cut the new inputs into numbered shards."""
    shards: list[tuple[str, list[tuple[Item, str]]]] = []
    cur: list[tuple[Item, str]] = []
    size = 0
    for item, key, nbytes in candidates:
        if cur and (len(cur) >= cfg.samples_per_shard or size + nbytes > cfg.max_shard_bytes):
            shards.append((shard_name(start + len(shards)), cur))
            cur, size = [], 0
        cur.append((item, key))
        size += nbytes
    if cur:
        shards.append((shard_name(start + len(shards)), cur))
    h = hashlib.sha256(f"{start}".encode())
    for name, members in shards:
        h.update(name.encode() + "".join(k for _, k in members).encode())
    return h.hexdigest()[:16], shards


def merge_index(corpus: Corpus, done: dict[str, dict[str, Any]], split_map: dict[str, str]
                ) -> int:
    """Merge the done shards the index does not cover yet into it, in shard order (one entry
    each, O(shard)); returns the number of rows added."""
    merged = index.indexed_shards(corpus)
    added = 0
    for name in sorted(set(done) - merged):
        rows = [{**r, "split": split_map.get(r["key"], r.get("split", "train"))}
                for r in done[name]["rows"]]
        added += index.append_shard(corpus, name, rows)["rows"]
    index.compact_index(corpus)
    return added


def shard(sources: list[str], root: str, cfg: ShardConfig | None = None,
          progress: Progress | None = None) -> dict[str, Any]:
    """Shard raw images from ``sources`` into the corpus at ``root``; returns the summary.

    Raises FileNotFoundError for a missing source and PermissionError for an unwritable root,
    before any work starts. Per-input problems are quarantined and counted, never raised.
    """
    cfg = cfg or ShardConfig()
    if not sources:
        raise ValueError("sources: give at least one SRC")
    for src in sources:
        kind_of(normalize(src))
    for h in cfg.holdout_sources:
        if "://" not in h and not storage.exists(normalize(h)):
            raise FileNotFoundError(f"holdout source {h!r} does not exist")
    corpus = Corpus(root)
    root = corpus.root
    storage.check_writable(root)
    t0 = time.time()
    timings: dict[str, float] = {}
    mark = [time.perf_counter()]

    def lap(phase: str) -> None:
        now = time.perf_counter()
        timings[phase] = round(now - mark[0], 3)
        mark[0] = now

    problems: list[tuple[str, str]] = []
    items: list[Item] = []
    for src in sources:
        items.extend(list_items(src, problems))
    qrows = [quarantine.record(src.split("#")[0], src, reason, "list") for src, reason in problems]
    lap("list")
    known: dict[str, list] = {}
    hashed = _hash_inputs(items, cfg.read_threads, progress, known)
    lap("hash")

    done = _done_records(corpus)
    indexed = _indexed_shards(corpus) & set(done)
    summary: dict[str, Any] = {"inputs": len(items), "ok": 0, "duplicate": 0, "existing": 0,
                               "quarantined": 0, "shards_written": 0, "shards_skipped": 0,
                               "failed_shards": [], "masks": 0}

    def make_plan(base: set[str]):
        seen = {k for n in base for k in done[n]["keys"]}
        start = max((int(n.split("-")[1]) for n in base), default=-1) + 1
        cands, bad = [], []
        for item, key, nbytes, err in hashed:
            if key is None:
                bad.append(quarantine.record(item.source, item.uri, err, "read"))
            elif key not in seen:
                seen.add(key)
                cands.append((item, key, nbytes))
        return cands, start, bad

    base = set(indexed)
    cands, start, bad = make_plan(base)
    plan_id, planned = plan_shards(cands, start, cfg)
    orphans = set(done) - base
    names = {n for n, _ in planned}
    if any(n not in names or done[n].get("plan") != plan_id for n in orphans):
        logger.warning("adopting %d done shards of an earlier unfinished run", len(orphans))
        base = set(done)
        cands, start, bad = make_plan(base)
        plan_id, planned = plan_shards(cands, start, cfg)
    base_keys = {k for n in base for k in done[n]["keys"]}
    n_hashed = sum(1 for _, k, _, _ in hashed if k is not None)
    summary["existing"] = sum(1 for _, k, _, _ in hashed if k is not None and k in base_keys)
    summary["duplicate"] = n_hashed - summary["existing"] - len(cands)
    qrows.extend(bad)

    # Splits are recorded before any shard is written.
    split_map = splits.load_map(corpus)
    wanted = []
    for item, key, _ in cands:
        held = any(matches(item, h) for h in cfg.holdout_sources)
        split, rule = splits.decide(key, held, float(cfg.holdout))
        wanted.append((key, split, item.source, rule))
    split_map = splits.record(corpus, plan_id, wanted, split_map)
    lap("plan")

    tasks = []
    for name, members in planned:
        if name in done and done[name].get("plan") == plan_id:
            summary["shards_skipped"] += 1
            summary["ok"] += done[name]["ok"]
            summary["quarantined"] += done[name]["quarantined"]
            summary["masks"] += done[name]["masks"]
            continue
        tasks.append({"shard": name, "plan": plan_id, "items": [
            {**it.to_dict(), "key": key, "split": split_map[key], "known": known.get(it.uri)}
            for it, key in members]})
    if any(it["annotations"] for t in tasks for it in t["items"]):
        RoundWriter(corpus, 0, "imported", config={"sources": [normalize(s) for s in sources]}
                    ).begin()

    cfg_dict = config_mod.to_dict(cfg)
    results = []
    if tasks:
        n_done = 0

        def on_result(_res: dict[str, Any]) -> None:
            nonlocal n_done
            n_done += 1
            if progress:
                progress("shards", n_done, len(tasks))

        if cfg.use_ray and not root.startswith("memory://"):
            from dataengine.pipeline.core.distribute import map_tasks
            results = map_tasks(write_one_shard, tasks, num_cpus=float(cfg.task_cpus),
                                progress=on_result, root=root, cfg=cfg_dict)
        else:
            for t in tasks:
                try:
                    results.append(write_one_shard(t, root, cfg_dict))
                except Exception as exc:  # noqa: BLE001 - failures are data
                    logger.error("shard %s failed: %s", t["shard"], exc)
                    results.append({"item": t["shard"], "error": f"{type(exc).__name__}: {exc}"})
                on_result(results[-1])
    for task, res in zip(tasks, results, strict=True):
        if "error" in res:
            summary["failed_shards"].append({"shard": task["shard"], "error": res["error"]})
            continue
        summary["shards_written"] += 1
        for k in ("ok", "quarantined", "masks"):
            summary[k] += res[k]
    lap("write")
    quarantine.write(corpus, quarantine.content_name("plan", qrows), qrows)
    summary["quarantined"] += len(qrows)

    done = _done_records(corpus)
    if set(done) - _indexed_shards(corpus):
        summary["index_rows"] = merge_index(corpus, done, split_map)
    if any(r.get("round0_images") for r in results if "error" not in r):
        prev = rounds.round_metrics(corpus, 0).get("sources", [])
        rounds.update_metrics(corpus, 0, {"sources": sorted({*prev, *map(normalize, sources)})})
    lap("index")
    summary["plan"] = plan_id
    summary["timings"] = timings
    summary["seconds"] = round(time.time() - t0, 2)
    logger.info("shard summary: %s", {k: v for k, v in summary.items() if k != "failed_shards"})
    return summary
