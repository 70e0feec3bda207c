"""One image shard, written by whoever holds (or finishes) its claim.

:func:`write_one_shard` is the per-shard unit of the sharding stage (a Ray task body; also runs
in-process). A task is the work order stored in the shard's claim
(:mod:`dataengine.pipeline.ingest.shard_claims`), so the owner and anyone finishing a stale claim
write the same shard. The publish steps, in order:

1. the tar is staged locally (never visible under its name yet) while each input is read,
   checked against its key, decoded and converted;
2. the shard's side records are created: its split part (keys whose split is new), its
   quarantine part, its round-0 masks (imported annotations);
3. the tar is created if absent (:meth:`storage.Staged.create`); if another attempt of the same
   claim published it first, this attempt's staging is dropped and the done record is derived
   from the published tar;
4. the done record (stats, keys, index rows, the tar's size and sha256) is created last.

A re-run after a crash at any step finds the published files and finishes from there: a tar
without a done record gets its done record from the tar (:func:`finish_from_tar`), without
decoding anything again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

import pyarrow as pa

from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import quarantine, splits, storage
from dataengine.pipeline.core.coco import annotation_mask
from dataengine.pipeline.core.imagecodec import IMAGE_EXTS
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.masks import area, bbox, encode
from dataengine.pipeline.core.publish import fault
from dataengine.pipeline.core.rounds import RoundWriter
from dataengine.pipeline.core.shards import BytesTarWriter, iter_tar
from dataengine.pipeline.ingest.images import BadImage, ImageConfig, apply_to_mask, process_image

logger = logging.getLogger(__name__)


def content_key(data: bytes) -> tuple[str, str]:
    """(key, sha256 hex) of an image's original bytes."""
    digest = hashlib.sha256(data).hexdigest()
    return digest[:16], digest


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class _HashingWriter:
    """A write-only file that hashes and counts what passes through."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


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
            reason = ("mask is empty in the image (outside it, or too small)" if not raw.any()
                      else "mask vanished when the image was cropped or resized")
            qrows.append(quarantine.record(item["source"], where, f"bad annotation: {reason}",
                                           "annotation", key, shard))
            continue
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


class _ShardBuild:
    """What processing one shard's inputs produced: index rows, quarantine rows, round-0
    records, and the samples for the tar (yielded by :meth:`samples`)."""

    def __init__(self, task: dict[str, Any], icfg: ImageConfig) -> None:
        self.task, self.icfg, self.name = task, icfg, task["shard"]
        self.rows: list[dict[str, Any]] = []
        self.qrows: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []

    def _read(self, it: dict[str, Any]) -> tuple[bytes, str] | None:
        key, uri = it["key"], it["uri"]
        known, local = it.get("known"), storage.plain_local(uri)
        try:
            st = os.stat(local) if known and local is not None else None
            data = storage.read_bytes(uri)
        except Exception as exc:  # noqa: BLE001 - any read failure is data
            self.qrows.append(quarantine.record(it["source"], uri, f"unreadable: {exc}", "read",
                                                key, self.name))
            return None
        if st is not None and [st.st_size, st.st_mtime_ns] == known[1:] and \
                len(data) == known[1]:
            k, sha = known[0][:16], known[0]  # hashed by the driver, file unchanged since
        else:
            k, sha = content_key(data)
        if k != key:
            self.qrows.append(quarantine.record(it["source"], uri, "file changed while sharding",
                                                "read", key, self.name))
            return None
        return data, sha

    def samples(self) -> Iterator[dict[str, Any]]:
        for it in self.task["items"]:
            got = self._read(it)
            if got is None:
                continue
            data, sha = got
            key, uri = it["key"], it["uri"]
            try:
                img = process_image(data, self.icfg)
            except BadImage as exc:
                self.qrows.append(quarantine.record(it["source"], uri, str(exc), "decode", key,
                                                    self.name))
                continue
            meta = {"key": key, "source": it["source"], "uri": uri, "sha256": sha,
                    "width": img.width, "height": img.height, "orig_width": img.orig_width,
                    "orig_height": img.orig_height, "orig_format": img.orig_format,
                    "orig_mode": img.orig_mode, "passthrough": img.passthrough,
                    "bytes": len(img.data), "split": it["split"], **it["meta"]}
            if it["annotations"]:
                anns = _imported_annotations(it, img.geometry, uri, key, self.name, self.qrows)
                if anns:
                    self.records.append({"image": {"image_id": key, "width": img.width,
                                                   "height": img.height, "file_name": uri},
                                         "annotations": anns})
            self.rows.append(index_row(meta, self.name, img.ext))
            yield {"__key__": key, img.ext: img.data,
                   "json": json.dumps(meta, sort_keys=True).encode()}


def index_row(meta: dict[str, Any], shard: str, ext: str) -> dict[str, Any]:
    """The index row of one stored image from its tar metadata."""
    return {"key": meta["key"], "shard": shard, "width": meta["width"],
            "height": meta["height"], "bytes": meta["bytes"], "sha256": meta["sha256"],
            "source": meta["source"], "split": meta["split"], "uri": meta["uri"],
            "orig_width": meta.get("orig_width"), "orig_height": meta.get("orig_height"),
            "format": ext}


def _publish_side_records(corpus: Corpus, task: dict[str, Any], build: _ShardBuild) -> int:
    """The shard's split part, quarantine part and round-0 masks (each created if absent);
    returns the number of round-0 masks."""
    name = task["shard"]
    new_splits = [{"key": it["key"], "split": it["split"], "source": it["source"],
                   "rule": it.get("split_rule", "default"), "time": utc_now()}
                  for it in task["items"] if it.get("split_new")]
    if new_splits:
        url = storage.join(corpus.splits, f"part-{name}.parquet")
        storage.create_bytes(url, _parquet(pa.Table.from_pylist(new_splits,
                                                                schema=splits.SCHEMA)))
    quarantine.write(corpus, name, build.qrows)
    if not build.records:
        return 0
    writer = RoundWriter(corpus, 0, "imported")
    return writer.write_shard(name, build.records, {"source_shard": name})


def _parquet(table: pa.Table) -> bytes:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _done_record(task: dict[str, Any], rows: list[dict[str, Any]], qrows_read: set[str],
                 quarantined: int, masks: int, round0_images: int, tar: dict[str, Any],
                 t0: float) -> dict[str, Any]:
    stats = {"shard": task["shard"], "plan": task["plan"], "ok": len(rows),
             "quarantined": quarantined, "masks": masks, "round0_images": round0_images,
             "bytes": sum(r["bytes"] for r in rows), "seconds": round(time.time() - t0, 3)}
    # Keys that could not be read stay free: a later run that can read them shards them.
    keys = [it["key"] for it in task["items"] if it["key"] not in qrows_read]
    return {**stats, "keys": keys, "rows": rows, "tar": tar, "written_at": utc_now()}


def _stats(done: dict[str, Any]) -> dict[str, Any]:
    return {k: done[k] for k in ("shard", "plan", "ok", "quarantined", "masks",
                                 "round0_images", "bytes", "seconds")}


def write_one_shard(task: dict[str, Any], root: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Write image shard ``task["shard"]`` from its claim's work order; returns its stats.

    ``cfg`` is the run's ShardConfig as a dict; the image settings of the claim
    (``task["image"]``) win, so a finished claim is written as its owner would have.
    """
    t0 = time.time()
    corpus = Corpus(root)
    name = task["shard"]
    done_url = corpus.image_done(name)
    if storage.exists(done_url):
        return {**_stats(storage.read_json(done_url)), "status": "skipped"}
    if storage.exists(corpus.image_shard(name)):
        return finish_from_tar(corpus, task, t0)
    icfg = config_mod.from_dict(ImageConfig, task.get("image") or cfg["image"])
    build = _ShardBuild(task, icfg)
    with storage.Staged(corpus.image_shard(name)) as staged:
        out = _HashingWriter(staged.file)
        with BytesTarWriter(out) as sink:
            for sample in build.samples():
                sink.write(sample)
        masks = _publish_side_records(corpus, task, build)
        fault("shard-parts")
        if not staged.create():
            logger.info("%s was published by another attempt; finishing from it", name)
            return finish_from_tar(corpus, task, t0)
    fault("shard-tar")
    read_failed = {r["key"] for r in build.qrows if r["stage"] == "read"}
    done = _done_record(task, build.rows, read_failed, len(build.qrows), masks,
                        len(build.records), {"bytes": out.size, "sha256": out.sha.hexdigest()},
                        t0)
    if not storage.create_json(done_url, done):
        logger.info("%s was already done", name)
    fault("shard-done")
    return {**_stats(done), "status": "written"}


