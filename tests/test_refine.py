"""GrabCut edge snapping around any segmenter (pipeline/sam/refine.py)."""

from __future__ import annotations

import numpy as np

from dataengine.pipeline.sam.clicker import ClickerConfig, DiscSegmenter, mask_iou, run_clicker
from dataengine.pipeline.sam.refine import GrabCutSegmenter


def _image() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    img = np.full((120, 160, 3), (40, 90, 40), np.uint8)
    yy, xx = np.mgrid[0:120, 0:160]
    obj = ((xx - 80) / 26.0) ** 2 + ((yy - 60) / 18.0) ** 2 <= 1
    img[obj] = (220, 60, 50)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return img, obj


def test_grabcut_snaps_discs_to_the_object_edges():
    img, obj = _image()
    discs = DiscSegmenter(10.0, relative_to=None)
    snapped = GrabCutSegmenter(DiscSegmenter(10.0, relative_to=None), band=1.0)
    for seg in (discs, snapped):
        seg.set_image(img)
    a = run_clicker(discs, obj, ClickerConfig(target_iou=0.95, max_clicks=3))
    b = run_clicker(snapped, obj, ClickerConfig(target_iou=0.95, max_clicks=3))
    assert b.ious[0] > a.ious[0] + 0.2
    assert mask_iou(b.mask, obj) > 0.8


def test_grabcut_keeps_the_wrapped_segmenters_state_and_score():
    img, obj = _image()
    seg = GrabCutSegmenter(DiscSegmenter(10.0, relative_to=None))
    seg.set_image(img)
    res = run_clicker(seg, obj, ClickerConfig(target_iou=0.99, max_clicks=2))
    assert len(res.ious) >= 1 and res.mask.shape == obj.shape
