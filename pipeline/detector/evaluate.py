"""Detector evaluation with pycocotools' ``COCOeval``: box AP, AP50, AR@100 on the held-out split.

Ground truth is the held-out images' round-0 masks (imported COCO / YOLO-seg annotations) turned
into boxes, or any per-image box lists a caller gives. Class-agnostic detectors are scored with
every object in one ``object`` category; per-category detectors with their categories. :func:`gate`
applies the same promotion rule as SAM's (:func:`dataengine.pipeline.core.promotion.decide`: a
version whose held-out AP50 / AR@100 regress is not used) and records the decision append-only under
``ROOT/models/detector/promotions/``; :func:`current_detector` is the version in force.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dataengine.pipeline.core import rounds as rounds_mod
from dataengine.pipeline.core import splits as splits_mod
from dataengine.pipeline.core import storage
from dataengine.pipeline.core.imagecodec import sample_image
from dataengine.pipeline.core.layout import Corpus

logger = logging.getLogger(__name__)


@dataclass
class ImageBoxes:
    """Boxes of one image: ``boxes`` Nx4 COCO ``xywh`` pixels, ``labels`` N category indices,
    ``scores`` N (predictions only)."""

    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None = None
    shard: str = ""


def coco_box_metrics(gt: dict[str, ImageBoxes], preds: dict[str, ImageBoxes],
                     num_labels: int = 1) -> dict[str, float]:
    """``COCOeval`` (bbox) of ``preds`` against ``gt`` (keyed by image key): ``ap`` (AP@[.5:.95]),
    ``ap50``, ``ap75``, ``ar100``, ``images``, ``objects``. Images without predictions count as
    misses; an empty ground truth gives ``-1`` metrics (COCO's convention)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    keys = sorted(gt)
    ids = {k: i + 1 for i, k in enumerate(keys)}
    images, anns = [], []
    for k in keys:
        g = gt[k]
        images.append({"id": ids[k], "width": int(g.width), "height": int(g.height)})
        for b, lab in zip(np.asarray(g.boxes).reshape(-1, 4), np.asarray(g.labels).reshape(-1),
                          strict=True):
            anns.append({"id": len(anns) + 1, "image_id": ids[k], "category_id": int(lab) + 1,
                         "bbox": [float(v) for v in b], "area": float(b[2] * b[3]),
                         "iscrowd": 0})
    cats = [{"id": i + 1, "name": str(i)} for i in range(num_labels)]
    dets = []
    for k, p in preds.items():
        if k not in ids:
            continue
        scores = p.scores if p.scores is not None else np.ones(len(p.boxes))
        for b, lab, s in zip(np.asarray(p.boxes).reshape(-1, 4), np.asarray(p.labels).reshape(-1),
                             np.asarray(scores).reshape(-1), strict=True):
            dets.append({"image_id": ids[k], "category_id": int(lab) + 1,
                         "bbox": [float(v) for v in b], "score": float(s)})
    out = {"images": len(keys), "objects": len(anns)}
    if not anns:
        return {**out, "ap": -1.0, "ap50": -1.0, "ap75": -1.0, "ar100": -1.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": anns, "categories": cats}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets) if dets else COCO()
        if not dets:
            return {**out, "ap": 0.0, "ap50": 0.0, "ap75": 0.0, "ar100": 0.0}
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    return {**out, "ap": float(s[0]), "ap50": float(s[1]), "ap75": float(s[2]),
            "ar100": float(s[8])}


def heldout_ground_truth(corpus: Corpus, categories: list[str] | None = None,
                         max_images: int | None = None) -> dict[str, ImageBoxes]:
    """Boxes of the held-out images' round-0 masks, keyed by image key (class-agnostic unless
    ``categories`` names the classes; objects of other categories are dropped then)."""
    split = splits_mod.load_map(corpus)
    if not rounds_mod.is_complete(corpus, 0) and 0 not in corpus.rounds():
        return {}
    table = rounds_mod.read_round_manifest(corpus, 0)
    columns = ["key", "shard", "category", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "width",
               "height"]
    rows = [r for r in table.select(columns).to_pylist()
            if split.get(r["key"]) == "holdout"]
    cat_index = {c: i for i, c in enumerate(categories)} if categories else None
    out: dict[str, list] = {}
    size: dict[str, tuple[int, int]] = {}
    shards: dict[str, str] = {}
    for r in rows:
        if cat_index is not None and r["category"] not in cat_index:
            continue
        out.setdefault(r["key"], []).append(
            ([r["bbox_x"], r["bbox_y"], r["bbox_w"], r["bbox_h"]],
             cat_index[r["category"]] if cat_index is not None else 0))
        size[r["key"]] = (r["width"], r["height"])
        shards[r["key"]] = r["shard"]
    keys = sorted(out)[:max_images] if max_images else sorted(out)
    return {k: ImageBoxes(size[k][0], size[k][1],
                          np.array([b for b, _ in out[k]], np.float32).reshape(-1, 4),
                          np.array([c for _, c in out[k]], np.int64), shard=shards[k])
            for k in keys}


def iter_images(corpus: Corpus, shard_of: dict[str, str]) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, HxWx3 uint8 RGB)`` for the keys of ``shard_of`` (key -> image shard), reading
    only the shards that hold them."""
    from dataengine.pipeline.core.shards import iter_tar

    for shard in sorted(set(shard_of.values())):
        for sample in iter_tar(corpus.image_shard(shard)):
            if shard_of.get(sample["__key__"]) == shard:
                yield sample["__key__"], sample_image(sample)


def evaluate(model: Any, corpus: Corpus, *, max_images: int | None = None,
             batch_size: int = 4, threshold: float = 0.0) -> dict[str, Any]:
    """Box AP / AP50 / AR@100 of a detector on the held-out split's round-0 ground truth."""
    from dataengine.models.detector import config_of, detect

    cfg = config_of(model)
    cats = list(cfg.categories) if cfg.num_labels > 1 else None
    gt = heldout_ground_truth(corpus, cats, max_images)
    preds: dict[str, ImageBoxes] = {}
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        outs = detect(model, [im for _, im in batch], threshold=threshold)
        for (k, im), o in zip(batch, outs, strict=True):
            b = o["boxes"]
            xywh = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1) \
                if len(b) else np.zeros((0, 4), np.float32)
            preds[k] = ImageBoxes(im.shape[1], im.shape[0], xywh, o["labels"], o["scores"])
        batch.clear()

    for key, image in iter_images(corpus, {k: g.shard for k, g in gt.items()}):
        batch.append((key, image))
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return coco_box_metrics(gt, preds, cfg.num_labels)


