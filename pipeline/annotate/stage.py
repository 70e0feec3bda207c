"""Annotation rounds: the SAM data engine's three stages, one image shard per work unit.

- ``manual`` (assisted-manual): the annotator labels each image's objects, largest first, with
  SAM in the loop (embedding once per image, one decoder call per click, previous low-res mask
  fed back), within a per-image time budget.
- ``semi`` (semi-automatic): a proposer (``amg``: automatic generation with strict thresholds;
  the DETR proposer of the detector issue plugs in by name) pre-fills confident masks; the
  annotator labels only the objects still missing. Pre-filled and added masks are counted apart.
- ``auto`` (fully automatic): :class:`dataengine.pipeline.sam.amg.MaskGenerator` over a point grid;
  no annotator.

:func:`run_round` writes ``ROOT/annotations/round-NNNN/`` through
:class:`dataengine.pipeline.core.rounds.RoundWriter`: one output tar per image shard (same basename,
same key order), so a crashed round resumes per shard. On Ray, shards go to an actor pool (one actor
per model replica holding the model; ``num_gpus`` / ``num_cpus`` fractional allowed); without Ray
the same :class:`ShardAnnotator` runs in-process. A failed image is recorded with its reason in the
shard's ``done`` record and the round goes on; held-out images are never annotated. Ground truth for
the simulated annotator and for the metrics is round 0 (imported masks). Per-round ``metrics.json``:
images, masks/image, clicks/mask, seconds/mask and, where ground truth exists, mIoU of the produced
masks against their best-matching ground truth and recall of ground-truth objects at IoU 0.5 / 0.75.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dataengine.pipeline.annotate.annotators import (GroundTruth, SimulatedAnnotator,
                                                     SimulatedAnnotatorConfig)
from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import masks as mask_utils
from dataengine.pipeline.core import splits, storage
from dataengine.pipeline.core.dataset import shard_duplicates
from dataengine.pipeline.core.imagecodec import sample_image
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import (RoundOwnedError, RoundWriter, claim_round, is_complete,
                                             iter_round_shard, round_info, round_owner)
from dataengine.pipeline.core.shards import iter_tar
from dataengine.pipeline.detector.proposer import DetectorProposerConfig
from dataengine.pipeline.sam.amg import AmgConfig, MaskGenerator
from dataengine.pipeline.sam.clicker import SamSegmenter, clicks_to_iou
from dataengine.pipeline.sam.embeddings import EmbeddingCache
from dataengine.pipeline.sam.resolve import resolve_model

logger = logging.getLogger(__name__)

ANNOTATE_STAGES = ("manual", "semi", "auto")
PROPOSERS = ("amg", "detector")  # detector: dataengine.pipeline.detector.proposer


def strict_amg() -> AmgConfig:
    """The semi stage's pre-fill: automatic generation with strict thresholds."""
    return AmgConfig(pred_iou_thresh=0.92, stability_score_thresh=0.97)


