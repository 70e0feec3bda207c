"""SAM training samples: image shards joined with the annotation shards of the accepted rounds.

:func:`plan_training_data` decides, on the driver, what a SAM training run may read: every complete
round (round 0, the imported ground truth, only with ``train_on_imported``; with
``imported_only_annotated`` only on the images the used rounds worked on, the simulated counterpart
of annotators finishing masks with brush/eraser tools), minus what curation leaves out
(:func:`dataengine.pipeline.core.curation.exclude_for_training`: rejected masks and images,
training images that nearly duplicate held-out ones, near-duplicates unless
``include_near_duplicates``), minus every key whose split in ``ROOT/splits/``
is not ``train`` (held-out keys never reach a trainer; keys without a split are left out too). The
plan is a small JSON-able :class:`TrainingPlan` (rounds, shards, allowed mask ids per shard, counts)
recorded in the model version's ``training.json``.

On a worker, :func:`stream_samples` reads only this worker's shards (``trainer.my_shards``: a
disjoint share per rank), one image shard at a time joined by key with the round shards of the
same basename, and yields :class:`Sample` s (image HxWx3 uint8 + its allowed masks), asserting
that no key outside the plan is ever yielded. :func:`make_batch` resizes images and masks into
the model's padded input frame (SAM's ``ResizeLongestSide`` + ``preprocess``) as a
:class:`dataengine.pipeline.sam.loss.Batch`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dataengine.pipeline.core import curation, rounds, splits, storage
from dataengine.pipeline.core.imagecodec import sample_image
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.masks import decode
from dataengine.pipeline.core.shards import iter_tar

logger = logging.getLogger(__name__)



class HeldOutLeak(AssertionError):
    """A held-out (or otherwise unplanned) key reached a trainer: a bug, never data."""


@dataclass
class DataConfig:
    """Which masks a SAM training run reads."""

    train_on_imported: bool = False    # round 0 (imported ground truth) is training data
    imported_only_annotated: bool = False   # ... only on images the used rounds >= 1 covered
    rounds: list[int] | None = None    # None = every complete round
    stages: list[str] | None = None    # None = every stage
    min_area: int = 0                  # stored-frame px; smaller masks are skipped
    skip_crowd: bool = True            # imported COCO crowd regions are not objects
    include_near_duplicates: bool = False   # train on images flagged as near-duplicates too

    def __post_init__(self) -> None:
        if self.min_area < 0:
            raise ValueError(f"min_area={self.min_area}: must be >= 0")
        if self.rounds is not None and any(int(r) < 0 for r in self.rounds):
            raise ValueError(f"rounds={self.rounds}: round numbers are >= 0")


@dataclass
class TrainingPlan:
    """What one training run reads: rounds, shards and the mask ids allowed per shard."""

    rounds: list[int]
    shards: list[str]
    masks: dict[str, list[str]]              # shard -> allowed mask ids
    keys: dict[str, list[str]]               # shard -> image keys with allowed masks
    mask_counts: dict[str, int]              # round-NNNN -> masks used
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def n_masks(self) -> int:
        return sum(len(v) for v in self.masks.values())

    @property
    def n_images(self) -> int:
        return sum(len(v) for v in self.keys.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingPlan:
        return cls(**d)

    def summary(self) -> dict[str, Any]:
        """Rounds, counts and exclusions without the per-mask lists."""
        return {"rounds": self.rounds, "shards": self.shards, "images": self.n_images,
                "masks": self.n_masks, "mask_counts": self.mask_counts,
                "excluded": self.excluded}


def train_rounds(corpus: Corpus, cfg: DataConfig) -> list[int]:
    """Complete rounds to train on (round 0 only with ``train_on_imported``)."""
    done = rounds.complete_rounds(corpus)
    if cfg.rounds is not None:
        missing = sorted(set(int(r) for r in cfg.rounds) - set(done))
        if missing:
            raise ValueError(f"rounds={cfg.rounds}: round(s) {missing} are not complete")
        done = sorted(int(r) for r in cfg.rounds)
    return [r for r in done if r != 0 or cfg.train_on_imported]


def plan_training_data(corpus: Corpus, cfg: DataConfig | None = None) -> TrainingPlan:
    """The masks a training run may read (see the module docstring)."""
    cfg = cfg or DataConfig()
    used = train_rounds(corpus, cfg)
    table = rounds.load_manifest(corpus, used)
    excluded = {"holdout_or_unsplit": 0, "curation": 0, "stage": 0, "small": 0}
    n0 = table.num_rows
    if cfg.stages is not None and table.num_rows:
        stages = pa.array(list(cfg.stages), "string")
        table = table.filter(pc.is_in(table["stage"], value_set=stages))
        excluded["stage"] = n0 - table.num_rows
    if cfg.train_on_imported and cfg.imported_only_annotated and table.num_rows:
        covered = set(table.filter(pc.not_equal(table["round"], 0))["key"].to_pylist())
        for r in used:  # images a round worked on (even those whose masks were discarded)
            info = rounds.round_info(corpus, r) if r else None
            covered.update(((info or {}).get("config") or {}).get("keys") or [])
        covered = pa.array(sorted(covered), pa.string())
        keep = pc.or_(pc.not_equal(table["round"], 0), pc.is_in(table["key"], value_set=covered))
        excluded["imported_not_annotated"] = table.num_rows - int(pc.sum(keep).as_py() or 0)
        table = table.filter(keep)
    table, counts = curation.exclude_for_training(
        corpus, table, include_near_duplicates=cfg.include_near_duplicates)
    excluded.update(counts)
    split_map = splits.load_map(corpus)
    keys = table.column("key").to_pylist()
    train_mask = [split_map.get(k) == "train" for k in keys]
    n2 = table.num_rows
    table = table.filter(pa.array(train_mask, "bool"))
    excluded["holdout_or_unsplit"] = n2 - table.num_rows
    if cfg.min_area:
        n3 = table.num_rows
        table = table.filter(pc.greater_equal(table["area"], cfg.min_area))
        excluded["small"] = n3 - table.num_rows
    masks: dict[str, list[str]] = {}
    keys_by_shard: dict[str, dict[str, None]] = {}
    counts: dict[str, int] = {}
    for mid, key, shard, rnd in zip(table.column("mask_id").to_pylist(),
                                    table.column("key").to_pylist(),
                                    table.column("shard").to_pylist(),
                                    table.column("round").to_pylist(), strict=True):
        masks.setdefault(shard, []).append(mid)
        keys_by_shard.setdefault(shard, {})[key] = None  # ordered set
        name = f"round-{int(rnd):04d}"
        counts[name] = counts.get(name, 0) + 1
    plan = TrainingPlan(rounds=used, shards=sorted(masks), masks=masks,
                        keys={s: list(k) for s, k in keys_by_shard.items()},
                        mask_counts=dict(sorted(counts.items())), excluded=excluded)
    for shard, ks in plan.keys.items():
        leaked = [k for k in ks if split_map.get(k) != "train"]
        if leaked:
            raise HeldOutLeak(f"training plan holds non-train keys {leaked[:5]} in {shard}")
    logger.info("training data: rounds %s, %d shards, %d images, %d masks (excluded %s)",
                used, len(plan.shards), plan.n_images, plan.n_masks, excluded)
    return plan


# ---- worker side ---------------------------------------------------------------------------

@dataclass
class Sample:
    """One training image: ``image`` HxWx3 uint8 RGB (stored frame) and its masks (HxW bool)."""

    key: str
    shard: str
    image: np.ndarray
    masks: list[np.ndarray]
    mask_ids: list[str]


def plan_with_masks(corpus: Corpus, cfg: DataConfig, command: str) -> TrainingPlan:
    """:func:`plan_training_data`, or a ValueError naming ``command`` when it holds no masks."""
    plan = plan_training_data(corpus, cfg)
    if plan.n_masks == 0:
        raise ValueError(f"{command}: no training masks in {corpus.root}: complete rounds "
                         f"{plan.rounds} (train_on_imported={cfg.train_on_imported}); "
                         f"excluded {plan.excluded}")
    return plan


def shard_samples(corpus: Corpus, plan: TrainingPlan, shard: str,
                  skip_crowd: bool = True) -> Iterator[Sample]:
    """The planned samples of one image shard, joined with its round shards by key."""
    allowed = set(plan.masks.get(shard, ()))
    planned_keys = set(plan.keys.get(shard, ()))
    if not allowed:
        return
    anns: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for rnd in plan.rounds:
        name = f"round-{rnd:04d}"
        for rec in rounds.iter_round_shard(corpus, rnd, shard):
            key = rec["image"]["image_id"]
            for ann in rec["annotations"]:
                mid = f"{name}/{key}/{int(ann['id'])}"
                if mid in allowed and not (skip_crowd and ann.get("iscrowd")):
                    anns.setdefault(key, []).append((mid, ann))
    for raw in iter_tar(corpus.image_shard(shard)):
        key = raw["__key__"]
        if key not in anns:
            continue
        if key not in planned_keys:
            raise HeldOutLeak(f"key {key} of {shard} is not in the training plan")
        try:
            image = sample_image(raw)
        except Exception as exc:  # noqa: BLE001 - a bad image is skipped and logged
            logger.error("training data: %s/%s unreadable: %s", shard, key, exc)
            continue
        masks, ids = [], []
        for mid, ann in anns[key]:
            m = decode(ann["segmentation"])
            if m.shape != image.shape[:2]:
                logger.error("training data: mask %s is %s, image %s; skipped", mid, m.shape,
                             image.shape[:2])
                continue
            masks.append(m.astype(bool))
            ids.append(mid)
        if masks:
            yield Sample(key, shard, image, masks, ids)


def stream_samples(corpus: Corpus, plan: TrainingPlan, shards: list[str], *, seed: int = 0,
                   repeat: bool = True, shuffle_buffer: int = 64,
                   skip_crowd: bool = True, on_read: Any = None) -> Iterator[Sample]:
    """Samples of ``shards`` (this worker's share), shards shuffled per epoch, a shuffle buffer
    over samples; endless when ``repeat``. ``on_read(sample)`` is called for every sample."""
    if not shards:
        raise ValueError("stream_samples: no shards to read")
    rng = random.Random(seed)
    epoch = 0
    buf: list[Sample] = []
    while True:
        order = list(shards)
        rng.shuffle(order)
        for shard in order:
            for s in shard_samples(corpus, plan, shard, skip_crowd):
                if on_read is not None:
                    on_read(s)
                buf.append(s)
                if len(buf) >= shuffle_buffer:
                    yield buf.pop(rng.randrange(len(buf)))
        epoch += 1
        if not repeat:
            break
    rng.shuffle(buf)
    yield from buf


def resize_longest(image: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> resized so the longest side is ``size`` (SAM's ``ResizeLongestSide``)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    return ResizeLongestSide(size).apply_image(image)


def make_batch(samples: list[Sample], image_size: int, pixel_mean: tuple[float, ...],
               pixel_std: tuple[float, ...], masks_per_image: int, *,
               min_area: int = 0, rng: random.Random | None = None, square: bool = False):
    """Samples -> :class:`dataengine.pipeline.sam.loss.Batch` in the padded ``image_size`` frame
    (``square``: SAM 2's frame, images and masks resized to ``image_size`` x ``image_size``).

    Up to ``masks_per_image`` masks per image (random choice); masks smaller than ``min_area``
    px in the model frame are dropped.
    """
    import cv2
    import torch

    from dataengine.pipeline.sam.loss import Batch

    rng = rng or random.Random(0)
    b = len(samples)
    s = image_size
    images = torch.zeros(b, 3, s, s)
    masks = torch.zeros(b, masks_per_image, s, s, dtype=torch.bool)
    valid = torch.zeros(b, masks_per_image, dtype=torch.bool)
    sizes = torch.zeros(b, 2, dtype=torch.long)
    mean = torch.tensor(pixel_mean).view(3, 1, 1)
    std = torch.tensor(pixel_std).view(3, 1, 1)
    for i, smp in enumerate(samples):
        if square:
            from dataengine.models.sam2 import SquareResize

            img = SquareResize(s).apply_image(smp.image)
        else:
            img = resize_longest(smp.image, s)
        h, w = img.shape[:2]
        sizes[i] = torch.tensor([h, w])
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
        images[i, :, :h, :w] = (t - mean) / std
        order = list(range(len(smp.masks)))
        rng.shuffle(order)
        j = 0
        for k in order:
            if j >= masks_per_image:
                break
            m = cv2.resize(smp.masks[k].astype(np.uint8), (w, h),
                           interpolation=cv2.INTER_NEAREST).astype(bool)
            if m.sum() < max(min_area, 1):
                continue
            masks[i, j, :h, :w] = torch.from_numpy(m)
            valid[i, j] = True
            j += 1
    return Batch(images, masks, valid, sizes)


def batches(stream: Iterator[Sample], batch_size: int, **kw: Any):
    """Endless :class:`Batch` es of ``batch_size`` images from a sample stream."""
    rng = random.Random(kw.pop("seed", 0))
    while True:
        group = []
        for s in stream:
            group.append(s)
            if len(group) == batch_size:
                break
        if not group:
            return
        yield make_batch(group, rng=rng, **kw), [s.key for s in group]




def write_read_log(url: str, rank: int, keys: set[str], shards: set[str],
                   extra: dict[str, Any] | None = None) -> None:
    """Record which keys and shards one worker read, and ``extra`` (e.g. its node and final
    weights digest), in ``<run>/read/rank-K.json``."""
    storage.write_json(storage.join(url, "read", f"rank-{rank}.json"),
                       {"rank": rank, "keys": sorted(keys), "shards": sorted(shards),
                        **(extra or {})})


def my_shard_share(shards: list[str], rank: int, world_size: int) -> list[str]:
    """This worker's disjoint shards (:func:`dataengine.pipeline.core.trainer.my_shards`); with
    more workers than shards a worker without one borrows ``shards[rank % n]`` (logged) so DDP
    steps stay equal."""
    from dataengine.pipeline.core.trainer import my_shards

    mine = my_shards(shards, rank, world_size)
    if not mine and shards:
        mine = [shards[rank % len(shards)]]
        logger.warning("rank %d has no shard of its own; re-reading %s", rank, mine[0])
    return mine
