"""Pre-training a small SAM (pipeline/sam/pretrain.py): exact copy-paste composites, the MAE,
composite and procedural losses fall on a fixed batch, and the Ray Train stage publishes a
version that records its seed, steps, data and wall time."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dataengine.models.sam import build_sam
from dataengine.models.sam_small import MaeHead
from dataengine.pipeline.core import storage
from dataengine.pipeline.core.checkpoints import load_sam
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.trainer import ScaleConfig
from dataengine.pipeline.sam.loss import RecipeConfig
from dataengine.pipeline.sam.pretrain import (CopyPasteConfig, PretrainModule, PretrainSamConfig,
                                              composite_batch, copy_paste, mae_loss, pretrain_sam,
                                              pretrain_step)
from dataengine.pipeline.sam.training_data import Sample
from tests.sam_corpus import build_corpus

RED = np.array([255, 0, 0], np.uint8)


def _donor() -> Sample:
    img = np.zeros((60, 80, 3), np.uint8)
    img[:] = (0, 0, 255)
    yy, xx = np.mgrid[0:60, 0:80]
    m = (xx - 40) ** 2 / 400 + (yy - 30) ** 2 / 225 <= 1
    img[m] = RED
    return Sample("donor", "s", img, [m], ["donor/1"])


def _target() -> Sample:
    img = np.full((96, 128, 3), 40, np.uint8)
    m = np.zeros((96, 128), bool)
    m[20:80, 30:100] = True
    img[m] = (0, 200, 0)
    return Sample("target", "s", img, [m], ["target/1"])


def test_copy_paste_masks_are_exact():
    donor, target = _donor(), _target()
    for seed in range(6):
        comp, pasted = copy_paste(target, [donor], random.Random(seed),
                                  CopyPasteConfig(max_objects=3, min_kept_area=1))
        assert pasted and len(comp.masks) == len(comp.mask_ids)
        union = np.zeros(comp.image.shape[:2], bool)
        for i in pasted:
            m = comp.masks[i]
            assert m.any()
            # every pixel of a pasted mask is an object (red) pixel; later pastes may cover it
            assert (comp.image[m] == RED).all()
            union |= m
        # nothing outside the pasted objects changed
        assert (comp.image[~union] == target.image[~union]).all()
        # masks never overlap; the target's object lost exactly the covered pixels
        stack = np.stack(comp.masks).astype(int)
        assert stack.sum(0).max() <= 1
        if 0 not in pasted and len(comp.masks) > len(pasted):
            assert (comp.masks[0] == (target.masks[0] & ~union)).all()
        assert comp.image.dtype == np.uint8 and comp.image.shape == target.image.shape


def test_composite_batch_puts_pasted_masks_in_the_model_frame():
    cfg = PretrainSamConfig(model="tiny-conv-test", masks_per_image=3)
    batch = composite_batch([_target(), _target()], [_donor()], random.Random(0), cfg, 128,
                            (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert batch.images.shape == (2, 3, 128, 128)
    assert batch.masks.shape == (2, 3, 128, 128) and batch.mask_valid[:, 0].all()
    assert batch.sizes.tolist() == [[96, 128], [96, 128]]


def _fixed_batch():
    cfg = PretrainSamConfig(model="tiny-conv-test", masks_per_image=2)
    return composite_batch([_target(), _target()], [_donor()], random.Random(1), cfg, 128,
                           (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


def test_mae_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    sam = build_sam("tiny-conv-test", device="cpu")
    head = MaeHead(64)
    batch = _fixed_batch()
    params = list(sam.image_encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)
    sam.train()
    losses = []
    for _ in range(12):
        loss = mae_loss(sam.image_encoder, head, batch.images, batch.sizes, 0.5,
                        torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_copy_paste_promptable_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    sam = build_sam("tiny-conv-test", device="cpu")
    module = PretrainModule(sam, MaeHead(64), RecipeConfig(iterations=2, mask_only_iterations=1))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    batch = _fixed_batch()
    losses = [pretrain_step(module, opt, "seg", batch, torch.Generator().manual_seed(0))["loss"]
              for _ in range(10)]
    assert min(losses[-3:]) < 0.8 * losses[0], losses
    with pytest.raises(ValueError, match="kind='x'"):
        module("x", batch)


def test_procedural_phase_trains_on_generated_scenes_with_the_prototype_loss():
    """The procedural phase's batches come from the generator (a pure function of the step)
    and its loss, with the dense prototype loss of a matching model, falls."""
    from dataengine.pipeline.sam.pretrain import phase_lr
    from dataengine.pipeline.sam.procedural import ProceduralConfig, scene_samples
    from dataengine.pipeline.sam.training_data import make_batch

    cfg = PretrainSamConfig(mae_steps=1, procedural_steps=2, copypaste_steps=1)
    assert [phase_lr(k, cfg)[0] for k in range(4)] == ["mae", "proc", "proc", "seg"]
    pcfg = ProceduralConfig(size=128, level=0.0)
    a, b = scene_samples(0, 5, 2, pcfg), scene_samples(0, 5, 2, pcfg)
    assert [s.key for s in a] == [s.key for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    torch.manual_seed(0)
    sam = build_sam("tiny-hq-test", device="cpu")
    module = PretrainModule(sam, MaeHead(64), RecipeConfig(iterations=2, mask_only_iterations=1),
                            proto_loss_weight=1.0)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    mean = tuple(float(v) for v in sam.pixel_mean.flatten())
    std = tuple(float(v) for v in sam.pixel_std.flatten())
    batch = make_batch(a, 128, mean, std, 2, rng=random.Random(0))
    stats = [pretrain_step(module, opt, "proc", batch, torch.Generator().manual_seed(0))
             for _ in range(10)]
    assert "proto_loss" in stats[0]
    assert min(s["loss"] for s in stats[-3:]) < 0.8 * stats[0]["loss"], stats


def test_config_validation():
    with pytest.raises(ValueError, match="mask_ratio"):
        PretrainSamConfig(mask_ratio=1.5)
    with pytest.raises(ValueError, match="mae_steps \\+ procedural_steps \\+ copypaste_steps"):
        PretrainSamConfig(mae_steps=0, copypaste_steps=0)
    with pytest.raises(ValueError, match="procedural_level_end"):
        PretrainSamConfig(procedural_level_end=2.0)
    with pytest.raises(ValueError, match="prototype matching"):
        PretrainSamConfig(model="tiny-conv", proto_loss_weight=1.0)
    with pytest.raises(ValueError, match="init='best'"):
        PretrainSamConfig(init="best")
    with pytest.raises(ValueError, match="max_objects"):
        CopyPasteConfig(max_objects=0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pretrain_sam_on_ray_train_publishes_a_startable_version(ray_cluster, tmp_path):
    from dataengine.pipeline.sam.evaluate import trained_disc_radius, trained_paint_first

    root = str(tmp_path / "corpus")
    info = build_corpus(root, shards=2, per_shard=4)
    cfg = PretrainSamConfig(model="tiny-conv-test", mae_steps=2, procedural_steps=1,
                            copypaste_steps=2, seed=3,
                            batch_images=2, masks_per_image=2, checkpoint_every=2, log_every=1,
                            recipe=RecipeConfig(iterations=2, mask_only_iterations=1,
                                                paint_first_prob=0.0),
                            scale=ScaleConfig(num_workers=1, cpus_per_worker=0.5,
                                              torch_threads=1))
    out = pretrain_sam(root, cfg)
    corpus = Corpus(root)
    vdir = corpus.model_dir("sam", out["version"])
    assert out["steps"] == 5
    published = storage.read_json(storage.join(vdir, "version.json"))
    assert published["seed"] == 3 and published["steps"] == 5
    assert published["wall_seconds"] > 0
    assert published["data"]["procedural_steps"] == 1
    assert published["data"]["corpus"]["images"] == len(info["train"])
    training = storage.read_json(storage.join(vdir, "training.json"))
    assert training["kind"] == "pretrain" and training["rounds"] == [0]
    phases = [h["phase"] for h in storage.read_json(storage.join(vdir, "metrics.json"))["history"]]
    assert phases == ["mae", "mae", "proc", "seg", "seg"]
    assert training["data"]["images"] == len(info["train"])   # held-out images never planned
    model = load_sam(vdir, device="cpu")
    assert model.sam_config.name == "tiny-conv-test"
    assert trained_disc_radius(corpus, out["version"]) == RecipeConfig().click_radius
    assert trained_paint_first(corpus, out["version"]) is False
