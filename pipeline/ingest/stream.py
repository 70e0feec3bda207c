"""The streaming shard stage: inputs flow from the listing into shard tasks without a pass over
them in the driver, and each task reads each of its inputs once.

**Chunks.** :func:`iter_chunks` cuts the stream of inputs (:func:`sources.iter_items`, in the
sources' stable order) into chunks of ``samples_per_shard`` inputs (or ``max_shard_bytes`` of
listed bytes). A chunk's id is the hash of its sources, URIs and listed sizes, so a re-run over
the same inputs cuts the same chunks.

**Claims.** Before a chunk is given to a task, the driver claims a shard number for it with
create-if-absent (``images/claims/shard-NNNNNN.json``, naming the chunk) and records the chunk's
shard (``images/chunks/<chunk id>.json``, create-if-absent: of two runs claiming one chunk, the
first's shard wins and both write that shard, identically). When the shard's done record is
published the task adds ``images/chunks/<chunk id>.done.json`` (its stats). One listing of
``images/chunks/`` at the start tells a run which chunks are done (skipped without reading
their inputs) and which were claimed by a run that did not finish (redone under the same shard
number: resume is exact).

**One pass per task** (:func:`write_chunk`): read, hash (key = sha256[:16]), decode, check,
convert and append to a staged tar, in one pass per input. Then, once per task: the keys the
index already holds (in other shards) are left out of the tar (one streaming scan of the
index's key column, memory O(shard)); the splits of the new keys are recorded; the tar is
published; the quarantine part; the shard is merged into the index
(:func:`dataengine.pipeline.core.index.append_shard`); round-0 masks for the images it won; the
done record last.

**Duplicates.** An image met twice in one task is stored once (the first). An image already in
the index is not stored again. An image two tasks store at the same time (both checked the index
before either merged) is resolved when the tasks merge their shards into the index: the shard
merged first holds the indexed copy; the other's index entry and done record list the key under
``duplicates`` (with the shard that holds it); that shard's tar keeps the bytes, but no reader
sees them (readers go through the index or skip a done record's ``duplicates``) and round 0 gets
the image's masks only from the shard that won it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import index, quarantine, splits, storage
from dataengine.pipeline.core.coco import annotation_mask
from dataengine.pipeline.core.layout import Corpus, shard_name
from dataengine.pipeline.core.masks import area, bbox, encode
from dataengine.pipeline.core.rounds import RoundWriter
from dataengine.pipeline.ingest.images import BadImage, ImageConfig, apply_to_mask, process_image
from dataengine.pipeline.ingest.sources import Item, iter_items, matches

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# driver side: chunks and claims

def iter_chunks(sources: Iterable[str], samples: int, max_bytes: int,
                problems: list[tuple[str, str]]) -> Iterator[list[Item]]:
    """The inputs of ``sources`` (in order) cut into chunks; problems are appended."""
    cur: list[Item] = []
    size = 0
    for src in sources:
        for item in iter_items(src, problems):
            if cur and (len(cur) >= samples or size + item.size > max_bytes):
                yield cur
                cur, size = [], 0
            cur.append(item)
            size += item.size
    if cur:
        yield cur


def chunk_id(items: list[Item]) -> str:
    """The identity of a chunk: a hash of its inputs' sources, URIs and listed sizes."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.source}\x1f{it.uri}\x1f{it.size}\x1e".encode())
    return h.hexdigest()[:20]