def read_tar_rows(url: str, shard: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(index rows, {"bytes", "sha256"}) of a published image tar, read back."""
    sha, size = hashlib.sha256(), 0
    with storage.open_read(url) as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
            size += len(chunk)
    rows = []
    for s in iter_tar(url):
        meta = json.loads(s["json"])
        ext = next((e for e in IMAGE_EXTS if e in s), "jpg")
        rows.append(index_row(meta, shard, ext))
    return rows, {"bytes": size, "sha256": sha.hexdigest()}


def finish_from_tar(corpus: Corpus, task: dict[str, Any], t0: float | None = None
                    ) -> dict[str, Any]:
    """The done record of a shard whose tar is published (by a crashed or racing attempt of
    the same claim), derived from the tar and the side records; returns its stats."""
    t0 = time.time() if t0 is None else t0
    name = task["shard"]
    rows, tar = read_tar_rows(corpus.image_shard(name), name)
    qurl = storage.join(corpus.quarantine, f"{name}.parquet")
    qrows = storage.read_table(qurl).to_pylist() if storage.exists(qurl) else []
    masks = images0 = 0
    stats0 = storage.join(corpus.round_dir(0), "done", f"{name}.json")
    if storage.exists(stats0):
        s0 = storage.read_json(stats0)
        masks, images0 = int(s0.get("masks", 0)), int(s0.get("images", 0))
    read_failed = {r["key"] for r in qrows if r.get("stage") == "read"}
    done = _done_record(task, rows, read_failed, len(qrows), masks, images0, tar, t0)
    done["finished_from_tar"] = True
    storage.create_json(corpus.image_done(name), done)
    return {**_stats(done), "status": "written"}
