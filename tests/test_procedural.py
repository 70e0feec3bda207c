"""The procedural dead-leaves generator (pipeline/sam/procedural.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dataengine.pipeline.sam.procedural import DonorPool, ProceduralConfig, generate, generate_scene


def _pool() -> DonorPool:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (60, 80, 3), dtype=np.uint8) for _ in range(3)]
    masks = []
    for _ in images:
        m = np.zeros((60, 80), bool)
        m[10:40, 20:70] = True
        masks.append([m])
    return DonorPool.from_samples(images, masks, min_area=100)


@pytest.mark.parametrize("level", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("with_donors", [False, True])
def test_masks_partition_the_labelled_pixels(level, with_donors):
    cfg = ProceduralConfig(size=96, level=level, min_area=20)
    pool = _pool() if with_donors else None
    for index in range(4):
        scene = generate_scene(3, index, cfg, pool)
        assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
        assert scene.labels.max() == len(scene.masks)
        total = np.zeros((96, 96), int)
        for k, m in enumerate(scene.masks):
            assert m.dtype == bool and m.shape == (96, 96)
            assert m.sum() >= cfg.min_area
            # each mask is exactly its label: masks are disjoint and cover the labelled pixels
            assert np.array_equal(m, scene.labels == k + 1)
            total += m
        assert total.max() <= 1
        assert np.array_equal(total > 0, scene.labels > 0)


def test_occlusion_defines_the_masks():
    """A shape painted later owns the pixels it covers: the label map equals the painting
    order re-drawn from the masks, and an earlier shape never keeps a pixel of a later one."""
    cfg = ProceduralConfig(size=128, level=1.0, min_area=1, blur_max=0, noise_max=0,
                           shading_prob=0, multipart_prob=0,
                           fill_weights={"flat": 1.0})
    scene = generate_scene(0, 1, cfg)
    assert len(scene.masks) >= 5
    # with flat fills and no effects, every mask's pixels share one colour: visible parts only
    for m in scene.masks:
        colours = np.unique(scene.image[m].reshape(-1, 3), axis=0)
        assert len(colours) == 1


def test_deterministic_per_seed_and_index():
    cfg = ProceduralConfig(size=64)
    pool = _pool()
    a_img, a_masks = generate(5, 7, cfg, pool)
    b_img, b_masks = generate(5, 7, cfg, pool)
    assert np.array_equal(a_img, b_img)
    assert len(a_masks) == len(b_masks)
    assert all(np.array_equal(x, y) for x, y in zip(a_masks, b_masks))
    c_img, _ = generate(5, 8, cfg, pool)
    d_img, _ = generate(6, 7, cfg, pool)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_img, d_img)


def test_curriculum_level_gives_more_smaller_shapes():
    easy = ProceduralConfig(size=128, level=0.0, min_area=30)
    hard = ProceduralConfig(size=128, level=1.0, min_area=30)
    easy_masks = [generate(0, i, easy)[1] for i in range(10)]
    hard_masks = [generate(0, i, hard)[1] for i in range(10)]
    n_easy = np.mean([len(ms) for ms in easy_masks])
    n_hard = np.mean([len(ms) for ms in hard_masks])
    a_easy = np.mean([m.sum() for ms in easy_masks for m in ms])
    a_hard = np.mean([m.sum() for ms in hard_masks for m in ms])
    assert n_hard > n_easy and a_hard < a_easy


def test_config_is_validated():
    with pytest.raises(ValueError):
        ProceduralConfig(level=1.5)
    with pytest.raises(ValueError):
        ProceduralConfig(shape_weights={"cube": 1.0})
