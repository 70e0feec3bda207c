"""``dataengine eval-sam``: held-out metrics of a SAM version, always beside the no-model reference.

Interactive segmentation with the simulated clicker (:mod:`dataengine.pipeline.sam.clicker`, RITM
protocol, 20-click cap): mIoU after 1, 3, 5 clicks and NoC (clicks to IoU 0.5 / 0.75 / 0.85 / 0.9),
on the held-out split of ``ROOT/splits/`` against its round-0 ground truth, or on a COCO JSON
(``gt``). Every report also gives the same clicker on the no-model reference (discs painted at the
clicks, :class:`dataengine.pipeline.sam.clicker.DiscSegmenter`), whose radius is tuned on
training-split ground truth, so a model that only learned to paint is visible as such. Automatic
generation (:mod:`dataengine.pipeline.sam.amg`): ground-truth recall at IoU 0.5 / 0.75 and masks per
image.

Results are written once per (version, protocol) to ``ROOT/models/sam/vNNNN/eval-<id>.json``
(top-level ``miou1``, ``noc90``... of the model; ``nomodel`` and ``amg`` sections) and reused.
The pure functions (:func:`interactive_metrics`, :func:`evaluate_model`,
:func:`tune_disc_radius`, :func:`load_objects`) take models and ground truth in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import rounds, splits, storage
from dataengine.pipeline.core.imagecodec import decode_image
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.masks import decode
from dataengine.pipeline.core.shards import iter_tar
from dataengine.pipeline.sam.clicker import (ClickerConfig, DiscSegmenter, SamSegmenter,
                                             clicks_to_iou, iou_at, run_clicker)

logger = logging.getLogger(__name__)

DEFAULT_RADII = (3.0, 5.0, 7.0, 10.0, 14.0, 20.0, 28.0, 40.0)


@dataclass
class EvalSamConfig:
    """The evaluation protocol (``dataengine eval-sam``)."""

    model: str | None = None            # vNNNN (default: the current promoted version)
    gt: str | None = None               # COCO instances JSON instead of held-out round 0
    split: str = "holdout"
    max_clicks: int = 20
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.85, 0.9])
    at_clicks: list[int] = field(default_factory=lambda: [1, 3, 5])
    min_area_256: int = 1024            # objects smaller than 32x32 px at 256 px are skipped
    skip_crowd: bool = True
    max_images: int = 0                 # 0 = all
    max_objects_per_image: int = 0      # 0 = all
    disc_radius: float | None = None    # clicks painted into the mask prompt (None = as trained)
    paint_first: bool | None = None     # ... the first click too (None = as trained)
    reference_radius: float | None = None   # no-model disc radius (None = tuned on train GT)
    tune_objects: int = 60              # training objects used to tune the reference radius
    amg: bool = True                    # automatic-generation recall
    amg_points_per_side: int = 16
    amg_pred_iou_thresh: float = 0.88
    amg_stability_score_thresh: float = 0.95
    amg_box_nms_thresh: float = 0.7
    amg_min_mask_region_area: int = 0
    reuse: bool = True                  # reuse a stored result of the same protocol

    def __post_init__(self) -> None:
        if self.max_clicks < 1:
            raise ValueError(f"max_clicks={self.max_clicks}: must be >= 1")
        if not self.thresholds or any(not 0 < t <= 1 for t in self.thresholds):
            raise ValueError(f"thresholds={self.thresholds}: values in (0, 1]")
        if any(k < 1 or k > self.max_clicks for k in self.at_clicks):
            raise ValueError(f"at_clicks={self.at_clicks}: values in [1, max_clicks]")
        if self.split not in splits.SPLITS:
            raise ValueError(f"split={self.split!r}: one of {splits.SPLITS}")
        if self.amg_points_per_side < 1:
            raise ValueError(f"amg_points_per_side={self.amg_points_per_side}: must be >= 1")

    def protocol(self) -> dict[str, Any]:
        d = config_mod.to_dict(self)
        for k in ("model", "reuse"):
            d.pop(k)
        return d

    def protocol_id(self) -> str:
        return hashlib.sha256(json.dumps(self.protocol(), sort_keys=True).encode()
                              ).hexdigest()[:12]


@dataclass
class EvalImage:
    """One ground-truth image: ``image`` HxWx3 uint8 RGB and its object masks (HxW bool)."""

    key: str
    image: np.ndarray
    masks: list[np.ndarray]


# ---- ground truth --------------------------------------------------------------------------

def _keep(mask: np.ndarray, min_area_256: int) -> bool:
    h, w = mask.shape
    scale = (256.0 / max(h, w)) ** 2
    return mask.sum() * scale >= min_area_256


def load_objects(corpus: Corpus, split: str = "holdout", *, min_area_256: int = 1024,
                 skip_crowd: bool = True, max_images: int = 0, max_objects_per_image: int = 0,
                 keys: Iterable[str] | None = None) -> list[EvalImage]:
    """Round-0 ground truth of the images of ``split`` (only ``keys`` when given), in key
    order within shard order."""
    if not rounds.is_complete(corpus, 0):
        raise ValueError(f"{corpus.root} has no complete round 0 (imported ground truth); "
                         f"give a COCO JSON with gt=...")
    split_map = splits.load_map(corpus)
    only = None if keys is None else set(keys)
    table = rounds.read_round_manifest(corpus, 0)
    wanted: dict[str, set[str]] = {}
    for key, shard in zip(table.column("key").to_pylist(), table.column("shard").to_pylist(),
                          strict=True):
        if split_map.get(key) == split and (only is None or key in only):
            wanted.setdefault(shard, set()).add(key)
    out: list[EvalImage] = []
    for shard in sorted(wanted):
        gts: dict[str, list[np.ndarray]] = {}
        for rec in rounds.iter_round_shard(corpus, 0, shard):
            key = rec["image"]["image_id"]
            if key not in wanted[shard]:
                continue
            ms = []
            for ann in rec["annotations"]:
                if skip_crowd and ann.get("iscrowd"):
                    continue
                m = decode(ann["segmentation"])
                if _keep(m, min_area_256):
                    ms.append(m)
            if max_objects_per_image:
                ms = sorted(ms, key=lambda m: -int(m.sum()))[:max_objects_per_image]
            if ms:
                gts[key] = ms
        for raw in iter_tar(corpus.image_shard(shard)):
            key = raw["__key__"]
            if key in gts:
                payload = next(raw[e] for e in ("jpg", "jpeg", "png", "webp") if e in raw)
                out.append(EvalImage(key, decode_image(payload), gts[key]))
                if max_images and len(out) >= max_images:
                    return out
    return out


def load_coco_objects(instances_json: str, *, min_area_256: int = 1024, skip_crowd: bool = True,
                      max_images: int = 0, max_objects_per_image: int = 0) -> list[EvalImage]:
    """Ground truth from a COCO instances JSON and its image folder."""
    from dataengine.pipeline.core.coco import annotation_mask, coco_image_dir, load_coco

    images, anns, _ = load_coco(instances_json)
    image_dir = coco_image_dir(instances_json)
    out: list[EvalImage] = []
    for fname in sorted(images):
        objs = [a for a in anns.get(fname) or [] if not (skip_crowd and a.get("iscrowd"))]
        if not objs:
            continue
        url = storage.join(image_dir, fname)
        if not storage.exists(url):
            logger.warning("eval: %s is missing; skipped", url)
            continue
        image = decode_image(storage.read_bytes(url))
        h, w = image.shape[:2]
        ms = [m for m in (annotation_mask(a, h, w) for a in objs) if _keep(m, min_area_256)]
        if max_objects_per_image:
            ms = sorted(ms, key=lambda m: -int(m.sum()))[:max_objects_per_image]
        if ms:
            out.append(EvalImage(fname, image, ms))
        if max_images and len(out) >= max_images:
            break
    return out


# ---- metrics -------------------------------------------------------------------------------

def summarize(sessions: Sequence[Sequence[float]], thresholds: Sequence[float],
              at_clicks: Sequence[int], max_clicks: int) -> dict[str, float]:
    """Per-object IoU curves -> ``miouK`` and ``nocNN`` (e.g. ``miou1``, ``noc50``)."""
    out: dict[str, float] = {"objects": len(sessions)}
    if not sessions:
        return out
    for k in at_clicks:
        out[f"miou{k}"] = float(np.mean([iou_at(s, k) for s in sessions]))
    out[f"miou{max_clicks}"] = float(np.mean([iou_at(s, max_clicks) for s in sessions]))
    for t in thresholds:
        out[f"noc{int(round(t * 100))}"] = float(np.mean([clicks_to_iou(s, t, max_clicks)
                                                          for s in sessions]))
    return out


def interactive_metrics(segmenter: Any, images: Sequence[EvalImage], *, max_clicks: int = 20,
                        thresholds: Sequence[float] = (0.5, 0.75, 0.85, 0.9),
                        at_clicks: Sequence[int] = (1, 3, 5),
                        blank: bool = False) -> dict[str, float]:
    """The clicker on every object of ``images`` with ``segmenter``; ``blank`` feeds a grey
    image instead of the real one (the same clicks: does the model look at the image?)."""
    target = max(thresholds)
    sessions = []
    for img in images:
        pixels = np.full_like(img.image, 128) if blank else img.image
        segmenter.set_image(pixels, None if blank else img.key)
        for gt in img.masks:
            res = run_clicker(segmenter, gt, ClickerConfig(target_iou=target,
                                                           max_clicks=max_clicks))
            sessions.append(res.ious)
    return summarize(sessions, thresholds, at_clicks, max_clicks)


def tune_disc_radius(images: Sequence[EvalImage], radii: Sequence[float] = DEFAULT_RADII, *,
                     max_clicks: int = 20) -> tuple[float, dict[float, float]]:
    """The no-model disc radius (px at 256) minimising mean NoC@0.5 + NoC@0.75 on ``images``
    (training-split ground truth). Returns ``(best radius, {radius: score})``."""
    scores = {}
    for r in radii:
        m = interactive_metrics(DiscSegmenter(r), images, max_clicks=max_clicks,
                                thresholds=(0.5, 0.75), at_clicks=(1,))
        scores[float(r)] = (m["noc50"] + m["noc75"]) / 2 if m.get("objects") else 0.0
    best = min(scores, key=lambda r: (scores[r], r))
    return best, scores


def amg_metrics(model: Any, images: Sequence[EvalImage], cfg: EvalSamConfig,
                disc_radius: float = 0.0) -> dict[str, float]:
    """Automatic generation vs ground truth: recall at IoU 0.5 / 0.75, masks per image.
    ``disc_radius``: grid points painted into the mask prompt as the model was trained."""
    from dataengine.pipeline.core.masks import encode, iou_matrix
    from dataengine.pipeline.sam.amg import AmgConfig, MaskGenerator

    gen = MaskGenerator(model, AmgConfig(
        points_per_side=cfg.amg_points_per_side, pred_iou_thresh=cfg.amg_pred_iou_thresh,
        stability_score_thresh=cfg.amg_stability_score_thresh,
        box_nms_thresh=cfg.amg_box_nms_thresh, min_mask_region_area=cfg.amg_min_mask_region_area,
        disc_radius=disc_radius))
    hit50 = hit75 = n_gt = n_masks = 0
    for img in images:
        dets = [d["segmentation"] for d in gen.generate(img.image)]
        gts = [encode(m) for m in img.masks]
        n_masks += len(dets)
        n_gt += len(gts)
        if dets:
            best = iou_matrix(dets, gts).max(0)
            hit50 += int((best >= 0.5).sum())
            hit75 += int((best >= 0.75).sum())
    return {"recall50": hit50 / max(n_gt, 1), "recall75": hit75 / max(n_gt, 1),
            "masks_per_image": n_masks / max(len(images), 1), "images": len(images),
            "objects": n_gt}


def evaluate_model(model: Any, images: Sequence[EvalImage], cfg: EvalSamConfig | None = None, *,
                   disc_radius: float = 0.0, reference_radius: float | None = 10.0,
                   amg: bool | None = None, progress: Callable[[str], None] | None = None,
                   paint_first: bool = True) -> dict[str, Any]:
    """Interactive (+ automatic) metrics of ``model`` and of the no-model reference. Clicks
    are prompted as the model was trained (``disc_radius``, ``paint_first``: see
    :class:`dataengine.pipeline.sam.clicker.SamSegmenter`); the automatic generator's grid points as
    a first
    click."""
    cfg = cfg or EvalSamConfig()
    t0 = time.time()
    seg = SamSegmenter(model, disc_radius=disc_radius, paint_first=paint_first)
    out: dict[str, Any] = interactive_metrics(seg, images, max_clicks=cfg.max_clicks,
                                              thresholds=cfg.thresholds, at_clicks=cfg.at_clicks)
    out["seconds_interactive"] = round(time.time() - t0, 1)
    if progress:
        progress("interactive")
    if reference_radius is not None:
        ref = interactive_metrics(DiscSegmenter(reference_radius), images,
                                  max_clicks=cfg.max_clicks, thresholds=cfg.thresholds,
                                  at_clicks=cfg.at_clicks)
        out["nomodel"] = {**ref, "radius": reference_radius}
    if cfg.amg if amg is None else amg:
        t1 = time.time()
        grid_disc = disc_radius if paint_first else 0.0
        out["amg"] = {**amg_metrics(model, images, cfg, grid_disc),
                      "seconds": round(time.time() - t1, 1), "disc_radius": grid_disc}
        if progress:
            progress("amg")
    out["images"] = len(images)
    out["disc_radius"] = disc_radius
    out["paint_first"] = paint_first
    return out


# ---- the stage -----------------------------------------------------------------------------

def _trained_recipe(corpus: Corpus, version: str) -> dict[str, Any]:
    url = storage.join(corpus.model_dir("sam", version), "training.json")
    if not storage.exists(url):
        return {}
    return (storage.read_json(url).get("config") or {}).get("recipe") or {}


def trained_disc_radius(corpus: Corpus, version: str) -> float:
    """The click-disc radius a version was trained with (0 when it was not trained to paint)."""
    recipe = _trained_recipe(corpus, version)
    return float(recipe.get("click_radius", 0.0)) if recipe.get("paint_clicks") else 0.0


def trained_paint_first(corpus: Corpus, version: str) -> bool:
    """Whether a version was trained with the first click painted (in most steps)."""
    from dataengine.pipeline.sam.loss import RecipeConfig

    saved = _trained_recipe(corpus, version)
    return RecipeConfig(**{k: v for k, v in saved.items() if k in RecipeConfig.names()}
                        ).paints_first


def reference_radius(corpus: Corpus, cfg: EvalSamConfig) -> tuple[float, dict[str, Any]]:
    """The no-model radius: given, or tuned on training-split ground truth (cached in
    ``ROOT/models/sam/reference/``), or 10 when there is none."""
    if cfg.reference_radius is not None:
        return float(cfg.reference_radius), {"tuned": False}
    blob = json.dumps({"min_area_256": cfg.min_area_256, "n": cfg.tune_objects,
                       "max_clicks": cfg.max_clicks, "radii": DEFAULT_RADII}, sort_keys=True)
    url = corpus.path("models", "sam", "reference",
                      f"radius-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.json")
    if storage.exists(url):
        d = storage.read_json(url)
        return float(d["radius"]), d
    try:
        train = load_objects(corpus, "train", min_area_256=cfg.min_area_256,
                             skip_crowd=cfg.skip_crowd)
    except ValueError:
        train = []
    picked, n = [], 0
    for img in train:  # the first tune_objects objects, image by image
        if n >= cfg.tune_objects:
            break
        ms = img.masks[: cfg.tune_objects - n]
        picked.append(EvalImage(img.key, img.image, ms))
        n += len(ms)
    if not picked:
        return 10.0, {"tuned": False, "reason": "no training ground truth"}
    best, scores = tune_disc_radius(picked, max_clicks=cfg.max_clicks)
    d = {"radius": best, "tuned": True, "objects": n,
         "scores": {str(k): v for k, v in scores.items()}}
    storage.write_json(url, d)
    return best, d


def eval_images(corpus: Corpus, cfg: EvalSamConfig) -> list[EvalImage]:
    """The objects ``cfg`` evaluates on: ``cfg.gt``'s, else round 0's on ``cfg.split``."""
    if cfg.gt:
        images = load_coco_objects(cfg.gt, min_area_256=cfg.min_area_256,
                                   skip_crowd=cfg.skip_crowd, max_images=cfg.max_images,
                                   max_objects_per_image=cfg.max_objects_per_image)
    else:
        images = load_objects(corpus, cfg.split, min_area_256=cfg.min_area_256,
                              skip_crowd=cfg.skip_crowd, max_images=cfg.max_images,
                              max_objects_per_image=cfg.max_objects_per_image)
    if not images:
        raise ValueError(f"no ground-truth objects to evaluate on ({cfg.gt or cfg.split})")
    return images


def evaluate(root: str, config: EvalSamConfig | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate SAM version ``config.model`` (default: current) on the held-out ground truth;
    writes ``eval-<protocol id>.json`` in the version directory and returns it."""
    from dataengine.pipeline.core.checkpoints import load_sam
    from dataengine.pipeline.core.promotion import current_version

    cfg = config or EvalSamConfig()
    corpus = Corpus(root)
    root = corpus.root
    version = cfg.model or current_version(corpus)
    if version is None:
        versions = corpus.model_versions("sam")
        if not versions:
            raise ValueError(f"{root} has no SAM version to evaluate")
        version = versions[-1]
    vdir = corpus.model_dir("sam", version)
    if not storage.exists(storage.join(vdir, "version.json")):
        raise FileNotFoundError(f"SAM {version} is not published in {root}")
    pid = cfg.protocol_id()
    url = storage.join(vdir, f"eval-{pid}.json")
    if cfg.reuse and storage.exists(url):
        return storage.read_json(url)
    t0 = time.time()
    images = eval_images(corpus, cfg)
    radius, ref_info = reference_radius(corpus, cfg)
    disc = cfg.disc_radius if cfg.disc_radius is not None else trained_disc_radius(corpus,
                                                                                   version)
    first = cfg.paint_first if cfg.paint_first is not None else trained_paint_first(corpus,
                                                                                    version)
    model = load_sam(vdir)
    out = evaluate_model(model, images, cfg, disc_radius=disc, reference_radius=radius,
                         progress=progress, paint_first=first)
    out["nomodel"]["tuning"] = ref_info
    out.update({"version": version, "protocol_id": pid, "protocol": cfg.protocol(),
                "gt": cfg.gt or f"round-0000/{cfg.split}", "seconds": round(time.time() - t0, 1),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    storage.write_json(url, out)
    logger.info("eval %s: mIoU@1 %.3f NoC@50 %.2f NoC@90 %.2f | no model: mIoU@1 %.3f NoC@50 "
                "%.2f", version, out["miou1"], out["noc50"], out["noc90"],
                out["nomodel"]["miou1"], out["nomodel"]["noc50"])
    return out


def eval_table(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, model, no model) rows for printing."""
    rows = []
    ref = result.get("nomodel", {})
    for k in sorted(k for k in result if k.startswith(("miou", "noc")) and
                    isinstance(result[k], float)):
        rows.append((k, f"{result[k]:.3f}", f"{ref[k]:.3f}" if k in ref else "-"))
    for k, v in (result.get("amg") or {}).items():
        rows.append((f"amg_{k}", f"{v:.3f}" if isinstance(v, float) else str(v), "-"))
    return rows
