"""Automatic-generation thresholds for one model, chosen on training-split ground truth.

SAM's thresholds (predicted IoU 0.88 and stability 0.95; 0.92 and 0.97 for the semi stage's
pre-fill) were set for its ViT models. A small model's IoU head and logits live on other scales,
so the semi and automatic stages can choose theirs from the model's own masks on training images:

1. every grid point's mask is generated once with the filters off (:func:`collect`) and scored
   against the image's ground truth;
2. each pair of thresholds on a grid of the candidates' score quantiles is replayed the way the
   generator applies it: both filters, then box NMS, then the area cap (:func:`replay`);
3. the semi stage's pre-fill takes the pair with the most masks per image whose precision at
   IoU 0.5 is at least ``semi_min_precision``; the automatic stage the pair with the highest
   recall at IoU 0.5 whose precision is at least ``auto_min_precision`` (:func:`choose`). When no
   pair reaches the floor, the most precise pair is reported with ``reached: False`` (the engine
   then keeps the configured thresholds).

Held-out images are never used: the caller passes training-split images only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dataengine.pipeline.core import masks as mask_utils
from dataengine.pipeline.sam.amg import AmgConfig, MaskGenerator

logger = logging.getLogger(__name__)


@dataclass
class TuneAmgConfig:
    """Threshold tuning of the semi and automatic stages (``EngineConfig.tune_amg``)."""

    enabled: bool = True
    max_images: int = 24               # training images with ground truth to tune on
    points_per_side: int = 16          # grid of the candidate pass (the stages keep theirs)
    grid: int = 10                     # quantiles of each score tried as a threshold
    semi_min_precision: float = 0.5    # pre-fill: share of masks at IoU >= 0.5 to an object
    auto_min_precision: float = 0.3

    def __post_init__(self) -> None:
        if self.max_images < 1:
            raise ValueError(f"max_images={self.max_images}: must be >= 1")
        if self.points_per_side < 1:
            raise ValueError(f"points_per_side={self.points_per_side}: must be >= 1")
        if self.grid < 2:
            raise ValueError(f"grid={self.grid}: must be >= 2")
        for name in ("semi_min_precision", "auto_min_precision"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1]")


@dataclass
class Candidate:
    """One grid point's mask with its scores and its best match among the image's objects."""

    image: int
    predicted_iou: float
    stability: float
    box: tuple[float, float, float, float]   # x0, y0, x1, y1
    area: int
    best_iou: float
    best_object: int


def unfiltered(amg: AmgConfig, points_per_side: int) -> AmgConfig:
    """``amg``'s prompts on a ``points_per_side`` grid with the filters, NMS and area cap off."""
    return dataclasses.replace(
        amg, points_per_side=points_per_side, pred_iou_thresh=0.0, stability_score_thresh=0.0,
        low_res_margin=0.0, box_nms_thresh=1.0, max_area_fraction=1.0, min_mask_region_area=0)


def collect(model: Any, images: Sequence[Any], amg: AmgConfig) -> list[Candidate]:
    """Every mask ``amg`` generates on ``images`` (objects with ``.image`` and ``.masks``), each
    matched to the image's objects; give it an :func:`unfiltered` config."""
    gen = MaskGenerator(model, amg)
    out: list[Candidate] = []
    for i, img in enumerate(images):
        dets = gen.generate(img.image)
        if not dets:
            continue
        ious = mask_utils.iou_matrix([d["segmentation"] for d in dets],
                                     [mask_utils.encode(m) for m in img.masks])
        for d, row in zip(dets, ious, strict=True):
            x, y, w, h = d["bbox"]
            out.append(Candidate(i, d["predicted_iou"], d["stability_score"], (x, y, x + w, y + h),
                                 d["area"], float(row.max()), int(row.argmax())))
    return out


