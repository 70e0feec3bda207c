"""Shipped starting checkpoints (models/weights.py): written as float16 safetensors with a
provenance record, loaded only when the sha256 matches; every checkpoint in models/weights/
loads into its registry config, stays within 8 MB, and on 4 fixed synthetic scenes follows the
clicked shape on the image but not on a blank image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataengine.models.sam import build_sam
from dataengine.models.weights import (WEIGHTS_DIR, file_sha256, load_shipped, shipped_names,
                                       write_shipped)
from dataengine.pipeline.sam.loss import RecipeConfig
from dataengine.pipeline.sam.procedural import ProceduralConfig, generate


def test_written_checkpoint_loads_and_a_changed_file_is_refused(tmp_path):
    model = build_sam("tiny-hq-test", seed=1, device="cpu")
    path = write_shipped(model, "start", {"model": "tiny-hq-test", "seed": 1, "steps": 0},
                         tmp_path)
    assert shipped_names(tmp_path) == ["start"]
    name, state, info = load_shipped("start", tmp_path)
    assert name == "tiny-hq-test" and info["sha256"] == file_sha256(path)
    loaded = build_sam(name, state, seed=None, device="cpu")
    for k, v in model.state_dict().items():
        w = loaded.state_dict()[k]
        assert w.dtype == v.dtype
        if v.is_floating_point():
            assert torch.allclose(w, v.half().float())
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_shipped("start", tmp_path)


@pytest.mark.parametrize("name", shipped_names())
def test_shipped_checkpoint_loads_and_matches_its_provenance(name):
    model_name, state, info = load_shipped(name)
    assert (WEIGHTS_DIR / f"{name}.safetensors").stat().st_size <= 8 * 1024 * 1024
    for key in ("seed", "steps", "data", "wall_seconds", "command", "recipe"):
        assert key in info, key
    build_sam(model_name, state, seed=None, device="cpu")


def _easy_scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    """4 fixed scenes of a few large flat shapes; the largest visible shape of each."""
    cfg = ProceduralConfig(level=0.0, shape_weights={"ellipse": 1, "polygon": 1, "blob": 1,
                                                     "rect": 1},
                           fill_weights={"flat": 1.0}, photo_background_prob=0.0,
                           multipart_prob=0.0, low_contrast_prob=0.0, shading_prob=0.0,
                           blur_max=0.0, noise_max=2.0)
    out = []
    for i in range(4):
        img, masks = generate(123, i, cfg)
        out.append((img, max(masks, key=lambda m: m.sum())))
    return out


@pytest.mark.parametrize("name", shipped_names())
def test_shipped_checkpoint_follows_shape_boundaries_only_on_the_image(name):
    """One click at the deepest point of a flat shape: the mask follows the shape (mean IoU
    >= 0.7) on the image, and not on a blank grey image with the same click."""
    from dataengine.pipeline.sam.clicker import Click, SamSegmenter, mask_iou, next_click

    model_name, state, info = load_shipped(name)
    model = build_sam(model_name, state, seed=None, device="cpu")
    recipe = RecipeConfig(**info["recipe"])
    seg = SamSegmenter(model, disc_radius=recipe.click_radius if recipe.paint_clicks else 0.0,
                       paint_first=recipe.paints_first)
    real, blank = [], []
    for img, gt in _easy_scenes():
        click = next_click(np.zeros_like(gt), gt)
        assert isinstance(click, Click) and click.positive
        for image, ious in ((img, real), (np.full_like(img, 128), blank)):
            seg.set_image(image)
            ious.append(mask_iou(seg.predict([click]).mask, gt))
    assert np.mean(real) >= 0.7, real
    assert np.mean(blank) < 0.5, blank


def test_engine_init_shipped_is_a_valid_start():
    from dataengine.pipeline.engine.config import EngineConfig
    from dataengine.pipeline.engine.loop import _shipped

    assert EngineConfig(init="shipped").init == "shipped"
    with pytest.raises(ValueError, match="random, checkpoint, shipped"):
        EngineConfig(init="best")
    names = shipped_names()
    if len(names) != 1:
        with pytest.raises((ValueError, FileNotFoundError)):
            _shipped(None)
    else:
        model_name, state, recipe = _shipped(None)
        assert model_name == load_shipped(names[0])[0] and state and "click_radius" in recipe