@dataclass
class AnnotateConfig:
    """One annotation round (``dataengine annotate``)."""

    stage: str = "manual"
    round: int | None = None          # default: resume the last unfinished round, else the next
    model: str = "tiny"               # vNNNN under ROOT/models/sam, a saved dir/URL, a .pth, or a
                                      # registry config name (random init with ``seed``)
    model_config: str = "tiny"        # registry config of a bare .pth/.safetensors checkpoint
    seed: int = 0
    annotator: SimulatedAnnotatorConfig = field(default_factory=SimulatedAnnotatorConfig)
    amg: AmgConfig = field(default_factory=AmgConfig)              # auto stage
    proposer: str = "amg"                                          # semi stage pre-fill
    semi_amg: AmgConfig = field(default_factory=strict_amg)
    detector: DetectorProposerConfig = field(default_factory=DetectorProposerConfig)  # proposer
    disc_radius: float = 0.0          # also paint clicks into SAM's mask prompt (findings)
    paint_first: bool = True          # ... the first click too (False: corrections only)
    shards: list[str] = field(default_factory=list)   # only these image shards (default all)
    keys: list[str] = field(default_factory=list)     # only these image keys (default all)
    max_images_per_shard: int = 0     # 0 = all
    use_embedding_cache: bool = True
    use_ray: bool = True
    num_actors: int = 2
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    retries: int = 1
    torch_threads: int = 1

    def __post_init__(self) -> None:
        if self.stage not in ANNOTATE_STAGES:
            raise ValueError(f"stage={self.stage!r} is not one of {ANNOTATE_STAGES}")
        if self.proposer not in PROPOSERS:
            raise ValueError(f"proposer={self.proposer!r} is not one of {PROPOSERS}")
        for name, cls in (("annotator", SimulatedAnnotatorConfig), ("amg", AmgConfig),
                          ("semi_amg", AmgConfig), ("detector", DetectorProposerConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, config_mod.from_dict(cls, getattr(self, name), where=name))
        if self.round is not None and self.round < 1:
            raise ValueError(f"round={self.round} must be >= 1 (round 0 holds imports)")
        if self.num_actors < 1:
            raise ValueError(f"num_actors={self.num_actors} must be >= 1")
        if not 0 < self.num_cpus <= 64:
            raise ValueError(f"num_cpus={self.num_cpus} must be in (0, 64]")
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus={self.num_gpus} must be >= 0")
        if self.max_images_per_shard < 0:
            raise ValueError(f"max_images_per_shard={self.max_images_per_shard} must be >= 0")
        if self.retries < 0:
            raise ValueError(f"retries={self.retries} must be >= 0")

    def generator(self, stage: str | None = None) -> AmgConfig:
        """The automatic generator of ``stage`` (default this round's): ``amg`` for auto,
        ``semi_amg`` for the semi pre-fill, its grid points painted as discs when clicks are
        (grid points are prompted as a first click is)."""
        amg = self.amg if (stage or self.stage) == "auto" else self.semi_amg
        if self.disc_radius and self.paint_first and not amg.disc_radius:
            amg = dataclasses.replace(amg, disc_radius=self.disc_radius)
        return amg


# ---- per-shard work ------------------------------------------------------------------------



def ground_truth(corpus: Corpus, shard: str) -> dict[str, list[GroundTruth]]:
    """Round-0 (imported) objects per key of one image shard; crowd regions left out."""
    out: dict[str, list[GroundTruth]] = {}
    if not storage.exists(corpus.round_shard(0, shard)):
        return out
    for rec in iter_round_shard(corpus, 0, shard):
        objs = []
        for ann in rec["annotations"]:
            if ann.get("iscrowd"):
                continue
            objs.append(GroundTruth(mask_utils.decode(ann["segmentation"]),
                                    ann.get("category_id"), ann.get("category")))
        out[rec["image"]["image_id"]] = objs
    return out


def match_metrics(produced: list[np.ndarray], gts: list[GroundTruth]) -> dict[str, float]:
    """Sums for the round metrics: best-GT IoU of each produced mask, produced masks at IoU
    >= 0.5 to an object, GT recall at .5/.75."""
    if not gts:
        return {"gt_objects": 0, "iou_sum": 0.0, "matched_masks": 0, "masks50": 0,
                "recall50": 0, "recall75": 0}
    prod = [mask_utils.encode(m) for m in produced]
    gt = [mask_utils.encode(g.mask) for g in gts]
    m = mask_utils.iou_matrix(prod, gt)
    best_gt = m.max(axis=0) if len(prod) else np.zeros(len(gt))
    best_mask = m.max(axis=1) if len(prod) else np.zeros(0)
    return {"gt_objects": len(gt), "iou_sum": float(best_mask.sum()),
            "matched_masks": len(prod), "masks50": int((best_mask >= 0.5).sum()),
            "recall50": int((best_gt >= 0.5).sum()), "recall75": int((best_gt >= 0.75).sum())}


class ShardAnnotator:
    """Runs one stage on one image shard at a time; holds the model (a Ray actor wraps it)."""

    def __init__(self, root: str, cfg: AnnotateConfig | dict[str, Any], number: int,
                 model_version: str | None = None, model: Any = None) -> None:
        import torch

        self.cfg = cfg if isinstance(cfg, AnnotateConfig) else config_mod.from_dict(
            AnnotateConfig, cfg)
        if self.cfg.torch_threads > 0:
            torch.set_num_threads(self.cfg.torch_threads)
        self.corpus = Corpus(root)
        self.number = number
        if model is None:
            model, model_version = resolve_model(self.corpus, self.cfg.model,
                                                 model_config=self.cfg.model_config,
                                                 seed=self.cfg.seed)
        self.model = model
        self.model_version = model_version or ""
        self.writer = RoundWriter(self.corpus, number, self.cfg.stage, self.model_version)
        self.cache = EmbeddingCache(self.corpus, self.model_version, model,
                                    write=self.cfg.use_embedding_cache)
        self.segmenter = SamSegmenter(model, embeddings=self.cache,
                                      disc_radius=self.cfg.disc_radius,
                                      paint_first=self.cfg.paint_first)
        self.annotator = SimulatedAnnotator(self.segmenter, self.cfg.annotator)
        self.generator = MaskGenerator(model, self.cfg.generator())
        if self.cfg.stage == "semi" and self.cfg.proposer == "detector":
            from dataengine.pipeline.detector.proposer import DetectorProposer

            self.generator = DetectorProposer.from_corpus(self.corpus, model, self.cfg.detector)
        self.holdout = splits.keys_of(self.corpus, "holdout")

    def _eligible(self, shard: str) -> list[tuple[str, np.ndarray | None, str | None]]:
        """(key, image or None, failure reason or None) for the shard's images to annotate."""
        keys = set(self.cfg.keys)
        dups = shard_duplicates(self.corpus, shard)  # indexed in another shard
        out = []
        for sample in iter_tar(self.corpus.image_shard(shard)):
            key = sample["__key__"]
            if key in self.holdout or key in dups or (keys and key not in keys):
                continue
            if self.cfg.max_images_per_shard and len(out) >= self.cfg.max_images_per_shard:
                break
            try:
                out.append((key, sample_image(sample), None))
            except Exception as exc:  # noqa: BLE001 - a bad image is data, not a crash
                out.append((key, None, f"{type(exc).__name__}: {exc}"))
        return out

    def __call__(self, shard: str) -> dict[str, Any]:
        """Annotate one image shard and publish its round shard; returns the shard's stats."""
        t0 = time.time()
        if self.writer.shard_done(shard):
            return {"shard": shard, "skipped": True}
        if storage.exists(self.corpus.round_shard(self.number, shard)):
            # published before a crash, without its manifest part: finish it from the tar
            self.writer.complete_shard(shard)
            return {"shard": shard, "skipped": True}
        items = self._eligible(shard)
        good = [(k, img) for k, img, err in items if err is None]
        if self.cfg.use_embedding_cache:
            self.cache.ensure_shard(shard, good)
        gts = ground_truth(self.corpus, shard)
        records, failures = [], []
        stats: dict[str, Any] = {"images": 0, "masks": 0, "prefilled": 0, "added": 0,
                                 "clicks": 0, "clicks50": 0, "seconds": 0.0, "discarded": 0,
                                 "discarded_clicks": 0, "discarded_seconds": 0.0, "gt_images": 0,
                                 "gt": {"gt_objects": 0, "iou_sum": 0.0, "matched_masks": 0,
                                        "masks50": 0, "recall50": 0, "recall75": 0},
                                 "gt_prefilled": {"iou_sum": 0.0, "matched_masks": 0,
                                                  "masks50": 0, "recall50": 0},
                                 "gt_added": {"iou_sum": 0.0, "matched_masks": 0}}
        for key, img, err in items:
            if err is not None:
                failures.append({"key": key, "reason": err})
                continue
            try:
                rec, info = self._annotate_image(key, img, gts.get(key))
            except Exception as exc:  # noqa: BLE001 - recorded, the round goes on
                logger.exception("round %d: image %s of %s failed", self.number, key, shard)
                failures.append({"key": key, "reason": f"{type(exc).__name__}: {exc}"})
                continue
            records.append(rec)
            stats["images"] += 1
            for k in ("masks", "prefilled", "added", "clicks", "clicks50", "discarded",
                      "discarded_clicks"):
                stats[k] += info[k]
            for k in ("seconds", "discarded_seconds"):
                stats[k] += info[k]
            if info.get("gt"):
                stats["gt_images"] += 1
                for k, v in info["gt"].items():
                    stats["gt"][k] += v
                for part in ("gt_prefilled", "gt_added"):
                    for k, v in info.get(part, {}).items():
                        stats[part][k] += v
        self.cache.drop_shard(k for k, _ in good)
        stats["failures"] = failures
        stats["wall_seconds"] = round(time.time() - t0, 3)
        self.writer.write_shard(shard, records, stats)
        return {"shard": shard, **stats}

    def _annotation(self, ann_id: int, mask: np.ndarray, *, predicted_iou: float,
                    stability: float, point_coords: list, crop_box: list, clicks: list,
                    annotator: str, seconds: float, prefilled: bool = False,
                    category: GroundTruth | None = None) -> dict[str, Any]:
        rle = mask_utils.encode(mask)
        return {"id": ann_id, "segmentation": rle, "bbox": mask_utils.bbox(rle),
                "area": mask_utils.area(rle), "predicted_iou": float(predicted_iou),
                "stability_score": float(stability), "point_coords": point_coords,
                "crop_box": crop_box, "stage": self.cfg.stage, "round": self.number,
                "model_version": self.model_version, "clicks": clicks, "annotator": annotator,
                "seconds": round(float(seconds), 3), "prefilled": prefilled,
                "category_id": category.category_id if category else None,
                "category": category.category if category else None}

    def _annotate_image(self, key: str, img: np.ndarray, gts: list[GroundTruth] | None
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
        h, w = img.shape[:2]
        anns: list[dict[str, Any]] = []
        info: dict[str, Any] = {"masks": 0, "prefilled": 0, "added": 0, "clicks": 0,
                                "clicks50": 0, "seconds": 0.0, "discarded": 0,
                                "discarded_clicks": 0, "discarded_seconds": 0.0}
        full_box = [0.0, 0.0, float(w), float(h)]
        prefilled_masks: list[np.ndarray] = []
        added_masks: list[np.ndarray] = []
        stage = self.cfg.stage
        if stage in ("semi", "auto"):
            feats = self.cache(key, img)[0] if self.cfg.use_embedding_cache else None
            for a in self.generator.generate(img, features=feats):
                m = mask_utils.decode(a["segmentation"])
                prefilled_masks.append(m)
                anns.append(self._annotation(
                    len(anns) + 1, m, predicted_iou=a["predicted_iou"],
                    stability=a["stability_score"], point_coords=a["point_coords"],
                    crop_box=a["crop_box"], clicks=[], annotator="model", seconds=0.0,
                    prefilled=stage == "semi"))
        if stage in ("manual", "semi"):
            if gts is None:
                if stage == "manual":
                    raise ValueError(f"image {key} has no ground truth (round 0) for the "
                                     f"simulated annotator")
            else:
                results, _ = self.annotator.annotate_image(img, gts, key=key,
                                                           present=prefilled_masks)
                for r in results:
                    if not r.accepted:
                        info["discarded"] += 1
                        info["discarded_clicks"] += len(r.clicks)
                        info["discarded_seconds"] += r.seconds
                        continue
                    added_masks.append(r.mask)
                    first = r.clicks[0]
                    anns.append(self._annotation(
                        len(anns) + 1, r.mask, predicted_iou=r.score,
                        stability=0.0, point_coords=[[float(first.x), float(first.y)]],
                        crop_box=full_box, clicks=[c.to_dict() for c in r.clicks],
                        annotator="simulated", seconds=r.seconds, category=gts[r.gt_index]))
                    info["clicks"] += len(r.clicks)
                    info["clicks50"] += clicks_to_iou(r.ious, 0.5, len(r.clicks))
                    info["seconds"] += r.seconds
        info["masks"] = len(anns)
        info["prefilled"] = len(prefilled_masks) if stage == "semi" else 0
        info["added"] = len(added_masks)
        if gts:
            info["gt"] = match_metrics(prefilled_masks + added_masks, gts)
            if stage == "semi":
                p, a = match_metrics(prefilled_masks, gts), match_metrics(added_masks, gts)
                info["gt_prefilled"] = {"iou_sum": p["iou_sum"],
                                        "matched_masks": p["matched_masks"],
                                        "masks50": p["masks50"], "recall50": p["recall50"]}
                info["gt_added"] = {"iou_sum": a["iou_sum"], "matched_masks": a["matched_masks"]}
        record = {"image": {"image_id": key, "width": w, "height": h, "file_name": f"{key}.jpg"},
                  "annotations": anns}
        return record, info


# ---- the round -----------------------------------------------------------------------------

def choose_round(corpus: Corpus, cfg: AnnotateConfig, model_version: str) -> int:
    """The round to write: ``cfg.round``, else the newest unfinished ``annotate`` round started
    with the same stage and model (resume), else a new round (claimed, so concurrent runs get
    different numbers). Rounds of other owners (people in the dashboard, imports) are never
    resumed: an explicit ``cfg.round`` of one is refused, and they are skipped otherwise."""
    if cfg.round is not None:
        owner = round_owner(corpus, cfg.round)
        if owner not in (None, "annotate"):
            hint = (" (open for people in the dashboard; they finish it there)"
                    if owner == "people" else "")
            raise RoundOwnedError(f"round {cfg.round} of {corpus.root} is a {owner} round{hint}; "
                                  f"annotate never resumes it: choose another --round")
        return cfg.round
    for n in sorted((n for n in corpus.rounds() if n > 0 and not is_complete(corpus, n)),
                    reverse=True):
        owner = round_owner(corpus, n)
        if owner != "annotate":
            logger.info("round %d is a %s round: annotate leaves it to its owner", n, owner)
            continue
        info = round_info(corpus, n) or {}
        if info.get("stage") == cfg.stage and info.get("model_version") == model_version:
            return n
        break  # the newest unfinished annotate round is another stage/model: start a new one
    return claim_round(corpus, cfg.stage, model_version, owner="annotate",
                       config=json.loads(json.dumps(config_mod.to_dict(cfg), default=str)))


def aggregate(stats: list[dict[str, Any]], stage: str) -> dict[str, Any]:
    """Round metrics from the per-shard stats records."""
    tot: dict[str, Any] = {"images": 0, "masks": 0, "prefilled": 0, "added": 0, "clicks": 0,
                           "clicks50": 0, "seconds": 0.0, "discarded": 0, "discarded_clicks": 0,
                           "discarded_seconds": 0.0,
                           "gt_images": 0, "wall_seconds": 0.0}
    gt = {"gt_objects": 0, "iou_sum": 0.0, "matched_masks": 0, "recall50": 0, "recall75": 0}
    gtp = {"iou_sum": 0.0, "matched_masks": 0, "masks50": 0, "recall50": 0}
    gta = {"iou_sum": 0.0, "matched_masks": 0}
    failures = []
    for s in stats:
        for k in tot:
            tot[k] += s.get(k, 0)
        for k in gt:
            gt[k] += s.get("gt", {}).get(k, 0)
        for k in gtp:
            gtp[k] += s.get("gt_prefilled", {}).get(k, 0)
            gta[k] = gta.get(k, 0) + s.get("gt_added", {}).get(k, 0)
        failures.extend({"shard": s.get("shard"), **f} for f in s.get("failures", []))
    n, masks = tot["images"], tot["masks"]
    clicked = tot["added"]
    out: dict[str, Any] = {
        "stage": stage, "shards": len(stats), "images": n, "masks": masks,
        "clicks": tot["clicks"],
        "failed_images": len(failures), "failures": failures[:1000],
        "masks_per_image": round(masks / n, 3) if n else 0.0,
        # no mask clicked: 0 when the masks came without clicks (auto, kept pre-fill), None
        # when there is no mask at all (an undefined cost, not a free one)
        "clicks_per_mask": round(tot["clicks"] / clicked, 3) if clicked else
        (0.0 if masks else None),
        # the same masks' clicks until their IoU first reached 0.5 (the annotator goes on to
        # its stop IoU): the cost measure a tiny CPU model moves first (see the findings)
        "clicks50_per_mask": round(tot["clicks50"] / clicked, 3) if clicked else
        (0.0 if masks else None),
        "seconds_per_mask": round(tot["seconds"] / clicked, 3) if clicked else
        (0.0 if masks else None),
        "seconds_per_image": round(tot["seconds"] / n, 3) if n else 0.0,
        "discarded": tot["discarded"], "discarded_clicks": tot["discarded_clicks"],
        "discarded_seconds": round(tot["discarded_seconds"], 3),
        "compute_seconds": round(tot["wall_seconds"], 3),
    }
    if stage == "semi":
        out["prefilled_per_image"] = round(tot["prefilled"] / n, 3) if n else 0.0
        out["added_per_image"] = round(tot["added"] / n, 3) if n else 0.0
        out["miou_prefilled"] = round(gtp["iou_sum"] / gtp["matched_masks"], 4) \
            if gtp["matched_masks"] else None
        out["miou_added"] = round(gta["iou_sum"] / gta["matched_masks"], 4) \
            if gta["matched_masks"] else None
        # share of the pre-filled masks at IoU >= 0.5 to a ground-truth object
        out["prefill_precision50"] = round(gtp["masks50"] / gtp["matched_masks"], 4) \
            if gtp["matched_masks"] else None
        if gt["gt_objects"]:  # GT objects the pre-fill covered (IoU >= 0.5), per proposer
            out["prefill_recall50"] = round(gtp["recall50"] / gt["gt_objects"], 4)
        out["clicks_per_image"] = round(tot["clicks"] / n, 3) if n else 0.0
    if gt["gt_objects"]:
        out["gt_images"] = tot["gt_images"]
        out["gt_objects"] = gt["gt_objects"]
        out["miou"] = round(gt["iou_sum"] / gt["matched_masks"], 4) if gt["matched_masks"] \
            else 0.0
        out["recall50"] = round(gt["recall50"] / gt["gt_objects"], 4)
        out["recall75"] = round(gt["recall75"] / gt["gt_objects"], 4)
    return out


def _run_on_ray(root: str, cfg: AnnotateConfig, number: int, model_version: str,
                todo: list[str], on_result: Callable[[dict[str, Any]], None]) -> None:
    """Shards over an actor pool of :class:`ShardAnnotator` (one model replica per actor)."""
    from dataengine.pipeline.core.distribute import map_actors

    map_actors(ShardAnnotator, (root, config_mod.to_dict(cfg), number, model_version), todo,
               num_actors=cfg.num_actors, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
               retries=cfg.retries, failure=lambda shard, msg: {"shard": shard, "error": msg},
               progress=on_result)


def run_round(root: str, cfg: AnnotateConfig | None = None,
              progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) one annotation round over the corpus at ``root``; returns its metrics."""
    cfg = cfg or AnnotateConfig()
    corpus = Corpus(root)
    root = corpus.root
    shards = corpus.image_shards()
    if not shards:
        raise FileNotFoundError(f"{corpus.images}: no image shards; run `dataengine shard` first")
    unknown = sorted(set(cfg.shards) - set(shards))
    if unknown:
        raise ValueError(f"shards {unknown} are not image shards of {root}")
    if cfg.shards:
        shards = [s for s in shards if s in set(cfg.shards)]
    model, model_version = resolve_model(corpus, cfg.model, model_config=cfg.model_config,
                                         seed=cfg.seed)
    number = choose_round(corpus, cfg, model_version)
    if is_complete(corpus, number):
        raise FileExistsError(f"round {number} of {root} is complete (metrics.json published); "
                              f"rounds are append-only: choose another --round")
    writer = RoundWriter(corpus, number, cfg.stage, model_version,
                         config=config_mod.to_dict(cfg))
    writer.begin()
    todo = [s for s in shards if not writer.shard_done(s)]
    logger.info("round %d (%s, model %s): %d shards to do, %d already done", number, cfg.stage,
                model_version, len(todo), len(shards) - len(todo))
    errors: list[dict[str, Any]] = []

    def on_result(res: dict[str, Any]) -> None:
        if "error" in res:
            errors.append(res)
        if progress is not None:
            progress(res)

    if todo:
        if cfg.use_ray:
            del model
            _run_on_ray(root, cfg, number, model_version, todo, on_result)
        else:
            worker = ShardAnnotator(root, cfg, number, model_version, model=model)
            for shard in todo:
                try:
                    on_result(worker(shard))
                except Exception as exc:  # noqa: BLE001 - recorded; the round goes on
                    logger.exception("round %d: shard %s failed", number, shard)
                    on_result({"shard": shard, "error": f"{type(exc).__name__}: {exc}"})
    if errors:
        metrics = {"round": number, "incomplete": True, "failed_shards": errors}
        logger.error("round %d: %d shard(s) failed; re-run to resume: %s", number, len(errors),
                     errors)
        return metrics
    metrics = aggregate([s for s in writer.shard_stats()
                         if s.get("shard") in set(shards) or not cfg.shards], cfg.stage)
    metrics.update({"round": number, "model_version": model_version,
                    "config": json.loads(json.dumps(config_mod.to_dict(cfg), default=str))})
    writer.finish(metrics)
    return metrics


def metrics_table(metrics: dict[str, Any]):  # -> rich.table.Table
    """A rich table of one round's metrics (printed by the CLI)."""
    from rich.table import Table

    t = Table(title=f"round {metrics.get('round')} · {metrics.get('stage')} · "
                    f"model {metrics.get('model_version')}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in ("images", "masks", "masks_per_image", "prefilled_per_image", "added_per_image",
              "clicks_per_mask", "clicks50_per_mask", "seconds_per_mask", "discarded",
              "failed_images", "gt_objects",
              "miou", "miou_prefilled", "miou_added", "recall50", "recall75",
              "compute_seconds"):
        if k in metrics and metrics[k] is not None:
            t.add_row(k, str(metrics[k]))
    return t
