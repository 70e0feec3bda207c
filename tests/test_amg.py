"""pipeline/amg.py: same masks as Meta's SamAutomaticMaskGenerator with the same weights and
settings (random tiny-test weights, so the filters are opened to let candidates through)."""

from __future__ import annotations

import numpy as np
import pytest

from dataengine.pipeline.core import masks as M
from dataengine.pipeline.sam.amg import AmgConfig, MaskGenerator, official_generate


def _image(shared_data) -> np.ndarray:
    from PIL import Image

    path = sorted((shared_data / "coco-mini/val2017").glob("*.jpg"))[0]
    im = Image.open(path).convert("RGB")
    im.thumbnail((200, 200))
    return np.asarray(im)


@pytest.mark.parametrize("extra", [{}, {"crop_n_layers": 1, "min_mask_region_area": 30}])
def test_matches_official_generator(shared_data, extra):
    from dataengine.models.sam import build_sam

    model = build_sam("tiny-test", seed=0)
    img = _image(shared_data)
    cfg = AmgConfig(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                    max_area_fraction=1.0, **extra)
    ours = MaskGenerator(model, cfg).generate(img)
    ref = official_generate(model, img, cfg)
    assert len(ours) == len(ref) > 0
    iou = M.iou_matrix([o["segmentation"] for o in ours],
                       [M.encode(r["segmentation"]) for r in ref])
    assert (iou.max(axis=1) >= 0.99).all() and (iou.max(axis=0) >= 0.99).all()
    for o in ours:  # SA-1B fields
        assert set(o) >= {"segmentation", "bbox", "area", "predicted_iou", "stability_score",
                          "point_coords", "crop_box"}
        assert o["area"] == M.area(o["segmentation"])
    # near-whole-image masks are dropped when asked
    cfg.max_area_fraction = 0.2
    small = MaskGenerator(model, cfg).generate(img)
    assert all(o["area"] <= 0.2 * img.shape[0] * img.shape[1] for o in small)


def test_cached_features_give_the_same_masks(shared_data):
    from dataengine.models.sam import build_sam
    from dataengine.pipeline.sam.embeddings import compute_embeddings

    model = build_sam("tiny-test", seed=0)
    img = _image(shared_data)
    cfg = AmgConfig(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    emb = compute_embeddings(model, [img])[0]
    a = MaskGenerator(model, cfg).generate(img, features=emb.features)
    b = MaskGenerator(model, cfg).generate(img, features=emb.features)
    assert [x["segmentation"] for x in a] == [x["segmentation"] for x in b] and a
    with pytest.raises(ValueError, match="points_per_side"):
        AmgConfig(points_per_side=0)


def test_disc_prompts_match_a_painted_mask_prompt(shared_data):
    """With ``disc_radius`` each grid point is prompted as models trained with painted clicks
    are: point token + the disc in the mask prompt, single-mask output (the same prompt and
    output SamPredictor gives with the painted logits as ``mask_input``); without it, SAM's
    point-only prompt with three outputs."""
    import torch
    from segment_anything import SamPredictor

    from dataengine.models.sam import build_sam
    from dataengine.pipeline.sam.prompts import paint_clicks

    model = build_sam("tiny-test", seed=1)
    img = _image(shared_data)
    cfg = dict(points_per_side=1, pred_iou_thresh=0.0, stability_score_thresh=0.0,
               max_area_fraction=1.0, box_nms_thresh=1.0)
    painted = MaskGenerator(model, AmgConfig(disc_radius=12.0, **cfg)).generate(img)
    plain = MaskGenerator(model, AmgConfig(**cfg)).generate(img)
    pred = SamPredictor(model)
    pred.set_image(img)
    h, w = img.shape[:2]
    pt = np.array([[w / 2, h / 2]])
    tp = torch.as_tensor(pred.transform.apply_coords(pt, (h, w)), dtype=torch.float32)
    disc = paint_clicks(None, tp[None], torch.ones(1, 1, dtype=torch.long),
                        model.image_encoder.img_size, 12.0)
    with torch.inference_mode():
        masks, scores, _ = pred.predict(pt, np.array([1]), mask_input=disc[0].numpy(),
                                        multimask_output=False)
    assert len(painted) == 1 and len(plain) == 3
    assert round(painted[0]["predicted_iou"], 4) == round(float(scores[0]), 4)
    assert M.iou_matrix([painted[0]["segmentation"]], [M.encode(masks[0])])[0, 0] >= 0.99
    assert sorted(round(o["predicted_iou"], 4) for o in painted) != \
        sorted(round(o["predicted_iou"], 4) for o in plain)
    with pytest.raises(ValueError, match="disc_radius"):
        AmgConfig(disc_radius=-1.0)
