"""One streamed chunk of inputs -> one image shard (a Ray task body; also runs in-process).

The work order is the chunk's claim (:mod:`dataengine.pipeline.ingest.stream`): its inputs'
URIs, sources, metadata and imported annotations, not their keys (nobody read them yet). The
publish steps of :func:`write_chunk`, in order (the protocol of
:mod:`dataengine.pipeline.core.publish`: numbers claimed, data files created if absent, the done
record last):

1. **one pass** over the inputs: read, hash (key = sha256[:16]), decode, check, convert; each
   image is appended to a tar staged locally (never visible under its name);
2. **merge** the shard's rows into the index (:func:`dataengine.pipeline.core.index.append_shard`,
   one entry created if absent): this is where exact duplicates are resolved. Keys an earlier
   entry holds (an indexed image, or one another task read at the same time and merged first)
   are left out; the entry is this shard's claim on the rest;
3. the side records of the keys it won: its split part, quarantine part, round-0 masks;
4. the tar, **filtered to the keys it won**, is created if absent (an image is stored once);
5. the done record (stats, keys, index rows, the tar's size and sha256, ``duplicates``), then
   the chunk's done marker.

A re-run after a crash finishes from what was published: a merged entry is reused (its keys are
the shard's), a published tar is read back instead of written again, side records and the done
record are created only if absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import index, quarantine, splits, storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.publish import fault
from dataengine.pipeline.core.rounds import RoundWriter
from dataengine.pipeline.core.shards import BytesTarWriter, iter_tar
from dataengine.pipeline.ingest.images import BadImage, ImageConfig, process_image
from dataengine.pipeline.ingest.shard_writer import (content_key, imported_annotations, index_row,
                                                     read_tar_rows, utc_now)
from dataengine.pipeline.ingest.sources import Item, matches

logger = logging.getLogger(__name__)


class _Pass:
    """The one pass over a chunk's inputs: index rows, round-0 records and quarantine rows, with
    the images appended to a local tar (when ``tar_path`` is given)."""

    def __init__(self, task: dict[str, Any], cfg: dict[str, Any]) -> None:
        self.task, self.name = task, task["shard"]
        self.icfg = config_mod.from_dict(ImageConfig, task.get("image") or cfg["image"])
        self.holdout = float(cfg.get("holdout") or 0.0)
        self.holdout_sources = list(cfg.get("holdout_sources") or [])
        self.rows: list[dict[str, Any]] = []
        self.records: dict[str, dict[str, Any]] = {}
        self.split_rules: dict[str, tuple[str, str]] = {}
        self.qrows: list[dict[str, Any]] = []
        self.repeated = 0

    def run(self, out: Any | None) -> None:
        """Read every input once; images go to the tar file ``out`` (None: not written)."""
        sink = BytesTarWriter(out) if out is not None else None
        seen: set[str] = set()
        for it in self.task["items"]:
            sample = self._one(it, seen)
            if sample is not None and sink is not None:
                sink.write(sample)
        if sink is not None:
            sink.close()

    def _one(self, it: dict[str, Any], seen: set[str]) -> dict[str, Any] | None:
        uri = it["uri"]
        try:
            data = storage.read_bytes(uri)
        except Exception as exc:  # noqa: BLE001 - any read failure is data
            self.qrows.append(quarantine.record(it["source"], uri, f"unreadable: {exc}", "read",
                                                "", self.name))
            return None
        key, sha = content_key(data)
        if key in seen:
            self.repeated += 1  # the same bytes twice in one chunk: stored once
            return None
        seen.add(key)
        try:
            img = process_image(data, self.icfg)
        except BadImage as exc:
            self.qrows.append(quarantine.record(it["source"], uri, str(exc), "decode", key,
                                                self.name))
            return None
        held = any(matches(Item(uri, it["source"]), h) for h in self.holdout_sources)
        split, rule = splits.decide(key, held, self.holdout)
        self.split_rules[key] = (split, rule)
        meta = {"key": key, "source": it["source"], "uri": uri, "sha256": sha,
                "width": img.width, "height": img.height, "orig_width": img.orig_width,
                "orig_height": img.orig_height, "orig_format": img.orig_format,
                "orig_mode": img.orig_mode, "passthrough": img.passthrough,
                "bytes": len(img.data), "split": split, **it["meta"]}
        if it.get("annotations"):
            anns = imported_annotations(it, img.geometry, uri, key, self.name, self.qrows)
            if anns:
                self.records[key] = {"image": {"image_id": key, "width": img.width,
                                               "height": img.height, "file_name": uri},
                                     "annotations": anns}
        self.rows.append(index_row(meta, self.name, img.ext))
        return {"__key__": key, img.ext: img.data,
                "json": json.dumps(meta, sort_keys=True).encode()}


def _copy_kept(path: str, out: Any, keep: set[str]) -> None:
    """Write the samples of ``keep`` of the local tar ``path`` to the file ``out``."""
    with BytesTarWriter(out) as sink:
        for s in iter_tar(path):
            if s["__key__"] in keep:
                sink.write({k: v for k, v in s.items() if not k.startswith("__")}
                           | {"__key__": s["__key__"]})


def _publish_tar(staged: storage.Staged, url: str, keep: set[str] | None) -> bool:
    """Create the tar at ``url`` if absent, with only the samples of ``keep`` (all: None);
    False when another attempt published it first."""
    if keep is None:
        return staged.create()
    staged.file.close()
    with storage.Staged(url) as kept:
        _copy_kept(staged.path, kept.file, keep)
        created = kept.create()
        kept.file.close()
        os.replace(kept.path, staged.path)  # the facts are taken from staged.path
    return created


def _file_facts(path: str) -> dict[str, Any]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": sha.hexdigest()}


def _merge(corpus: Corpus, name: str, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Merge the shard into the index; returns ``{key: other shard}`` of the keys it lost."""
    merged = index.append_shard(corpus, name, rows)
    if merged["entry"]:
        return merged["duplicates"]
    # merged by an earlier attempt: who holds each key says what this shard won
    owner = index.existing_keys(corpus, [r["key"] for r in rows])
    return {k: s for k, s in owner.items() if s != name}