class ChunkLedger:
    """Which chunks are claimed / done, from one listing of ``images/chunks/``; claims new ones."""

    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus
        self.dir = corpus.path("images", "chunks")
        names = set(storage.iter_names(self.dir))
        self.done = {n[: -len(".done.json")] for n in names if n.endswith(".done.json")}
        self.claimed = {n[: -len(".json")] for n in names
                        if n.endswith(".json") and not n.endswith(".done.json")}
        taken = [int(n.split("-")[1].split(".")[0])
                 for n in storage.iter_names(corpus.images, r"shard-\d+\..*")]
        taken += [int(n.split("-")[1].split(".")[0])
                  for n in storage.iter_names(corpus.path("images", "claims"))]
        self.next_number = max(taken, default=-1) + 1

    def done_stats(self, cid: str) -> dict[str, Any]:
        return storage.read_json(storage.join(self.dir, f"{cid}.done.json"))

    def shard_of(self, cid: str) -> str | None:
        """The shard an earlier run claimed for ``cid`` (None when unclaimed)."""
        if cid not in self.claimed:
            return None
        return storage.read_json(storage.join(self.dir, f"{cid}.json"))["shard"]

    def claim(self, cid: str) -> str:
        """A shard for chunk ``cid``: its earlier claim, or a newly claimed number."""
        known = self.shard_of(cid)
        if known:
            return known
        while True:
            name = shard_name(self.next_number)
            self.next_number += 1
            if storage.create_json(self.corpus.path("images", "claims", f"{name}.json"),
                                   {"chunk": cid}):
                break
        if not storage.create_json(storage.join(self.dir, f"{cid}.json"), {"shard": name}):
            self.claimed.add(cid)  # another run claimed this chunk first: write its shard
            return self.shard_of(cid) or name
        self.claimed.add(cid)
        return name


# --------------------------------------------------------------------------------------------
# worker side: one chunk -> one shard

def content_key(data: bytes) -> tuple[str, str]:
    """(key, sha256 hex) of an image's original bytes."""
    digest = hashlib.sha256(data).hexdigest()
    return digest[:16], digest


def imported_annotations(item: dict[str, Any], geometry, uri: str, key: str, shard: str,
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


def _stage_path(url: str) -> str:
    local = storage.plain_local(url)
    if local is not None:  # beside the target: publishing is a rename
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f".{os.path.basename(local)}.", suffix=".stage",
                                    dir=os.path.dirname(local))
    else:
        fd, path = tempfile.mkstemp(prefix="dataengine-", suffix=".tar")
    os.close(fd)
    return path


def _publish_staged(path: str, url: str, drop: set[str]) -> None:
    """Publish the staged tar at ``url``, leaving out the samples of ``drop``."""
    from dataengine.pipeline.core.shards import BytesTarWriter, iter_tar

    if drop:
        kept = path + ".kept"
        with open(kept, "wb") as f, BytesTarWriter(f) as sink:
            for s in iter_tar(path):
                if s["__key__"] not in drop:
                    sink.write({k: v for k, v in s.items() if not k.startswith("__")}
                               | {"__key__": s["__key__"]})
        os.replace(kept, path)
    local = storage.plain_local(url)
    if local is not None:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(path, local)
    else:
        storage.put_file(path, url)
        os.unlink(path)


def _read_pass(task: dict[str, Any], name: str, cfg: dict[str, Any], tar_path: str,
               qrows: list[dict[str, Any]]) -> tuple[list[dict], dict[str, dict], int]:
    """One pass over the chunk's inputs: (index rows, key -> item dict, in-chunk repeats)."""
    from dataengine.pipeline.core.shards import BytesTarWriter
    icfg = config_mod.from_dict(ImageConfig, cfg["image"])
    held_srcs = cfg["holdout_sources"]
    rows: list[dict[str, Any]] = []
    items: dict[str, dict[str, Any]] = {}
    repeated = 0
    with open(tar_path, "wb") as f, BytesTarWriter(f) as sink:
        for it in task["items"]:
            uri = it["uri"]
            try:
                data = storage.read_bytes(uri)
            except Exception as exc:  # noqa: BLE001 - any read failure is data
                qrows.append(quarantine.record(it["source"], uri,
                                               f"unreadable: {type(exc).__name__}: {exc}",
                                               "read", "", name))
                continue
            key, sha = content_key(data)
            if key in items:
                repeated += 1
                continue
            held = any(matches(Item(uri, it["source"]), h) for h in held_srcs)
            split, rule = splits.decide(key, held, float(cfg["holdout"]))
            try:
                img = process_image(data, icfg)
            except BadImage as exc:
                qrows.append(quarantine.record(it["source"], uri, str(exc), "decode", key, name))
                continue
            meta = {"key": key, "source": it["source"], "uri": uri, "sha256": sha,
                    "width": img.width, "height": img.height, "orig_width": img.orig_width,
                    "orig_height": img.orig_height, "orig_format": img.orig_format,
                    "orig_mode": img.orig_mode, "passthrough": img.passthrough,
                    "bytes": len(img.data), "split": split, **it["meta"]}
            if it["annotations"]:
                anns = imported_annotations(it, img.geometry, uri, key, name, qrows)
                if anns:
                    it = {**it, "record": {"image": {"image_id": key, "width": img.width,
                                                     "height": img.height, "file_name": uri},
                                           "annotations": anns}}
            items[key] = {**it, "split_rule": (split, rule)}
            rows.append({"key": key, "shard": name, "width": img.width, "height": img.height,
                         "bytes": len(img.data), "sha256": sha, "source": it["source"],
                         "split": split, "uri": uri, "orig_width": img.orig_width,
                         "orig_height": img.orig_height, "format": img.ext})
            sink.write({"__key__": key, img.ext: img.data,
                        "json": json.dumps(meta, sort_keys=True).encode()})
    return rows, items, repeated