def replay(cands: Sequence[Candidate], pred_iou: float, stability: float, amg: AmgConfig,
           n_images: int, n_objects: int, image_areas: Sequence[int]) -> dict[str, float]:
    """What the generator would keep at these thresholds: masks per image, precision and
    recall at IoU 0.5."""
    pred_iou, stability = round(float(pred_iou), 4), round(float(stability), 4)
    kept: list[Candidate] = []
    by_image: dict[int, list[Candidate]] = {}
    for c in cands:   # the generator's comparisons: IoU strictly above, stability at least
        if (pred_iou <= 0 or c.predicted_iou > pred_iou) and c.stability >= stability:
            by_image.setdefault(c.image, []).append(c)
    for i, cs in by_image.items():
        keep = mask_utils.box_nms(np.array([c.box for c in cs], dtype=np.float64),
                                  np.array([c.predicted_iou for c in cs]), amg.box_nms_thresh)
        cap = amg.max_area_fraction * image_areas[i]
        kept.extend(cs[k] for k in keep if amg.max_area_fraction >= 1.0 or cs[k].area <= cap)
    good = [c for c in kept if c.best_iou >= 0.5]
    found = {(c.image, c.best_object) for c in good}
    return {"pred_iou_thresh": pred_iou, "stability_score_thresh": stability,
            "masks_per_image": len(kept) / max(n_images, 1),
            "precision50": len(good) / len(kept) if kept else 0.0,
            "recall50": len(found) / max(n_objects, 1)}


def sweep(cands: Sequence[Candidate], amg: AmgConfig, n_images: int, n_objects: int,
          image_areas: Sequence[int], grid: int) -> list[dict[str, float]]:
    """:func:`replay` over a grid of quantiles of the candidates' two scores."""
    if not cands:
        return []
    qs = np.linspace(0.0, 1.0, grid, endpoint=False)
    # thresholds are in [0, 1]; a random model's IoU head can predict below 0
    ious = np.unique(np.clip(np.quantile([c.predicted_iou for c in cands], qs), 0.0, 1.0))
    stabs = np.unique(np.clip(np.quantile([c.stability for c in cands], qs), 0.0, 1.0))
    return [replay(cands, t_iou, t_stab, amg, n_images, n_objects, image_areas)
            for t_iou in ious for t_stab in stabs]


def choose(table: Sequence[dict[str, float]], min_precision: float, objective: str
           ) -> dict[str, Any]:
    """The row maximising ``objective`` among rows with masks and ``precision50 >=
    min_precision``; else the most precise row, marked ``reached: False``."""
    rows = [r for r in table if r["masks_per_image"] > 0]
    if not rows:
        return {"reached": False}
    ok = [r for r in rows if r["precision50"] >= min_precision]
    if ok:
        best = max(ok, key=lambda r: (r[objective], r["precision50"]))
        return {**best, "reached": True}
    return {**max(rows, key=lambda r: (r["precision50"], r[objective])), "reached": False}


def tune(model: Any, images: Sequence[Any], semi_amg: AmgConfig, auto_amg: AmgConfig,
         cfg: TuneAmgConfig | None = None) -> dict[str, Any]:
    """Thresholds for the semi stage's pre-fill and the automatic stage, chosen on ``images``
    (training split, with ground truth); see the module docstring."""
    cfg = cfg or TuneAmgConfig()
    images = list(images)[:cfg.max_images]
    n_objects = sum(len(img.masks) for img in images)
    areas = [int(img.image.shape[0] * img.image.shape[1]) for img in images]
    out: dict[str, Any] = {"images": len(images), "objects": n_objects,
                           "points_per_side": cfg.points_per_side}
    collected: dict[str, list[Candidate]] = {}
    for stage, amg, floor, objective in (
            ("semi", semi_amg, cfg.semi_min_precision, "masks_per_image"),
            ("auto", auto_amg, cfg.auto_min_precision, "recall50")):
        prompts = unfiltered(amg, cfg.points_per_side)
        if repr(prompts) not in collected:   # both stages usually prompt alike
            collected[repr(prompts)] = collect(model, images, prompts)
        cands = collected[repr(prompts)]
        table = sweep(cands, amg, len(images), n_objects, areas, cfg.grid)
        pick = choose(table, floor, objective)
        everything = replay(cands, 0.0, 0.0, amg, len(images), n_objects, areas)
        out[stage] = {"min_precision": floor, "objective": objective, "candidates": len(cands),
                      "unfiltered": everything, **pick}
        logger.info("amg thresholds for %s: %s", stage, out[stage])
    return out
