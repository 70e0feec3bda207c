"""pipeline/sam/amg_tune.py: the threshold replay keeps what the generator keeps, and the choice
honours the precision floor."""

from __future__ import annotations

import numpy as np
import pytest

from dataengine.pipeline.core import masks as M
from dataengine.pipeline.sam.amg import AmgConfig, MaskGenerator
from dataengine.pipeline.sam.amg_tune import (Candidate, TuneAmgConfig, choose, collect, replay,
                                              sweep, tune, unfiltered)
from dataengine.pipeline.sam.evaluate import EvalImage


def _cand(image, iou, stab, box, best, obj=0, area=100):
    return Candidate(image, iou, stab, box, area, best, obj)


def test_replay_filters_then_nms_then_area_cap():
    amg = AmgConfig(box_nms_thresh=0.7, max_area_fraction=0.5)
    cands = [_cand(0, 0.9, 0.9, (0, 0, 10, 10), 0.8, 0),
             _cand(0, 0.8, 0.9, (0, 0, 10, 11), 0.7, 0),     # suppressed by the first (NMS)
             _cand(0, 0.7, 0.2, (20, 20, 30, 30), 0.1, 1),   # low stability
             _cand(1, 0.6, 0.9, (0, 0, 10, 10), 0.6, 0),
             _cand(1, 0.9, 0.9, (0, 0, 50, 50), 0.9, 1, area=2500)]  # over the area cap
    areas = [400, 4000]
    everything = replay(cands, 0.0, 0.0, amg, 2, 4, areas)
    assert everything["masks_per_image"] == pytest.approx(3 / 2)      # c0, c2, c3
    assert everything["precision50"] == pytest.approx(2 / 3)
    assert everything["recall50"] == pytest.approx(2 / 4)
    assert replay(cands, 0.6, 0.0, amg, 2, 4, areas)["masks_per_image"] == 1.0  # IoU > 0.6
    strict = replay(cands, 0.65, 0.5, amg, 2, 4, areas)
    assert strict["masks_per_image"] == pytest.approx(1 / 2)          # c0 only
    assert strict["precision50"] == 1.0 and strict["recall50"] == pytest.approx(1 / 4)
    assert replay(cands, 0.99, 0.99, amg, 2, 4, areas)["precision50"] == 0.0


def test_choose_honours_the_floor_and_says_when_it_cannot():
    table = [{"masks_per_image": 3.0, "precision50": 0.3, "recall50": 0.6},
             {"masks_per_image": 2.0, "precision50": 0.55, "recall50": 0.5},
             {"masks_per_image": 1.0, "precision50": 0.9, "recall50": 0.2},
             {"masks_per_image": 0.0, "precision50": 0.0, "recall50": 0.0}]
    semi = choose(table, 0.5, "masks_per_image")
    assert semi["reached"] and semi["masks_per_image"] == 2.0
    auto = choose(table, 0.25, "recall50")
    assert auto["reached"] and auto["recall50"] == 0.6
    none = choose(table, 0.95, "masks_per_image")
    assert not none["reached"] and none["precision50"] == 0.9
    assert choose(table[3:], 0.5, "recall50") == {"reached": False}


def _scene(seed: int) -> EvalImage:
    rng = np.random.default_rng(seed)
    img = np.full((96, 96, 3), 60, np.uint8)
    masks = []
    for _ in range(3):
        y, x = rng.integers(10, 60, 2)
        m = np.zeros((96, 96), bool)
        m[y:y + 25, x:x + 25] = True
        img[m] = rng.integers(100, 255, 3)
        masks.append(m)
    return EvalImage(f"k{seed}", img, masks)


def test_replay_reproduces_the_generator():
    """Thresholds replayed on the collected candidates keep the same masks as a generator run
    with those thresholds (the low-res pre-filter opened: it only saves time)."""
    from dataengine.models.sam import build_sam

    model = build_sam("tiny-test", seed=0)
    images = [_scene(0), _scene(1)]
    amg = AmgConfig(points_per_side=5, box_nms_thresh=0.7, max_area_fraction=0.9,
                    low_res_margin=1.0)
    cands = collect(model, images, unfiltered(amg, 5))
    assert len(cands) > 0
    areas = [96 * 96] * 2
    table = sweep(cands, amg, 2, 6, areas, grid=4)
    assert len(table) > 1
    row = table[len(table) // 2]
    gen = MaskGenerator(model, AmgConfig(
        points_per_side=5, box_nms_thresh=0.7, max_area_fraction=0.9, low_res_margin=1.0,
        pred_iou_thresh=row["pred_iou_thresh"],
        stability_score_thresh=row["stability_score_thresh"]))
    kept = good = 0
    for img in images:
        dets = gen.generate(img.image)
        kept += len(dets)
        if dets:
            ious = M.iou_matrix([d["segmentation"] for d in dets],
                                [M.encode(m) for m in img.masks])
            good += int((ious.max(axis=1) >= 0.5).sum())
    assert kept / 2 == pytest.approx(row["masks_per_image"])
    assert (good / kept if kept else 0.0) == pytest.approx(row["precision50"])


def test_tune_returns_both_stages():
    from dataengine.models.sam import build_sam

    model = build_sam("tiny-test", seed=0)
    out = tune(model, [_scene(2)], AmgConfig(points_per_side=4), AmgConfig(points_per_side=4),
               TuneAmgConfig(points_per_side=4, grid=3))
    assert out["images"] == 1 and out["objects"] == 3
    for stage in ("semi", "auto"):
        assert out[stage]["candidates"] > 0 and "reached" in out[stage]
        assert out[stage]["unfiltered"]["masks_per_image"] > 0
    with pytest.raises(ValueError, match="grid"):
        TuneAmgConfig(grid=1)
