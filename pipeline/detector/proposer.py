"""The semi-automatic stage's ``detector`` proposer: DETR boxes -> SAM box prompts -> pre-fill.

As in the SAM paper's semi-automatic stage ("a bounding box detector trained on all first-stage
masks using a generic 'object' category"): the promoted detector (:mod:`dataengine.models.detector`,
trained by ``dataengine train-detector``) proposes boxes above ``box_threshold``; every box is a
SAM box prompt, all boxes of an image in batches against ONE image embedding (the round's
embedding cache when given); a mask is kept when SAM's predicted IoU and its stability score pass
the thresholds; near-duplicates (box NMS on the masks' boxes) and near-whole-image masks are
dropped. The survivors pre-fill the image for the annotator, who adds only what is missing.

:class:`DetectorProposer` has the same ``generate(image, features=None)`` as
:class:`dataengine.pipeline.sam.amg.MaskGenerator`, so the semi stage of
:mod:`dataengine.pipeline.annotate.stage` swaps one for the other by ``proposer: amg | detector``.
:func:`propose_boxes` is the detector half alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dataengine.pipeline.core import masks as mask_utils
from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.sam.predictor import set_image

logger = logging.getLogger(__name__)


@dataclass
class DetectorProposerConfig:
    """Settings of the ``detector`` proposer (``annotate --set detector.box_threshold=0.4``)."""

    version: str = "current"           # current (promoted) | vNNNN | a saved detector dir/URL
    box_threshold: float = 0.5         # detector confidence
    max_boxes: int = 100
    pred_iou_thresh: float = 0.88      # SAM's predicted IoU filter
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7        # duplicates among the kept masks
    max_area_fraction: float = 0.95    # drop masks covering more of the image
    min_mask_region_area: int = 0      # small-region cleanup (px); 0 = off
    boxes_per_batch: int = 64          # SAM decoder batch

    def __post_init__(self) -> None:
        for name in ("box_threshold", "pred_iou_thresh", "stability_score_thresh",
                     "box_nms_thresh"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v} must be in [0, 1]")
        if not 0.0 < self.max_area_fraction <= 1.0:
            raise ValueError(f"max_area_fraction={self.max_area_fraction} must be in (0, 1]")
        for name in ("max_boxes", "boxes_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.min_mask_region_area < 0:
            raise ValueError(f"min_mask_region_area={self.min_mask_region_area} must be >= 0")


def resolve_detector(corpus: Corpus, spec: str = "current",
                     device: str | torch.device | None = None) -> tuple[Any, str]:
    """``(detector, version)`` for ``current`` (the promoted version), ``vNNNN`` or a saved
    detector directory/URL; a clear error when there is none."""
    import re

    from dataengine.pipeline.core.checkpoints import load_detector
    from dataengine.pipeline.detector.evaluate import current_detector

    if spec == "current":
        version = current_detector(corpus)
        if version is None:
            raise FileNotFoundError(
                f"proposer 'detector': no promoted detector under "
                f"{corpus.path('models', 'detector')}; run `dataengine train-detector` first "
                f"(or use proposer=amg)")
        spec = version
    if re.fullmatch(r"v\d{4,}", spec):
        url = corpus.model_dir("detector", spec)
        if not storage.exists(storage.join(url, "version.json")):
            raise FileNotFoundError(f"detector {spec}: {url} is not a published version")
        return load_detector(url, device), spec
    return load_detector(spec, device), spec.rstrip("/").rsplit("/", 1)[-1]


def propose_boxes(detector: Any, image: np.ndarray, *, threshold: float = 0.5,
                  max_boxes: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """``(Nx4 xyxy pixel boxes, N scores)`` of one HxWx3 uint8 image, best first."""
    from dataengine.models.detector import detect

    out = detect(detector, [image], threshold=threshold, max_detections=max_boxes)[0]
    boxes = out["boxes"]
    ok = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
    return boxes[ok], out["scores"][ok]


class DetectorProposer:
    """Pre-fill masks for one image at a time: detector boxes turned into masks by SAM."""

    def __init__(self, sam: Any, detector: Any, config: DetectorProposerConfig | None = None,
                 detector_version: str = "") -> None:
        from dataengine.pipeline.sam.predictor import make_predictor

        self.config = config or DetectorProposerConfig()
        self.sam = sam
        self.detector = detector
        self.detector_version = detector_version
        self.predictor = make_predictor(sam)
        self.stats: dict[str, int] = {}

    @classmethod
    def from_corpus(cls, corpus: Corpus, sam: Any,
                    config: DetectorProposerConfig | None = None) -> DetectorProposer:
        """The proposer with the corpus' detector (``config.version``) on SAM's device."""
        cfg = config or DetectorProposerConfig()
        dev = next(sam.parameters()).device
        det, version = resolve_detector(corpus, cfg.version, dev)
        return cls(sam, det, cfg, version)

    def _set_image(self, image: np.ndarray, features: Any) -> None:
        set_image(self.predictor, image, features)

    @torch.inference_mode()
    def generate(self, image: np.ndarray, features: Any = None) -> list[dict[str, Any]]:
        """Pre-fill annotations of ``image`` (HxWx3 uint8 RGB) in :class:`MaskGenerator`'s format
        (``segmentation`` RLE, ``bbox`` xywh, ``area``, ``predicted_iou``, ``stability_score``,
        ``point_coords``, ``crop_box``) plus ``box_prompt`` (xyxy) and ``detector_score``.
        ``features`` (1xCxSxS or CxSxS) is the cached SAM embedding of the image."""
        from dataengine.models.device import autocast

        c = self.config
        h, w = image.shape[:2]
        boxes, det_scores = propose_boxes(self.detector, image, threshold=c.box_threshold,
                                          max_boxes=c.max_boxes)
        self.stats = {"boxes": len(boxes), "after_iou": 0, "after_stability": 0, "kept": 0}
        if not len(boxes):
            return []
        self._set_image(image, features)
        p = self.predictor
        thr = self.sam.mask_threshold
        cand: list[dict[str, Any]] = []
        for s in range(0, len(boxes), c.boxes_per_batch):
            b = torch.as_tensor(boxes[s:s + c.boxes_per_batch], device=p.device)
            tb = p.transform.apply_boxes_torch(b, (h, w))
            with autocast(p.device):
                logits, iou, _ = p.predict_torch(None, None, boxes=tb, multimask_output=False,
                                                 return_logits=True)
            logits, iou = logits[:, 0].float(), iou[:, 0].float()
            keep = iou >= c.pred_iou_thresh
            self.stats["after_iou"] += int(keep.sum())
            inter = (logits > thr + c.stability_score_offset).sum((-1, -2))
            union = (logits > thr - c.stability_score_offset).sum((-1, -2))
            stab = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(iou))
            keep &= stab >= c.stability_score_thresh
            self.stats["after_stability"] += int(keep.sum())
            for i in torch.nonzero(keep).flatten().tolist():
                m = (logits[i] > thr).cpu().numpy()
                if c.min_mask_region_area:
                    m, _ = mask_utils.clean_mask(m, c.min_mask_region_area)
                area = int(m.sum())
                if area == 0 or (c.max_area_fraction < 1.0 and area > c.max_area_fraction * h * w):
                    continue
                cand.append({"mask": m, "iou": float(iou[i]), "stab": float(stab[i]),
                             "box": boxes[s + i], "score": float(det_scores[s + i]),
                             "mbox": mask_utils.box_xyxy(m)})
        if not cand:
            return []
        keep_idx = mask_utils.box_nms(np.stack([r["mbox"] for r in cand]),
                                      np.array([r["iou"] for r in cand]), c.box_nms_thresh)
        out = []
        for i in keep_idx:
            r = cand[int(i)]
            rle = mask_utils.encode(r["mask"])
            x0, y0, x1, y1 = (float(v) for v in r["box"])
            out.append({"segmentation": rle, "bbox": mask_utils.bbox(rle),
                        "area": mask_utils.area(rle), "predicted_iou": r["iou"],
                        "stability_score": r["stab"],
                        "point_coords": [[(x0 + x1) / 2, (y0 + y1) / 2]],
                        "crop_box": [0.0, 0.0, float(w), float(h)],
                        "box_prompt": [x0, y0, x1, y1], "detector_score": r["score"],
                        "detector_version": self.detector_version})
        self.stats["kept"] = len(out)
        return out
