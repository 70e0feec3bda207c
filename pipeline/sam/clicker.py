"""The standard interactive-segmentation clicker (RITM / SimpleClick protocol) and segmenters.

Protocol (Sofiiuk et al., RITM): the first click is the interior point of the object farthest
from its boundary; each next click goes to the error region (false negatives -> positive click,
false positives -> negative click) whose farthest-from-boundary point is deepest, at that point.
Stop at a target IoU or after ``max_clicks`` (20) clicks.

The same clicker drives any :class:`Segmenter`:

- :class:`SamSegmenter`: a SAM model in the loop (one image embedding per image, one decoder
  call per click, the previous low-res logits fed back as the mask prompt; optionally each click
  also painted as a +/- disc into that mask prompt, as ``../shared/findings/`` trains it);
- :class:`OracleSegmenter`: a perfect model that returns the ground-truth object under the
  positive clicks (the clicker must reach IoU 1.0 with it);
- :class:`EmptySegmenter`: a useless model (always empty; the clicker spends all 20 clicks);
- :class:`DiscSegmenter`: the no-model reference of the findings: discs painted at the clicks.

Coordinates are ``(x, y)`` pixels of the image as given (stored frame); masks are HxW bool.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from dataengine.pipeline.sam.prompts import click_disc_logits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Click:
    """One click: pixel ``(x, y)`` in the image frame; ``positive`` = on the object."""

    x: int
    y: int
    positive: bool

    @property
    def label(self) -> int:
        return 1 if self.positive else 0

    def to_dict(self) -> dict[str, int]:
        return {"x": int(self.x), "y": int(self.y), "label": self.label}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Click:
        return cls(int(d["x"]), int(d["y"]), bool(int(d["label"])))


def clicks_to_arrays(clicks: Sequence[Click]) -> tuple[np.ndarray, np.ndarray]:
    """Clicks -> ``(Nx2 float32 xy coords, N int32 labels)`` (SAM's point prompt format)."""
    coords = np.array([[c.x, c.y] for c in clicks], dtype=np.float32).reshape(-1, 2)
    labels = np.array([c.label for c in clicks], dtype=np.int32)
    return coords, labels


@dataclass
class Prediction:
    """One segmenter answer: ``mask`` HxW bool, ``score`` (predicted IoU) and opaque ``state``
    carried to the next call of the same object (SAM: the 1xHxW low-res logits)."""

    mask: np.ndarray
    score: float = 0.0
    state: Any = None


@runtime_checkable
class Segmenter(Protocol):
    """Anything the clicker can drive: set an image once, then predict from clicks."""

    name: str

    def set_image(self, image: np.ndarray, key: str | None = None) -> None:
        """Prepare for ``image`` (HxWx3 uint8 RGB); ``key`` lets a cache find its embedding."""

    def predict(self, clicks: Sequence[Click], state: Any = None) -> Prediction:
        """The mask for the clicks so far; ``state`` is the previous :class:`Prediction`'s."""


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two HxW bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def _deepest_point(region: np.ndarray) -> tuple[float, int, int]:
    """``(distance, x, y)`` of the point of ``region`` farthest from its boundary (the image
    border counts as boundary, as RITM pads the map with zeros)."""
    if not region.any():
        return 0.0, -1, -1
    padded = np.pad(region, 1, constant_values=False).astype(np.uint8)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    idx = int(np.argmax(dist))
    y, x = divmod(idx, region.shape[1])
    return float(dist[y, x]), x, y


def next_click(pred: np.ndarray, gt: np.ndarray) -> Click | None:
    """The next click for ``pred`` against ``gt`` (both HxW bool), or None when they agree.

    False negatives give a positive click, false positives a negative one; the error map whose
    deepest point is farther from its boundary wins (RITM ``get_next_points``).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    fn = np.logical_and(gt, ~pred)
    fp = np.logical_and(~gt, pred)
    d_fn, x_fn, y_fn = _deepest_point(fn)
    d_fp, x_fp, y_fp = _deepest_point(fp)
    if d_fn == 0 and d_fp == 0:
        return None
    if d_fn >= d_fp:
        return Click(x_fn, y_fn, True)
    return Click(x_fp, y_fp, False)


@dataclass
class ClickerConfig:
    """When the simulated user stops: at ``target_iou`` or after ``max_clicks`` clicks."""

    target_iou: float = 0.9
    max_clicks: int = 20

    def __post_init__(self) -> None:
        if not 0.0 < self.target_iou <= 1.0:
            raise ValueError(f"target_iou={self.target_iou} must be in (0, 1]")
        if self.max_clicks < 1:
            raise ValueError(f"max_clicks={self.max_clicks} must be >= 1")


@dataclass
class ClickResult:
    """One object's interactive session: every click, the IoU after each, the final answer."""

    clicks: list[Click]
    ious: list[float]
    mask: np.ndarray
    score: float
    reached: bool
    scores: list[float] = field(default_factory=list)

    @property
    def n_clicks(self) -> int:
        return len(self.clicks)

    @property
    def final_iou(self) -> float:
        return self.ious[-1] if self.ious else 0.0


def run_clicker(segmenter: Segmenter, gt: np.ndarray, config: ClickerConfig | None = None,
                *, target_iou: float | None = None, max_clicks: int | None = None) -> ClickResult:
    """Simulate one object: click by the protocol until IoU >= target or the click cap.

    ``segmenter.set_image`` must have been called for the image ``gt`` belongs to.
    """
    cfg = config or ClickerConfig()
    target = cfg.target_iou if target_iou is None else target_iou
    cap = cfg.max_clicks if max_clicks is None else max_clicks
    gt = gt.astype(bool)
    pred = np.zeros_like(gt)
    clicks: list[Click] = []
    ious: list[float] = []
    scores: list[float] = []
    state: Any = None
    score = 0.0
    while len(clicks) < cap:
        click = next_click(pred, gt)
        if click is None:
            break
        clicks.append(click)
        out = segmenter.predict(clicks, state)
        if out.mask.shape != gt.shape:
            raise ValueError(f"segmenter {segmenter.name!r} returned a {out.mask.shape} mask "
                             f"for a {gt.shape} object")
        pred, state, score = out.mask.astype(bool), out.state, float(out.score)
        ious.append(mask_iou(pred, gt))
        scores.append(score)
        if ious[-1] >= target:
            break
    reached = bool(ious) and ious[-1] >= target
    return ClickResult(clicks=clicks, ious=ious, mask=pred, score=score, reached=reached,
                       scores=scores)


# ---- per-object metrics (NoC, mIoU@k) -------------------------------------------------------

def clicks_to_iou(ious: Sequence[float], threshold: float, max_clicks: int = 20) -> int:
    """Clicks needed to reach ``threshold`` (``max_clicks`` when never reached), NoC style."""
    for i, v in enumerate(ious[:max_clicks]):
        if v >= threshold:
            return i + 1
    return max_clicks


def iou_at(ious: Sequence[float], k: int) -> float:
    """IoU after ``k`` clicks (the last value when the session stopped earlier; 0 if none)."""
    if not ious:
        return 0.0
    return float(ious[min(k, len(ious)) - 1])


# ---- segmenters -----------------------------------------------------------------------------

class OracleSegmenter:
    """A perfect model: returns the known object under the positive clicks and off the negative
    ones (the first such object in ``objects`` order), else an empty mask."""

    name = "oracle"

    def __init__(self, objects: Sequence[np.ndarray] = ()) -> None:
        self.objects = [o.astype(bool) for o in objects]
        self.shape: tuple[int, int] | None = None

    def set_image(self, image: np.ndarray, key: str | None = None) -> None:
        self.shape = image.shape[:2]

    def predict(self, clicks: Sequence[Click], state: Any = None) -> Prediction:
        shape = self.shape or (self.objects[0].shape if self.objects else None)
        if shape is None:
            raise ValueError("OracleSegmenter: call set_image first or give objects")
        for obj in self.objects:
            if all(obj[c.y, c.x] == c.positive for c in clicks):
                return Prediction(obj.copy(), 1.0, None)
        return Prediction(np.zeros(shape, dtype=bool), 0.0, None)


class EmptySegmenter:
    """A useless model: always the empty mask."""

    name = "empty"

    def __init__(self) -> None:
        self.shape: tuple[int, int] = (0, 0)

    def set_image(self, image: np.ndarray, key: str | None = None) -> None:
        self.shape = image.shape[:2]

    def predict(self, clicks: Sequence[Click], state: Any = None) -> Prediction:
        return Prediction(np.zeros(self.shape, dtype=bool), 0.0, None)


def paint_discs(shape: tuple[int, int], clicks: Sequence[Click], radius: float) -> np.ndarray:
    """HxW bool: positive discs painted in click order, negative discs erased."""
    h, w = shape
    out = np.zeros((h, w), dtype=bool)
    if not clicks:
        return out
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = (xx ** 2 + yy ** 2) <= radius ** 2
    for c in clicks:
        y0, y1 = max(0, c.y - r), min(h, c.y + r + 1)
        x0, x1 = max(0, c.x - r), min(w, c.x + r + 1)
        d = disc[y0 - (c.y - r):y1 - (c.y - r), x0 - (c.x - r):x1 - (c.x - r)]
        region = out[y0:y1, x0:x1]
        region[d] = c.positive
    return out


class DiscSegmenter:
    """The no-model reference: the mask is discs of ``radius`` px painted at the clicks
    (``radius`` relative to the image's longest side when ``relative`` is set)."""

    name = "discs"

    def __init__(self, radius: float = 10.0, *, relative_to: int | None = 256) -> None:
        self.radius = radius
        self.relative_to = relative_to
        self.shape: tuple[int, int] = (0, 0)

    def set_image(self, image: np.ndarray, key: str | None = None) -> None:
        self.shape = image.shape[:2]

    def _radius(self) -> float:
        if self.relative_to:
            return self.radius * max(self.shape) / self.relative_to
        return self.radius

    def predict(self, clicks: Sequence[Click], state: Any = None) -> Prediction:
        return Prediction(paint_discs(self.shape, clicks, self._radius()), 0.0, None)




class SamSegmenter:
    """SAM in the loop through Meta's ``SamPredictor``: the image embedding is computed once per
    image (or taken from ``embeddings``, a callable ``key -> (features, input_size, original_size)``
    such as :class:`dataengine.pipeline.sam.embeddings.EmbeddingCache`), one decoder call per click,
    the previous low-res logits fed back as the mask prompt.

    ``multimask_first``: on the first click use multimask output and keep the best-scored mask
    (SAM's ambiguity handling). ``disc_radius`` > 0 also paints each click into the mask prompt;
    with ``paint_first`` False the first click stays SAM's point-only prompt and only the
    corrections are painted (all clicks so far), as a model trained with ``paint_first_prob``
    0 saw them (:mod:`dataengine.pipeline.sam.loss`).
    """

    name = "sam"

    def __init__(self, model: Any, *, embeddings: Any = None, multimask_first: bool = True,
                 disc_radius: float = 0.0, feed_back_mask: bool = True,
                 paint_first: bool = True) -> None:
        from dataengine.pipeline.sam.predictor import make_predictor

        self.model = model
        self.predictor = make_predictor(model)
        self.embeddings = embeddings
        self.multimask_first = multimask_first
        self.disc_radius = disc_radius
        self.feed_back_mask = feed_back_mask
        self.paint_first = paint_first

    def set_image(self, image: np.ndarray, key: str | None = None) -> None:
        from dataengine.pipeline.sam.predictor import set_features, set_image

        if self.embeddings is not None and key is not None:
            feats, input_size, original_size = self.embeddings(key, image)
            set_features(self.predictor, feats, original_size, input_size)
        else:
            set_image(self.predictor, image)

    def predict(self, clicks: Sequence[Click], state: Any = None) -> Prediction:
        import torch

        from dataengine.models.device import autocast

        p = self.predictor
        coords, labels = clicks_to_arrays(clicks)
        mask_input = state if (self.feed_back_mask and state is not None) else None
        if self.disc_radius > 0 and (self.paint_first or len(clicks) > 1):
            mask_input = click_disc_logits(mask_input, clicks, p.original_size,
                                           self.model.image_encoder.img_size, self.disc_radius,
                                           transform=getattr(self.model, "transform", None))
        multimask = self.multimask_first and len(clicks) == 1 and mask_input is None
        with torch.inference_mode(), autocast(p.device):
            masks, scores, low_res = p.predict(point_coords=coords, point_labels=labels,
                                               mask_input=mask_input, multimask_output=multimask)
        best = int(np.argmax(scores))
        return Prediction(masks[best].astype(bool), float(scores[best]),
                          low_res[best:best + 1].astype(np.float32))