DEFAULT_GATE = {"metrics": {"ap50": "max", "ar100": "max"},
                "tolerance": {"ap50": 0.0, "ar100": 0.0}}


def gate_config(**overrides: Any):
    """SAM's :class:`pipeline.core.promotion.GateConfig` on the detector's held-out metrics
    (AP50 and AR@100 must not regress by default)."""
    from dataengine.pipeline.core.promotion import GateConfig

    return GateConfig(**{**DEFAULT_GATE, **overrides})


def _promotions_dir(corpus: Corpus) -> str:
    return corpus.path("models", "detector", "promotions")


def decisions(corpus: Corpus) -> list[dict[str, Any]]:
    """Every recorded detector promotion decision, oldest first."""
    return [storage.read_json(u) for u in
            sorted(storage.listdir(_promotions_dir(corpus), r"\d{6}-v\d{4,}\.json"))]


def current_detector(corpus: Corpus | str) -> str | None:
    """The promoted detector version in force (newest positive decision), or None."""
    corpus = corpus if isinstance(corpus, Corpus) else Corpus(str(corpus))
    for d in reversed(decisions(corpus)):
        if d.get("promoted"):
            return d["candidate"]
    return None


def version_metrics(corpus: Corpus, version: str) -> dict[str, Any] | None:
    """The held-out metrics recorded for a detector version (``metrics.json`` → ``heldout``)."""
    url = storage.join(corpus.model_dir("detector", version), "metrics.json")
    return storage.read_json(url).get("heldout") if storage.exists(url) else None


def gate(corpus: Corpus, candidate: str, metrics: dict[str, Any], cfg: Any = None, *,
         who: str = "train-detector", first_min: dict[str, float] | None = None
         ) -> dict[str, Any]:
    """Decide on ``candidate`` with the SAM gate's rule (:func:`pipeline.core.promotion.decide`)
    against the promoted detector (a first version must also reach ``first_min``, e.g.
    ``{"ap50": 0.01}``, so a detector that finds nothing never replaces AMG) and record it
    append-only in
    ``ROOT/models/detector/promotions/`` and ``vNNNN/promotion.json``."""
    import time

    from dataengine.pipeline.core.promotion import decide

    cfg = cfg or gate_config()
    own = storage.join(corpus.model_dir("detector", candidate), "promotion.json")
    if storage.exists(own):
        return storage.read_json(own)
    current = current_detector(corpus)
    current_metrics = version_metrics(corpus, current) if current else None
    verdict = decide({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                     current_metrics, cfg)
    if current is None and all(float(metrics.get(m, -1)) <= 0 for m in cfg.metrics):
        verdict = {"promoted": False, "checks": [],
                   "reason": "first version detects nothing on the held-out split "
                             f"({ {m: metrics.get(m) for m in cfg.metrics} })"}
    low = {m: v for m, v in (first_min or {}).items() if float(metrics.get(m, -1)) < float(v)}
    if current is None and verdict["promoted"] and low:
        verdict = {"promoted": False, "checks": [],
                   "reason": f"first version under the floor {first_min}: "
                             f"{ {m: metrics.get(m) for m in low} }"}
    seq = len(decisions(corpus)) + 1
    rec = {"seq": seq, "candidate": candidate, "current": current,
           "promoted": bool(verdict["promoted"]), "reason": verdict["reason"],
           "checks": verdict.get("checks", []), "candidate_metrics": metrics,
           "current_metrics": current_metrics, "who": who,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_json(storage.join(_promotions_dir(corpus), f"{seq:06d}-{candidate}.json"), rec,
                       overwrite=False)
    storage.write_json(own, rec, overwrite=False)
    logger.info("detector gate: %s %s (current %s): %s", candidate,
                "PROMOTED" if rec["promoted"] else "rejected", current, rec["reason"])
    return rec
