"""The promptable-segmentation recipe: painted clicks, prompts, and a falling loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataengine.models.sam import build_sam
from dataengine.pipeline.sam import clicker
from dataengine.pipeline.sam.loss import (Batch, RecipeConfig, SamLossModule, dice_loss, focal_loss,
                                          iteration_plan, noisy_boxes, promptable_loss, train_step)
from dataengine.pipeline.sam.prompts import paint_clicks


def synthetic_batch(size: int = 128, n_images: int = 2, n_masks: int = 3, seed: int = 0) -> Batch:
    """Images of coloured rectangles/ellipses on noise; the shapes are the ground truth."""
    rng = np.random.default_rng(seed)
    images = torch.zeros(n_images, 3, size, size)
    masks = torch.zeros(n_images, n_masks, size, size, dtype=torch.bool)
    yy, xx = np.mgrid[0:size, 0:size]
    h = size * 3 // 4  # resized image height inside the padded square
    for b in range(n_images):
        img = rng.normal(0, 0.3, (3, size, size)).astype(np.float32)
        for m in range(n_masks):
            cx, cy = rng.integers(20, size - 20), rng.integers(20, h - 20)
            rx, ry = rng.integers(8, 20), rng.integers(8, 20)
            shape = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1 if m % 2 else \
                (abs(xx - cx) <= rx) & (abs(yy - cy) <= ry)
            shape &= yy < h
            for other in range(m):
                masks[b, other] &= ~torch.from_numpy(shape)
            masks[b, m] = torch.from_numpy(shape)
            img[:, shape] = rng.normal(0, 1.5, 3)[:, None].astype(np.float32)
        img[:, h:] = 0
        images[b] = torch.from_numpy(img)
    valid = masks.flatten(2).any(2)
    return Batch(images, masks, valid, torch.tensor([[h, size]] * n_images))


def test_paint_clicks_matches_the_clicker():
    clicks = [clicker.Click(40, 30, True), clicker.Click(44, 30, False)]
    ref = clicker.click_disc_logits(None, clicks, (128, 128), 128, radius=10, value=10)
    coords = torch.tensor([[[40, 30], [44, 30]]])
    labels = torch.tensor([[1, 0]])
    ours = paint_clicks(None, coords, labels, 128, radius=10, value=10)
    assert np.array_equal(ours[0].numpy(), ref)
    assert (ours > 0).any() and (ours < 0).any()
    # padding labels (-1) paint nothing
    assert not paint_clicks(None, coords, torch.tensor([[-1, -1]]), 128).any()


def test_iteration_plan_and_boxes():
    cfg = RecipeConfig()
    plan = iteration_plan(cfg, torch.Generator().manual_seed(0))
    assert len(plan) == 10 and plan[-1] is False and plan.count(False) == 2
    m = torch.zeros(1, 64, 64, dtype=torch.bool)
    m[0, 10:20, 30:50] = True
    box = noisy_boxes(m, 0.0, 20, 64)
    assert box.tolist() == [[30.0, 10.0, 49.0, 19.0]]
    with pytest.raises(ValueError, match="mask_only_iterations"):
        RecipeConfig(iterations=3, mask_only_iterations=3)
    with pytest.raises(ValueError, match="box_prob"):
        RecipeConfig(box_prob=1.5)


def test_losses_are_zero_for_perfect_logits():
    t = torch.zeros(1, 8, 8)
    t[0, 2:5, 2:5] = 1
    logits = (t * 2 - 1) * 50
    assert float(focal_loss(logits, t)) < 1e-6
    assert float(dice_loss(logits, t)) < 0.05


@pytest.mark.parametrize("paint", [True, False])
def test_loss_is_finite_and_backprops(paint):
    sam = build_sam("tiny-test", seed=0)
    sam.train()
    batch = synthetic_batch()
    out = promptable_loss(sam, batch, RecipeConfig(iterations=4, mask_only_iterations=1,
                                                   paint_clicks=paint),
                          generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert sam.mask_decoder.iou_token.weight.grad is not None
    assert sam.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert out.stats["masks"] == int(batch.mask_valid.sum())


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    sam = build_sam("tiny-test", seed=0)
    module = SamLossModule(sam, RecipeConfig(iterations=3, mask_only_iterations=1))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    batch = synthetic_batch()
    losses = []
    for step in range(40):
        stats = train_step(module, opt, batch, generator=torch.Generator().manual_seed(step % 4))
        losses.append(stats["loss"])
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.7 * first, (first, last)


def test_frozen_encoder_gets_no_gradient():
    sam = build_sam("tiny-test", seed=0)
    module = SamLossModule(sam, RecipeConfig(iterations=2, mask_only_iterations=0),
                           freeze_encoder=True)
    before = sam.image_encoder.patch_embed.proj.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    train_step(module, opt, synthetic_batch())
    assert torch.equal(before, sam.image_encoder.patch_embed.proj.weight)
    assert sam.image_encoder.patch_embed.proj.weight.grad is None


def test_batch_without_masks_steps_and_logs():
    """A batch whose images have no usable mask still steps (zero loss, so DDP workers stay in
    lockstep) and the logged window averages only the batches that had prompts (a run on the
    real corpus died here with KeyError 'focal' before)."""
    from dataengine.pipeline.sam.train import window_stats

    sam = build_sam("tiny-test", seed=0)
    module = SamLossModule(sam, RecipeConfig(iterations=3, mask_only_iterations=1))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    full = synthetic_batch()
    empty = Batch(full.images, full.masks, torch.zeros_like(full.mask_valid), full.sizes)
    gen = torch.Generator().manual_seed(0)
    s_empty = train_step(module, opt, empty, generator=gen)
    s_full = train_step(module, opt, full, generator=gen)
    assert s_empty["masks"] == 0 and s_full["masks"] == int(full.mask_valid.sum())
    logged = window_stats([s_empty, s_full])
    assert logged["empty_batches"] == 1
    assert logged["loss"] == pytest.approx(s_full["loss"])
    assert logged["iou_first"] == pytest.approx(s_full["iou_first"])
    assert window_stats([s_empty])["loss"] is None


def test_recipe_knobs_deep_clicks_free_passes_low_res_loss_and_aux_loss():
    """Deepest-point clicks land inside the region, gradient-free passes run without loss,
    the loss can be taken on the low-res logits, and an aux loss on the embeddings is added."""
    from dataengine.pipeline.sam.loss import deepest_points

    region = torch.zeros(2, 32, 32, dtype=torch.bool)
    region[0, 4:20, 6:14] = True
    xy, found = deepest_points(region)
    assert found.tolist() == [True, False]
    # as far from the boundary as possible: the middle column of the 8 px wide strip
    assert region[0, xy[0, 1], xy[0, 0]] and 9 <= xy[0, 0] <= 10 and 7 <= xy[0, 1] <= 16

    sam = build_sam("tiny-test", seed=0)
    sam.train()
    batch = synthetic_batch()
    calls = []

    def aux(feats, gt, img_idx):
        calls.append((feats.shape[0], gt.shape[0], img_idx.shape[0]))
        return feats.pow(2).mean() * 0 + 1.0, {"aux": 1.0}

    cfg = RecipeConfig(iterations=2, mask_only_iterations=0, deep_click_prob=1.0,
                       free_passes_max=2, loss_size=32)
    base = promptable_loss(sam, batch, cfg, generator=torch.Generator().manual_seed(0))
    out = promptable_loss(sam, batch, cfg, generator=torch.Generator().manual_seed(0),
                          aux_loss=aux)
    assert calls and out.stats["aux"] == 1.0
    assert float(out.loss) == pytest.approx(float(base.loss) + 1.0, rel=1e-5)
    assert 2 <= out.stats["passes"] <= 4
    with pytest.raises(ValueError, match="free_passes_max"):
        RecipeConfig(free_passes_max=-1)
