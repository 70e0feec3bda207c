"""pipeline.ldm.train_vae: Ray Train VAE run (L1 + KL + patch discriminator) published as a version
with its latent scale factor and held-out PSNR; pretrained import; loss pieces."""

from __future__ import annotations

import math

import pytest
import torch

from dataengine.models.ldm import build_vae
from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.trainer import ScaleConfig
from dataengine.pipeline.ldm.train_vae import (PatchDiscriminator, TrainVaeConfig, load_vae_version,
                                               psnr, train_vae, vae_losses)
from tests.ldm_corpus import make_corpus


def test_psnr_and_losses():
    a = torch.zeros(3, 8, 8)
    assert psnr(a, a) > 100
    assert math.isclose(psnr(a, a + 0.2), 10 * math.log10(4 / 0.04), rel_tol=1e-4)
    vae = build_vae("test-f4")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss, parts, rec = vae_losses(vae, x, 1e-6)
    assert rec.shape == x.shape and parts["kl"] >= 0 and loss.requires_grad
    assert PatchDiscriminator()(x).shape[:2] == (2, 1)


def test_config_validation():
    with pytest.raises(ValueError, match="vae='big'"):
        TrainVaeConfig(vae="big")
    with pytest.raises(ValueError, match="resolution=60"):
        TrainVaeConfig(resolution=60)


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_train_vae_publishes_version_with_scale_and_psnr(ray_cluster, tmp_path):
    root = str(tmp_path / "corpus")
    make_corpus(root, shards=2, per_shard=6)
    cfg = TrainVaeConfig(vae="test-f4", resolution=32, steps=6, batch_size=4, checkpoint_every=3,
                         disc_weight=0.1, disc_start=3, scale_samples=16, psnr_images=8,
                         scale=ScaleConfig(cpus_per_worker=0.5))
    info = train_vae(root, cfg)
    corpus = Corpus(root)
    assert info["version"] == "v0001" and corpus.model_versions("vae") == ["v0001"]
    assert info["source"] == "trained" and info["psnr_split"] == "holdout"
    assert info["psnr_images"] == 3 and 0 < info["psnr"] < 100
    assert info["scale_factor"] == pytest.approx(1 / info["latent_std"])
    assert info["factor"] == 4 and info["latent_channels"] == 4
    ckpts = storage.listdir(storage.join(corpus.runs, "vae-v0001"), r"checkpoint_\d.*")
    assert ckpts and all(storage.exists(storage.join(c, "disc.safetensors")) for c in ckpts)
    vae, meta = load_vae_version(root)
    assert meta["version"] == "v0001"
    assert vae.config.scaling_factor == pytest.approx(info["scale_factor"])

    # a pretrained VAE is imported, measured and published as the next version, no training
    vae.save_pretrained(tmp_path / "pre")
    info2 = train_vae(root, TrainVaeConfig(vae="test-f4", pretrained=str(tmp_path / "pre"),
                                           resolution=32, scale_samples=8, psnr_images=4))
    assert info2["version"] == "v0002" and info2["source"] == "pretrained"
    assert info2["psnr"] == pytest.approx(info["psnr"], abs=1e-3)
