"""Annotation rounds on disk: SA-1B per-image JSON shards, per-mask manifests, metrics.

A round lives in ``ROOT/annotations/round-NNNN/``::

    round.json                 the round's claim, created once when the round starts (stage,
                               model version, owner, config): :func:`claim_round`
    shard-NNNNNN.tar           one per image shard worked on: ``__key__`` + ``json`` (SA-1B schema)
    done/shard-NNNNNN.json     per-shard stats: per-image seconds, clicks, failures with reasons
    manifest/shard-NNNNNN.parquet   one row per mask of that shard; created last, so its
                                    presence marks the shard done (resume unit)
    manifest.parquet           all masks of the round (derived from manifest/, published atomically)
    metrics.json               written last: its presence means the round is complete

A round has one owner (``round.json``'s ``owner``): ``annotate`` (the annotate stage and the
engine), ``people`` (the dashboard's people rounds, with their state under ``people/``),
``import`` (``import-coco``) or ``shard`` (round 0). A writer never resumes a round another
kind of owner started (:class:`RoundOwnedError`). Every per-shard file is created if absent; of
two writers of one shard the first tar wins and the other's manifest part is derived from it.

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

from dataengine.pipeline.core import publish, storage
from dataengine.pipeline.core.layout import STAGES, Corpus, round_name
from dataengine.pipeline.core.shards import create_tar, iter_tar

logger = logging.getLogger(__name__)

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
    """The next unused round number (round 0 is reserved for imports); to take it without a
    race, use :func:`claim_round`."""
    return max([0, *corpus.rounds()]) + 1


OWNERS = ("annotate", "people", "import", "shard")


class RoundOwnedError(ValueError):
    """A writer tried to resume a round that another kind of writer owns."""


def _owner_of(number: int, config: dict[str, Any]) -> str:
    if number == 0:
        return "shard"
    if config.get("people"):
        return "people"
    if "imported_from" in config:
        return "import"
    return "annotate"


def round_owner(corpus: Corpus, number: int) -> str | None:
    """Who owns a round (:data:`OWNERS`), or None when it was never started."""
    info = round_info(corpus, number)
    if info is None:
        return None
    if info.get("owner"):
        return info["owner"]
    if storage.exists(storage.join(corpus.round_dir(number), "people", "queue.json")):
        return "people"
    return _owner_of(number, info.get("config") or {})


def claim_round(corpus: Corpus, stage: str, model_version: str = "", *, owner: str = "annotate",
                config: dict[str, Any] | None = None) -> int:
    """Start a new round at the first free number (>= 1) and return it: ``round.json`` is
    created if absent, so two writers starting rounds at once get different numbers."""
    if owner not in OWNERS:
        raise ValueError(f"owner {owner!r} is not one of {OWNERS}")
    info = {"stage": stage, "model_version": model_version, "owner": owner,
            "config": config or {}, "started": publish.Owner.current().to_dict()}
    number = next_round(corpus)
    while not storage.create_json(storage.join(corpus.round_dir(number), "round.json"),
                                  {"round": number, **info}):
        number += 1  # another writer took it first
    logger.info("round %d started (%s, %s, owner %s)", number, stage, model_version, owner)
    return number


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
    :meth:`shard_done`, so a crashed round resumes per shard without duplicates. ``owner``
    (default: from the number and the config) must match the round's owner to resume it.
    """

    corpus: Corpus
    number: int
    stage: str
    model_version: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    owner: str = ""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r} is not one of {STAGES}")
        self.owner = self.owner or _owner_of(self.number, self.config)
        if self.owner not in OWNERS:
            raise ValueError(f"owner {self.owner!r} is not one of {OWNERS}")
        self.dir = self.corpus.round_dir(self.number)

    def begin(self) -> None:
        """Create ``round.json`` if absent; a round that exists must have been started by the
        same kind of owner with the same stage and model (else RoundOwnedError / ValueError)."""
        url = storage.join(self.dir, "round.json")
        info = {"round": self.number, "stage": self.stage, "model_version": self.model_version,
                "owner": self.owner, "config": self.config}
        if not storage.exists(url) and is_complete(self.corpus, self.number):
            raise FileExistsError(f"round {self.number} is complete and append-only")
        if storage.create_json(url, info):
            return
        old = storage.read_json(url)
        owner = round_owner(self.corpus, self.number)
        if owner != self.owner:
            hint = (" (it is open for people in the dashboard; they finish it there)"
                    if owner == "people" else "")
            raise RoundOwnedError(f"round {self.number} is a {owner} round{hint}; a {self.owner} "
                                  f"writer never resumes it: choose another round")
        if old.get("stage") != self.stage or old.get("model_version") != self.model_version:
            raise ValueError(f"{url} was started as stage={old.get('stage')} "
                             f"model={old.get('model_version')}; cannot resume it as "
                             f"stage={self.stage} model={self.model_version}")

    def shard_done(self, shard: str) -> bool:
        return storage.exists(self._manifest_part(shard))

    def _manifest_part(self, shard: str) -> str:
        return storage.join(self.dir, "manifest", f"{shard}.parquet")

    def write_shard(self, shard: str, records: list[dict[str, Any]],
                    stats: dict[str, Any] | None = None) -> int:
        """Publish one shard's per-image records (in the image shard's key order).

        Returns the number of masks of the published shard. Creates the tar, then the per-shard
        stats, then the manifest part (the done marker), each only if absent: when the tar was
        published first by another writer (or a crashed attempt), the stats and manifest are
        derived from that tar and these ``records`` are dropped.
        """
        if self.shard_done(shard):
            return storage.read_table(self._manifest_part(shard)).num_rows
        for rec in records:
            validate_record(rec)
        created, _ = create_tar(storage.join(self.dir, f"{shard}.tar"),
                                ({"__key__": r["image"]["image_id"], "json": r}
                                 for r in records))
        if not created:
            logger.info("round %d: %s was published by another writer; deriving its manifest",
                        self.number, shard)
            return self.complete_shard(shard)
        publish.fault("round-tar")
        return self._publish_parts(shard, records, stats or {})

    def complete_shard(self, shard: str) -> int:
        """Publish the stats and manifest part of a shard whose tar exists (a crash or a race
        left it without them), derived from the tar; returns its masks."""
        records = list(iter_round_shard(self.corpus, self.number, shard))
        return self._publish_parts(shard, records, {"derived_from_tar": True})

    def _publish_parts(self, shard: str, records: list[dict[str, Any]],
                       stats: dict[str, Any]) -> int:
        rows = [manifest_row(rec, ann, shard) for rec in records for ann in rec["annotations"]]
        storage.create_json(storage.join(self.dir, "done", f"{shard}.json"),
                            {**stats, "shard": shard, "images": len(records),
                             "masks": len(rows)})
        table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
        try:
            storage.write_table(self._manifest_part(shard), table, overwrite=False)
        except FileExistsError:
            return storage.read_table(self._manifest_part(shard)).num_rows
        return len(rows)

    def unfinished_shards(self) -> list[str]:
        """Shards whose tar is published but whose manifest part is not (a crash between)."""
        tars = {u.rsplit("/", 1)[-1][:-4] for u in storage.listdir(self.dir, r"shard-\d+\.tar")}
        return sorted(s for s in tars if not self.shard_done(s))

    def shard_stats(self) -> list[dict[str, Any]]:
        """The per-shard stats records written so far."""
        return [storage.read_json(u)
                for u in storage.listdir(storage.join(self.dir, "done"), r"shard-\d+\.json")]

    def finish(self, metrics: dict[str, Any], *, republish: bool = False) -> pa.Table:
        """Aggregate the manifest, then publish ``metrics.json`` (round complete).

        ``metrics.json`` is created once; ``republish`` replaces it (round 0, which grows).
        """
        table = read_round_manifest(self.corpus, self.number)
        storage.write_table(storage.join(self.dir, "manifest.parquet"), table)
        publish.fault("round-manifest")
        record = {"round": self.number, "stage": self.stage,
                  "model_version": self.model_version, **metrics}
        url = storage.join(self.dir, "metrics.json")
        if republish:
            storage.write_json(url, record)
        elif not storage.create_json(url, record):
            logger.info("round %d was already complete", self.number)
        return table