def _record_splits(corpus: Corpus, name: str, rows: list[dict], items: dict[str, dict]
                   ) -> dict[str, str]:
    """Record the splits of new keys (a key's first recorded split wins): before the tar."""
    known = splits.lookup(corpus, [r["key"] for r in rows])
    wanted = [(r["key"], *items[r["key"]]["split_rule"][:1], items[r["key"]]["source"],
               items[r["key"]]["split_rule"][1]) for r in rows]
    return splits.record(corpus, name, wanted, known)


def write_chunk(task: dict[str, Any], root: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Write one chunk as image shard ``task["shard"]`` (a Ray task body; also in-process);
    returns its stats (see the module docstring for the steps)."""
    t0 = time.time()
    corpus = Corpus(root)
    name, cid = task["shard"], task["chunk"]
    qrows: list[dict[str, Any]] = []
    url = corpus.image_shard(name)
    tar_path = _stage_path(url)
    try:
        rows, items, repeated = _read_pass(task, name, cfg, tar_path, qrows)
        found = index.existing_keys(corpus, [r["key"] for r in rows])
        existing = {k: s for k, s in found.items() if s != name}
        rows = [r for r in rows if r["key"] not in existing]
        split_of = _record_splits(corpus, name, rows, items)
        _publish_staged(tar_path, url, set(existing))
    finally:
        if os.path.exists(tar_path):
            os.unlink(tar_path)
    quarantine.write(corpus, name, qrows)
    for r in rows:
        r["split"] = split_of[r["key"]]
    merged = index.append_shard(corpus, name, rows)
    if merged["entry"]:
        dups = merged["duplicates"]
    else:  # merged by an earlier attempt: who holds each key says what this shard won
        owner = index.existing_keys(corpus, [r["key"] for r in rows])
        dups = {k: s for k, s in owner.items() if s != name}
    won = [items[r["key"]]["record"] for r in rows
           if r["key"] not in dups and "record" in items[r["key"]]]
    masks = 0
    if won:
        writer = RoundWriter(corpus, 0, "imported")
        masks = writer.write_shard(name, won, {"source_shard": name}) \
            if not writer.shard_done(name) else sum(len(r["annotations"]) for r in won)
    stats = {"shard": name, "chunk": cid, "ok": len(rows) - len(dups),
             "quarantined": len(qrows), "repeated": repeated, "existing_in": _count(existing),
             "duplicates": dups, "masks": masks, "round0_images": len(won),
             "bytes": sum(r["bytes"] for r in rows), "seconds": round(time.time() - t0, 3)}
    done = {**stats, "plan": cid, "keys": [r["key"] for r in rows], "rows": rows,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not storage.create_json(corpus.image_done(name), done):
        logger.info("%s was already done", name)
    storage.create_json(corpus.path("images", "chunks", f"{cid}.done.json"),
                        {k: v for k, v in stats.items() if k != "duplicates"})
    return stats


def _count(existing: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in existing.values():
        out[s] = out.get(s, 0) + 1
    return out

