"""Annotation rounds on disk: SA-1B per-image JSON shards, per-mask manifests, metrics.

A round lives in ``ROOT/annotations/round-NNNN/``::

    round.json                 written once when the round starts (stage, model version, config)
    shard-NNNNNN.tar           one per image shard worked on: ``__key__`` + ``json`` (SA-1B schema)
    manifest/shard-NNNNNN.parquet   one row per mask of that shard; written after the tar, so its
                                    presence marks the shard done (resume unit)
    manifest/compact-NNNNNN.parquet the parts' rows without ``rle``, sorted by key (compaction:
                                    :mod:`dataengine.pipeline.core.partitioned`)
    done/shard-NNNNNN.json     per-shard stats: per-image seconds, clicks, failures with reasons
    metrics.json               written last: its presence means the round is complete

The manifest of a round is the partitioned dataset ``manifest/``: readers project columns and push
filters down (:func:`read_round_manifest`, :func:`iter_manifest`); asking for ``rle`` reads the
per-shard parts, anything else reads the compacts and the parts they do not cover yet.

The per-image JSON follows SA-1B (``image`` + ``annotations`` with ``segmentation`` RLE, ``bbox``,
``area``, ``predicted_iou``, ``stability_score``, ``point_coords``, ``crop_box``), extended with
provenance on every annotation: ``stage``, ``round``, ``model_version``, ``clicks``
(``[{"x", "y", "label"}]``), ``annotator``, ``seconds``, ``category_id``/``category`` when known.
Masks are in the stored image's frame.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import STAGES, Corpus, round_name
from dataengine.pipeline.core.partitioned import PartitionedDataset

logger = logging.getLogger(__name__)

PART_ROW_GROUP = 4096  # one image's masks are a row group or two of its shard's part

MANIFEST_SCHEMA = pa.schema([
    ("mask_id", pa.string()),          # "round-NNNN/<key>/<ann id>", unique in the corpus
    ("key", pa.string()),
    ("shard", pa.string()),
    ("round", pa.int32()),
    ("stage", pa.string()),            # imported | manual | semi | auto
    ("model_version", pa.string()),
    ("annotator", pa.string()),
    ("ann_id", pa.int32()),
    ("category_id", pa.int32()),       # -1 when unknown
    ("category", pa.string()),
    ("area", pa.int64()),
    ("bbox_x", pa.float32()),
    ("bbox_y", pa.float32()),
    ("bbox_w", pa.float32()),
    ("bbox_h", pa.float32()),
    ("predicted_iou", pa.float32()),
    ("stability_score", pa.float32()),
    ("n_clicks", pa.int32()),
    ("seconds", pa.float32()),
    ("prefilled", pa.bool_()),         # semi stage: pre-filled by the model, not clicked
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("rle", pa.string()),              # compressed COCO RLE counts (size = height x width)
])


def round_info(corpus: Corpus, number: int) -> dict[str, Any] | None:
    """The ``round.json`` of a round, or None when it was never started."""
    url = storage.join(corpus.round_dir(number), "round.json")
    return storage.read_json(url) if storage.exists(url) else None


def is_complete(corpus: Corpus, number: int) -> bool:
    """A round is complete once its ``metrics.json`` is published."""
    return storage.exists(storage.join(corpus.round_dir(number), "metrics.json"))


def round_metrics(corpus: Corpus, number: int) -> dict[str, Any]:
    """The ``metrics.json`` of a complete round ({} while it is not complete)."""
    url = storage.join(corpus.round_dir(number), "metrics.json")
    return storage.read_json(url) if storage.exists(url) else {}


def complete_rounds(corpus: Corpus, *, include_imported: bool = True) -> list[int]:
    """Numbers of complete rounds, oldest first (round 0 holds imported ground truth)."""
    out = [n for n in corpus.rounds() if is_complete(corpus, n)]
    return [n for n in out if include_imported or n != 0]


def next_round(corpus: Corpus) -> int:
    """The next unused round number (round 0 is reserved for imports)."""
    return max([0, *corpus.rounds()]) + 1


def manifest_row(record: dict[str, Any], ann: dict[str, Any], shard: str) -> dict[str, Any]:
    """One manifest row for annotation ``ann`` of per-image ``record``."""
    img = record["image"]
    key = img["image_id"]
    x, y, w, h = ann["bbox"]
    return {
        "mask_id": f"{round_name(int(ann['round']))}/{key}/{int(ann['id'])}",
        "key": key, "shard": shard, "round": int(ann["round"]), "stage": ann["stage"],
        "model_version": ann.get("model_version") or "", "annotator": ann.get("annotator") or "",
        "ann_id": int(ann["id"]),
        "category_id": int(ann["category_id"]) if ann.get("category_id") is not None else -1,
        "category": ann.get("category") or "",
        "area": int(ann["area"]), "bbox_x": x, "bbox_y": y, "bbox_w": w, "bbox_h": h,
        "predicted_iou": float(ann.get("predicted_iou") or 0.0),
        "stability_score": float(ann.get("stability_score") or 0.0),
        "n_clicks": len(ann.get("clicks") or []), "seconds": float(ann.get("seconds") or 0.0),
        "prefilled": bool(ann.get("prefilled", False)),
        "height": int(ann["segmentation"]["size"][0]), "width": int(ann["segmentation"]["size"][1]),
        "rle": ann["segmentation"]["counts"],
    }


def validate_record(record: dict[str, Any]) -> None:
    """Raise ValueError when a per-image record is not valid SA-1B + provenance JSON."""
    if "image" not in record or "annotations" not in record:
        raise ValueError("record needs 'image' and 'annotations'")
    img = record["image"]
    for k in ("image_id", "width", "height"):
        if k not in img:
            raise ValueError(f"record image info lacks {k!r}")
    for ann in record["annotations"]:
        for k in ("id", "segmentation", "bbox", "area", "stage", "round"):
            if k not in ann:
                raise ValueError(f"annotation {ann.get('id')} of {img['image_id']} lacks {k!r}")
        if ann["stage"] not in STAGES:
            raise ValueError(f"annotation stage {ann['stage']!r} is not one of {STAGES}")
        size = ann["segmentation"]["size"]
        if [int(size[0]), int(size[1])] != [int(img["height"]), int(img["width"])]:
            raise ValueError(f"mask size {size} is not the image's {img['height']}x{img['width']}")


@dataclass
class RoundWriter:
    """Writes one round: ``begin`` once, ``write_shard`` per image shard, ``finish`` at the end.

    Shards already written (their manifest part exists) are skipped by callers through
    :meth:`shard_done`, so a crashed round resumes per shard without duplicates.
    """

    corpus: Corpus
    number: int
    stage: str
    model_version: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r} is not one of {STAGES}")
        self.dir = self.corpus.round_dir(self.number)

    def begin(self) -> None:
        """Publish ``round.json`` (once); a resumed round must match what was started."""
        url = storage.join(self.dir, "round.json")
        info = {"round": self.number, "stage": self.stage, "model_version": self.model_version,
                "config": self.config}
        if storage.exists(url):
            old = storage.read_json(url)
            if old.get("stage") != self.stage or old.get("model_version") != self.model_version:
                raise ValueError(f"{url} was started as stage={old.get('stage')} "
                                 f"model={old.get('model_version')}; cannot resume it as "
                                 f"stage={self.stage} model={self.model_version}")
            return
        if is_complete(self.corpus, self.number):
            raise FileExistsError(f"round {self.number} is complete and append-only")
        storage.write_json(url, info)

    def shard_done(self, shard: str) -> bool:
        return storage.exists(storage.join(self.dir, "manifest", f"{shard}.parquet"))

    def write_shard(self, shard: str, records: list[dict[str, Any]],
                    stats: dict[str, Any] | None = None) -> int:
        """Publish one shard's per-image records (in the image shard's key order).

        Returns the number of masks written. Writes the tar, then the per-shard stats, then the
        manifest part (the done marker).
        """
        from dataengine.pipeline.core.shards import write_tar  # webdataset: torch, ~0.5 GB

        rows = []
        for rec in records:
            validate_record(rec)
            rows.extend(manifest_row(rec, ann, shard) for ann in rec["annotations"])
        write_tar(storage.join(self.dir, f"{shard}.tar"),
                  ({"__key__": r["image"]["image_id"], "json": r} for r in records))
        storage.write_json(storage.join(self.dir, "done", f"{shard}.json"),
                           {"shard": shard, "images": len(records), "masks": len(rows),
                            **(stats or {})})
        table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
        manifest_dataset(self.corpus, self.number).write_part(shard, table,
                                                              row_group_size=PART_ROW_GROUP)
        return len(rows)

    def shard_stats(self) -> list[dict[str, Any]]:
        """The per-shard stats records written so far."""
        return [storage.read_json(u)
                for u in storage.listdir(storage.join(self.dir, "done"), r"shard-\d+\.json")]

    def finish(self, metrics: dict[str, Any], fanout: int = 1) -> None:
        """Compact the manifest (size-tiered, when ``fanout`` parts are uncovered), then publish
        ``metrics.json`` (round complete)."""
        manifest_dataset(self.corpus, self.number).compact(fanout=fanout)
        storage.write_json(storage.join(self.dir, "metrics.json"),
                           {"round": self.number, "stage": self.stage,
                            "model_version": self.model_version, **metrics})


def manifest_dataset(corpus: Corpus, number: int) -> PartitionedDataset:
    """The partitioned manifest of one round (parts per shard, compacts without ``rle``)."""
    return PartitionedDataset(storage.join(corpus.round_dir(number), "manifest"),
                              MANIFEST_SCHEMA, part_pattern=r"shard-\d+", sort_by="key",
                              heavy=("rle",))


def read_round_manifest(corpus: Corpus, number: int, columns: list[str] | None = None,
                        filter: pads.Expression | None = None) -> pa.Table:
    """Mask rows of one round (optionally only ``columns``, only rows matching ``filter``)."""
    return manifest_dataset(corpus, number).table(columns, filter)


def load_manifest(corpus: Corpus, rounds: Iterable[int] | None = None,
                  columns: list[str] | None = None,
                  filter: pads.Expression | None = None) -> pa.Table:
    """Mask rows of the given rounds (default: every complete round), one table."""
    numbers = complete_rounds(corpus) if rounds is None else list(rounds)
    tables = [read_round_manifest(corpus, n, columns, filter) for n in numbers]
    tables = [t for t in tables if t.num_rows]
    if tables:
        return pa.concat_tables(tables)
    schema = MANIFEST_SCHEMA if columns is None else \
        pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
    return schema.empty_table()


def iter_manifest(corpus: Corpus, rounds: Iterable[int] | None = None,
                  columns: list[str] | None = None, filter: pads.Expression | None = None,
                  batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
    """Mask rows of the given rounds (default: every complete round) as record batches, so a
    reader of a corpus-sized manifest never holds it whole."""
    numbers = complete_rounds(corpus) if rounds is None else list(rounds)
    for n in numbers:
        yield from manifest_dataset(corpus, n).batches(columns, filter, batch_size)


def update_metrics(corpus: Corpus, number: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Re-publish a growing round's ``metrics.json`` (round 0) from the previous one plus the
    stats of the shards it did not count yet: O(new shards), not O(round)."""
    url = storage.join(corpus.round_dir(number), "metrics.json")
    prev = storage.read_json(url) if storage.exists(url) else {}
    counted = set(prev.get("counted_shards", []))
    images, masks = int(prev.get("images", 0)), int(prev.get("masks", 0))
    for shard in sorted(set(round_shards(corpus, number)) - counted):
        stats = storage.read_json(storage.join(corpus.round_dir(number), "done", f"{shard}.json"))
        images += int(stats.get("images", 0))
        masks += int(stats.get("masks", 0))
        counted.add(shard)
    info = round_info(corpus, number) or {}
    metrics = {**prev, **extra, "round": number, "stage": info.get("stage", "imported"),
               "model_version": info.get("model_version", ""), "images": images,
               "masks": masks, "shards": len(counted), "counted_shards": sorted(counted)}
    manifest_dataset(corpus, number).compact()
    storage.write_json(url, metrics)
    return metrics


def iter_round_shard(corpus: Corpus, number: int, shard: str) -> Iterator[dict[str, Any]]:
    """Per-image records of one round shard, in key order."""
    from dataengine.pipeline.core.shards import iter_tar

    url = corpus.round_shard(number, shard)
    if not storage.exists(url):
        return
    for sample in iter_tar(url):
        yield json.loads(sample["json"])


def round_shards(corpus: Corpus, number: int) -> list[str]:
    """Basenames of the shards a round has finished."""
    return [u.rsplit("/", 1)[-1][: -len(".parquet")]
            for u in storage.listdir(storage.join(corpus.round_dir(number), "manifest"),
                                     r"shard-\d+\.parquet")]