def read_round_manifest(corpus: Corpus, number: int, *, skip_unreadable: bool = False
                        ) -> pa.Table:
    """All mask rows of one round from its per-shard manifest parts.

    An unreadable part raises :class:`storage.UnreadableFile` naming it (training must not go
    on without masks it was meant to see); ``skip_unreadable`` leaves it out with a logged count.
    """
    parts = storage.listdir(storage.join(corpus.round_dir(number), "manifest"),
                            r"shard-\d+\.parquet")
    if not parts:
        return MANIFEST_SCHEMA.empty_table()
    return storage.read_tables(parts, skip_unreadable=skip_unreadable).cast(MANIFEST_SCHEMA)


def load_manifest(corpus: Corpus, rounds: Iterable[int] | None = None, *,
                  skip_unreadable: bool = False) -> pa.Table:
    """Mask rows of the given rounds (default: every complete round), one table; unreadable
    parts as in :func:`read_round_manifest`."""
    numbers = complete_rounds(corpus) if rounds is None else list(rounds)
    tables = [read_round_manifest(corpus, n, skip_unreadable=skip_unreadable) for n in numbers]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()


def iter_round_shard(corpus: Corpus, number: int, shard: str) -> Iterator[dict[str, Any]]:
    """Per-image records of one round shard, in key order."""
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
