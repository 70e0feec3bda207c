"""pipeline/clicker.py: the RITM click protocol over oracle, useless, disc and SAM segmenters."""

from __future__ import annotations

import numpy as np
import pytest

from dataengine.pipeline.sam.clicker import (Click, ClickerConfig, DiscSegmenter, EmptySegmenter,
                                             OracleSegmenter, SamSegmenter, clicks_to_iou, iou_at,
                                             next_click, paint_discs, run_clicker)
from dataengine.pipeline.sam.prompts import click_disc_logits


def _real_objects(shared_data, n_images=2):
    from PIL import Image
    from pycocotools.coco import COCO

    coco = COCO(str(shared_data / "coco-mini/annotations/instances_val2017.json"))
    out = []
    for iid in sorted(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=iid, iscrowd=False))
        anns = [a for a in anns if a["area"] > 500]
        if not anns:
            continue
        info = coco.loadImgs(iid)[0]
        img = np.asarray(Image.open(shared_data / "coco-mini/val2017" / info["file_name"])
                         .convert("RGB"))
        out.append((img, [coco.annToMask(a).astype(bool) for a in anns]))
        if len(out) == n_images:
            break
    return out


def test_first_click_is_deepest_interior_point():
    gt = np.zeros((50, 80), bool)
    gt[10:41, 20:71] = True  # 31 x 51 box: deepest point on its centre row
    c = next_click(np.zeros_like(gt), gt)
    assert c is not None and c.positive and c.y == 25 and 35 <= c.x <= 55
    # a false positive blob bigger than the missing part gives a negative click in it
    pred = gt.copy()
    pred[0:10, 0:20] = True
    pred[0:10, 20:30] = True
    pred[10:12, 20:22] = False
    c2 = next_click(pred, gt)
    assert c2 is not None and not c2.positive and not gt[c2.y, c2.x]
    assert next_click(gt, gt) is None


def test_oracle_reaches_iou_one_and_useless_model_spends_twenty(shared_data):
    for img, objects in _real_objects(shared_data):
        oracle = OracleSegmenter(objects)
        oracle.set_image(img)
        empty = EmptySegmenter()
        empty.set_image(img)
        for gt in objects[:5]:
            r = run_clicker(oracle, gt, ClickerConfig(target_iou=1.0))
            assert r.final_iou == 1.0 and r.reached and r.n_clicks <= 3
            u = run_clicker(empty, gt, ClickerConfig(target_iou=0.9))
            assert u.n_clicks == 20 and not u.reached and u.final_iou == 0.0
            assert all(c.positive for c in u.clicks)  # always the missed object
            assert clicks_to_iou(u.ious, 0.5) == 20 and clicks_to_iou(r.ious, 0.5) == r.n_clicks


def test_disc_reference_improves_with_clicks(shared_data):
    img, objects = _real_objects(shared_data, 1)[0]
    discs = DiscSegmenter(radius=10)
    discs.set_image(img)
    gt = max(objects, key=lambda m: m.sum())
    r = run_clicker(discs, gt, ClickerConfig(target_iou=0.99, max_clicks=10))
    assert r.n_clicks == 10 and r.ious[-1] > r.ious[0] > 0
    assert iou_at(r.ious, 1) == r.ious[0] and iou_at(r.ious, 50) == r.ious[-1]


def test_sam_in_the_loop_records_clicks_and_feeds_back_logits(shared_data):
    from dataengine.models.sam import build_sam

    img, objects = _real_objects(shared_data, 1)[0]
    seg = SamSegmenter(build_sam("tiny-test"), disc_radius=10)
    seg.set_image(img)
    r = run_clicker(seg, objects[0], ClickerConfig(target_iou=0.9, max_clicks=4))
    assert 1 <= r.n_clicks <= 4 and len(r.ious) == r.n_clicks == len(r.scores)
    assert r.mask.shape == objects[0].shape
    # the low-res logits of the previous click come back as the mask prompt
    pred = seg.predict(r.clicks[:1])
    assert pred.state.shape == (1, 32, 32)
    # cached embedding path gives the same answer as computing it
    feats = seg.predictor.features.numpy()[0]
    cached = SamSegmenter(seg.model, embeddings=lambda key, image: (
        feats, seg.predictor.input_size, img.shape[:2]))
    cached.set_image(img, key="k")
    again = cached.predict(r.clicks[:1])
    plain = SamSegmenter(seg.model)
    plain.set_image(img)
    assert (plain.predict(r.clicks[:1]).mask == again.mask).all()


def test_paint_first_off_keeps_the_first_click_point_only(shared_data):
    """``paint_first=False``: the first click is SAM's own point prompt (multimask, best score),
    the corrections are painted: what a model trained with ``paint_first_prob`` 0 saw."""
    from dataengine.models.sam import build_sam

    img, objects = _real_objects(shared_data, 1)[0]
    model = build_sam("tiny-test", seed=2)
    corr = SamSegmenter(model, disc_radius=10, paint_first=False)
    plain, painted = SamSegmenter(model), SamSegmenter(model, disc_radius=10)
    for s in (corr, plain, painted):
        s.set_image(img)
    first = [Click(40, 30, True)]
    a, b, c = corr.predict(first), plain.predict(first), painted.predict(first)
    assert (a.mask == b.mask).all() and a.score == b.score
    assert not (a.mask == c.mask).all() or a.score != c.score
    both = first + [Click(10, 10, False)]
    a2, c2 = corr.predict(both, a.state), painted.predict(both, a.state)
    assert (a2.mask == c2.mask).all() and a2.score == c2.score  # corrections: painted alike


def test_paint_helpers():
    m = paint_discs((20, 20), [Click(5, 5, True), Click(6, 5, False)], radius=2)
    assert not m[5, 6] and m[5, 3]
    logits = click_disc_logits(None, [Click(64, 64, True)], (128, 128), 128, radius=8)
    assert logits.shape == (1, 32, 32) and logits[0, 16, 16] == 10.0 and logits[0, 0, 0] == 0
    with pytest.raises(ValueError, match="target_iou"):
        ClickerConfig(target_iou=0)
