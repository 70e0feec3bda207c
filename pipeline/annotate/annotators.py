"""Annotators: the simulated one (clicks by the RITM protocol against ground truth) and people.

``simulated``: knows the ground-truth objects of an image (round 0 imports, or a COCO file), labels
them in order of prominence (largest first) with a model in the loop
(:func:`dataengine.pipeline.sam.clicker.run_clicker`), stops at a target IoU or the click cap, and
accepts the model's final mask when its IoU with the object reaches ``accept_iou`` (as a person
would judge it), else discards it. The corpus keeps the MODEL's mask, never the ground truth;
seconds come from a :class:`CostModel`, spent within a per-image time budget.

``human``: people work in CVAT / Label Studio: :func:`export_for_people` writes a round's images
as COCO JSON with the model's masks as pre-annotations, :func:`import_from_people` turns the
corrected COCO JSON into a round (stage and round given by the caller), through
:mod:`dataengine.pipeline.annotate.export`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dataengine.pipeline.sam.clicker import Click, ClickerConfig, Segmenter, mask_iou, run_clicker

logger = logging.getLogger(__name__)

ANNOTATORS = ("simulated", "human")


@dataclass
class CostModel:
    """Seconds a person spends: finding and starting an object, each click, judging the result."""

    seconds_per_object: float = 3.0
    seconds_per_click: float = 1.5
    seconds_per_review: float = 1.0

    def __post_init__(self) -> None:
        for name in ("seconds_per_object", "seconds_per_click", "seconds_per_review"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")

    def seconds(self, n_clicks: int) -> float:
        """Seconds for one object labelled with ``n_clicks`` clicks."""
        return self.seconds_per_object + n_clicks * self.seconds_per_click + \
            self.seconds_per_review


@dataclass
class GroundTruth:
    """One known object: HxW bool ``mask``, optional category."""

    mask: np.ndarray
    category_id: int | None = None
    category: str | None = None

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class ObjectResult:
    """What happened to one object: the model's final mask and whether it was kept."""

    gt_index: int
    accepted: bool
    mask: np.ndarray
    clicks: list[Click]
    ious: list[float]
    score: float
    seconds: float

    @property
    def iou(self) -> float:
        return self.ious[-1] if self.ious else 0.0


@dataclass
class SimulatedAnnotatorConfig:
    """The simulated person: stop IoU, click cap, accept threshold, cost model, time budget."""

    target_iou: float = 0.9
    max_clicks: int = 20
    accept_iou: float = 0.75
    image_budget_seconds: float = 300.0
    max_objects_per_image: int = 100
    min_object_area: int = 0
    covered_iou: float = 0.5   # semi stage: an object counts as present when a mask covers it
    cost: CostModel = field(default_factory=CostModel)

    def __post_init__(self) -> None:
        ClickerConfig(self.target_iou, self.max_clicks)
        if not 0.0 <= self.accept_iou <= 1.0:
            raise ValueError(f"accept_iou={self.accept_iou} must be in [0, 1]")
        if self.image_budget_seconds <= 0:
            raise ValueError(f"image_budget_seconds={self.image_budget_seconds} must be > 0")
        if self.max_objects_per_image < 1:
            raise ValueError(f"max_objects_per_image={self.max_objects_per_image} must be >= 1")
        if not 0.0 < self.covered_iou <= 1.0:
            raise ValueError(f"covered_iou={self.covered_iou} must be in (0, 1]")
        if isinstance(self.cost, dict):
            self.cost = CostModel(**self.cost)


class SimulatedAnnotator:
    """Labels the ground-truth objects of one image with ``segmenter`` in the loop."""

    name = "simulated"

    def __init__(self, segmenter: Segmenter, config: SimulatedAnnotatorConfig | None = None):
        self.segmenter = segmenter
        self.config = config or SimulatedAnnotatorConfig()

    def annotate_object(self, gt: np.ndarray, index: int = 0) -> ObjectResult:
        """One object: click until the stop IoU or the cap, then accept or discard."""
        c = self.config
        r = run_clicker(self.segmenter, gt, ClickerConfig(c.target_iou, c.max_clicks))
        accepted = bool(r.ious) and r.final_iou >= c.accept_iou and bool(r.mask.any())
        return ObjectResult(gt_index=index, accepted=accepted, mask=r.mask, clicks=r.clicks,
                            ious=r.ious, score=r.score, seconds=c.cost.seconds(r.n_clicks))

    def annotate_image(self, image: np.ndarray, objects: Sequence[GroundTruth], *,
                       key: str | None = None, present: Sequence[np.ndarray] = (),
                       set_image: bool = True) -> tuple[list[ObjectResult], float]:
        """Label ``objects`` largest first within the time budget, skipping those already
        covered by a mask in ``present`` (IoU >= ``covered_iou``). Returns the results (accepted
        and discarded) and the seconds spent."""
        c = self.config
        if set_image:
            self.segmenter.set_image(image, key)
        order = sorted(range(len(objects)), key=lambda i: -objects[i].area)
        results: list[ObjectResult] = []
        spent = 0.0
        for i in order:
            obj = objects[i]
            if obj.area < max(1, c.min_object_area):
                continue
            if any(mask_iou(p, obj.mask) >= c.covered_iou for p in present):
                continue
            if spent >= c.image_budget_seconds or len(results) >= c.max_objects_per_image:
                break
            res = self.annotate_object(obj.mask, i)
            spent += res.seconds
            results.append(res)
        return results, spent