def _side_records(corpus: Corpus, name: str, won: list[dict[str, Any]], build: _Pass) -> int:
    """Split part (keys without a split yet), quarantine part, round-0 masks; each created if
    absent. Returns the shard's round-0 masks."""
    known = splits.lookup(corpus, [r["key"] for r in won])
    rules = {r["key"]: build.split_rules.get(r["key"], (r["split"], "default")) for r in won}
    new = [(r["key"], rules[r["key"]][0], r["source"], rules[r["key"]][1])
           for r in won if r["key"] not in known]
    for r in won:
        r["split"] = known.get(r["key"], r["split"])
    splits.record(corpus, name, new, known)
    quarantine.write(corpus, name, build.qrows)
    records = [build.records[r["key"]] for r in won if r["key"] in build.records]
    if not records:
        return 0
    return RoundWriter(corpus, 0, "imported").write_shard(name, records, {"source_shard": name})


def write_chunk(task: dict[str, Any], root: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Write the image shard of one chunk claim; returns its stats (``status`` written or
    skipped). See the module docstring for the steps."""
    t0 = time.time()
    corpus = Corpus(root)
    name = task["shard"]
    if storage.exists(corpus.image_done(name)):
        done = storage.read_json(corpus.image_done(name))
        return {**_stats(done), "status": "skipped"}
    url = corpus.image_shard(name)
    published = storage.exists(url)
    build = _Pass(task, cfg)
    with storage.Staged(url) as staged:  # a staging name verify --repair knows
        if published and not any(it.get("annotations") for it in task["items"]):
            build.rows, _ = read_tar_rows(url, name)  # no decode: everything is in the tar
        else:
            build.run(None if published else staged.file)
        dups = _merge(corpus, name, build.rows)
        fault("shard-index")
        won = [r for r in build.rows if r["key"] not in dups]
        masks = _side_records(corpus, name, won, build)
        fault("shard-parts")
        if not published:
            published = not _publish_tar(staged, url, {r["key"] for r in won} if dups else None)
            tar = _file_facts(staged.path)
    if published:  # the published tar is the truth (the same inputs, maybe another attempt)
        split_of = {r["key"]: r["split"] for r in won}
        won, tar = read_tar_rows(url, name)
        won = [{**r, "split": split_of.get(r["key"], r["split"])} for r in won]
    fault("shard-tar")
    done = _done_record(task, won, dups, build, masks, tar, t0)
    if not storage.create_json(corpus.image_done(name), done):
        logger.info("%s was already done", name)
    storage.create_json(corpus.path("images", "chunks", f"{task['chunk']}.done.json"),
                        _stats(done))
    fault("shard-done")
    return {**_stats(done), "status": "written"}


def _done_record(task: dict[str, Any], won: list[dict[str, Any]], dups: dict[str, str],
                 build: _Pass, masks: int, tar: dict[str, Any], t0: float) -> dict[str, Any]:
    stats = {"shard": task["shard"], "plan": task["plan"], "chunk": task["chunk"],
             "ok": len(won), "quarantined": len(build.qrows), "repeated": build.repeated,
             "existing_in": _count(dups), "masks": masks,
             "round0_images": sum(1 for r in won if r["key"] in build.records),
             "bytes": sum(r["bytes"] for r in won), "seconds": round(time.time() - t0, 3)}
    return {**stats, "keys": [r["key"] for r in won], "rows": won, "duplicates": dups,
            "tar": tar, "written_at": utc_now()}


def _stats(done: dict[str, Any]) -> dict[str, Any]:
    return {k: done.get(k, 0) for k in ("shard", "plan", "chunk", "ok", "quarantined",
                                        "repeated", "existing_in", "masks", "round0_images",
                                        "bytes", "seconds")}


def _count(dups: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in dups.values():
        out[s] = out.get(s, 0) + 1
    return out
