"""Edge snapping without learning: GrabCut seeded by a segmenter's mask and the clicks.

:class:`GrabCutSegmenter` wraps any :class:`dataengine.pipeline.sam.clicker.Segmenter`: it asks
the wrapped segmenter for its mask, then runs OpenCV's GrabCut (colour GMMs + graph cut on the
image edges) on a copy of the image shrunk to ``work_side`` px, initialised with the mask and a
band around it (``band`` x the mask's size) as "probably foreground", the rest as "background",
and each click as a small definite foreground / background disc. The wrapped segmenter keeps its
own state (a model keeps feeding back its own logits), so what the model alone does and what the
refinement adds stay separable: report the model alone, the model + refinement, and the
refinement on the no-model discs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from dataengine.pipeline.sam.clicker import Click, Prediction


class GrabCutSegmenter:
    """``base``'s mask snapped to the image edges by GrabCut (see the module docstring)."""

    def __init__(self, base: Any, *, work_side: int = 256, iterations: int = 3,
                 click_radius: float = 3.0, band: float = 0.25, min_keep: float = 0.2) -> None:
        self.base = base
        self.name = f"{getattr(base, 'name', 'segmenter')}+grabcut"
        self.work_side = work_side
        self.iterations = iterations
        self.click_radius = click_radius
        self.band = band
        self.min_keep = min_keep
        self.image: np.ndarray | None = None
        self.small: np.ndarray | None = None

    def set_image(self, image: np.ndarray, key: str | None = None) -> None:
        self.base.set_image(image, key)
        self.image = image
        h, w = image.shape[:2]
        s = min(1.0, self.work_side / max(h, w))
        self.scale = s
        self.small = cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))),
                                interpolation=cv2.INTER_AREA) if s < 1 else image.copy()
        self.small = np.ascontiguousarray(self.small[..., ::-1])  # OpenCV wants BGR

    def refine(self, mask: np.ndarray, clicks: Sequence[Click]) -> np.ndarray:
        """The mask snapped by GrabCut (the input mask when GrabCut cannot run)."""
        assert self.small is not None
        h, w = mask.shape
        sh, sw = self.small.shape[:2]
        m = cv2.resize(mask.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST) > 0
        gc = np.full((sh, sw), cv2.GC_BGD, np.uint8)
        if m.any():
            ys, xs = np.nonzero(m)
            side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
            r = max(2, int(round(self.band * side)))
            ring = cv2.dilate(m.astype(np.uint8), cv2.getStructuringElement(
                cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))) > 0
            # the band is uncertain: "probably foreground" (as the inside of a GrabCut box), so
            # the background colour model is learnt only beyond it and the mask can grow into
            # the band as well as shrink
            gc[ring] = cv2.GC_PR_FGD
        rr = max(1, int(round(self.click_radius)))
        for c in clicks:
            cx, cy = int(c.x * sw / w), int(c.y * sh / h)
            cv2.circle(gc, (cx, cy), rr, int(cv2.GC_FGD if c.positive else cv2.GC_BGD), -1)
        fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
        bg = (gc == cv2.GC_BGD) | (gc == cv2.GC_PR_BGD)
        if fg.sum() < 2 or bg.sum() < 2:
            return mask
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        try:
            cv2.grabCut(self.small, gc, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
        except cv2.error:
            return mask
        out = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
        # keep only the parts connected to a positive click (GrabCut can light up far regions
        # of the same colour)
        n, lab = cv2.connectedComponents(out.astype(np.uint8))
        keep = np.zeros(n, bool)
        for c in clicks:
            if c.positive:
                cx, cy = min(sw - 1, int(c.x * sw / w)), min(sh - 1, int(c.y * sh / h))
                keep[lab[cy, cx]] = True
        keep[0] = False
        if keep.any():
            out = keep[lab]
        full = cv2.resize(out.astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR) > 0
        if mask.any() and full.sum() < self.min_keep * mask.sum():
            return mask  # a collapse of the refinement: keep the segmenter's answer
        return full

    def predict(self, clicks: Sequence[Click], state: Any = None) -> Prediction:
        base = self.base.predict(clicks, state)
        return Prediction(self.refine(base.mask, clicks), base.score, base.state)
