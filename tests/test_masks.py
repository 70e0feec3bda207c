"""pipeline/masks.py additions: stability score, box/mask NMS, small-region cleanup — checked
against segment_anything's own amg utilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataengine.pipeline.core import masks as M


def test_stability_score_matches_segment_anything():
    from segment_anything.utils.amg import calculate_stability_score

    logits = np.random.default_rng(0).normal(0, 3, (5, 40, 30)).astype(np.float32)
    ours = M.stability_score(logits, 0.0, 1.0)
    ref = calculate_stability_score(torch.as_tensor(logits), 0.0, 1.0).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    sharp = np.full((1, 10, 10), -20.0)
    sharp[0, 2:8, 2:8] = 20.0
    assert M.stability_score(sharp)[0] == 1.0


def test_box_and_mask_nms():
    from segment_anything.utils.amg import batched_mask_to_box

    m = np.zeros((30, 30), bool)
    m[5:15, 8:20] = True
    np.testing.assert_array_equal(M.box_xyxy(m), batched_mask_to_box(torch.as_tensor(m)).numpy())
    assert M.box_xyxy(np.zeros((4, 4), bool)).tolist() == [0, 0, 0, 0]
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], np.float32)
    assert sorted(M.box_nms(boxes, np.array([0.9, 0.8, 0.1]), 0.7).tolist()) == [0, 2]
    iou = M.box_iou_matrix(boxes, boxes)
    assert iou[0, 0] == 1.0 and iou[0, 2] == 0.0
    a, b = m.copy(), m.copy()
    b[5:6, 8:20] = False
    c = ~m
    keep = M.mask_nms([M.encode(a), M.encode(b), M.encode(c)], np.array([0.5, 0.9, 0.2]), 0.7)
    assert keep.tolist() == [1, 2]


def test_remove_small_regions_matches_segment_anything():
    from segment_anything.utils.amg import remove_small_regions

    rng = np.random.default_rng(1)
    mask = np.zeros((60, 60), bool)
    mask[10:40, 10:40] = True
    mask[20:22, 20:22] = False          # small hole
    mask[50:52, 50:52] = True           # small island
    mask |= rng.random((60, 60)) > 0.995
    for mode in ("holes", "islands"):
        ours, changed = M.remove_small_regions(mask, 10, mode)
        ref, ref_changed = remove_small_regions(mask, 10, mode)
        assert changed == ref_changed and (ours == ref).all()
    clean, changed = M.clean_mask(mask, 10)
    assert changed and clean[21, 21] and not clean[51, 51]
    with pytest.raises(ValueError, match="mode"):
        M.remove_small_regions(mask, 10, "blobs")
