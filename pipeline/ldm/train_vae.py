"""``dataengine train-vae``: the first-stage KL autoencoder, versioned under ``models/vae/vNNNN/``.

When no pretrained autoencoder is given (``pretrained``: a local diffusers folder or a
diffusers-layout ``.safetensors`` with ``vae=sd-kl-f8``), a registry VAE (default ``tiny-f4``) is
trained on the corpus' train-split images (images curation leaves out excluded) with Ray Train (DDP
through :mod:`dataengine.pipeline.core.trainer`): reconstruction L1 + ``kl_weight`` * KL, and an
optional patch discriminator (hinge loss) switched on after ``disc_start`` steps.

The published version holds ``vae/`` (diffusers ``save_pretrained``; its ``scaling_factor`` is the
measured latent scale), ``metrics.json`` (``scale_factor`` = 1 / std of latents measured on a
sample of training images, as Stable Diffusion's 0.18215; ``psnr`` of reconstructions on held-out
images) and ``version.json`` (written last).

One machine::

    dataengine train-vae --root ROOT --set steps=600

Many nodes (Ray cluster; checkpoints on the corpus storage)::

    ray job submit --working-dir . -- python -m dataengine train-vae --root s3://bucket/corpus \
        --set scale.num_workers=4 --set scale.use_gpu=true
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dataengine.pipeline.core import storage, trainer, versions
from dataengine.pipeline.core.layout import Corpus

logger = logging.getLogger(__name__)


@dataclass
class TrainVaeConfig:
    """Settings of ``dataengine train-vae``."""

    vae: str = "tiny-f4"               # registry config (dataengine.models.ldm.VAE_CONFIGS)
    pretrained: str = ""               # local diffusers folder / .safetensors: skip training
    resolution: int = 64
    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    kl_weight: float = 1e-6
    disc_weight: float = 0.0           # > 0 switches on the patch discriminator ...
    disc_start: int = 500              # ... after this many steps
    checkpoint_every: int = 200
    scale_samples: int = 128           # training images whose latents set the scale factor
    psnr_images: int = 64              # held-out images for the reconstruction PSNR
    shuffle_buffer: int = 256
    seed: int = 0
    run_name: str = ""                 # default vae-<version>; same name = resume
    scale: trainer.ScaleConfig = field(default_factory=lambda: trainer.ScaleConfig(
        cpus_per_worker=1.0))

    def __post_init__(self) -> None:
        from dataengine.models.ldm import VAE_CONFIGS

        if isinstance(self.scale, dict):
            self.scale = trainer.ScaleConfig(**self.scale)
        if self.vae not in VAE_CONFIGS:
            raise ValueError(f"vae={self.vae!r}: one of {sorted(VAE_CONFIGS)}")
        for name in ("resolution", "steps", "batch_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if self.resolution % 8:
            raise ValueError(f"resolution={self.resolution}: must be a multiple of 8")
        if self.lr <= 0 or self.kl_weight < 0 or self.disc_weight < 0:
            raise ValueError(f"lr={self.lr}, kl_weight={self.kl_weight}, disc_weight="
                             f"{self.disc_weight}: lr > 0, weights >= 0")


class PatchDiscriminator(torch.nn.Module):
    """A small PatchGAN (pix2pix / taming-transformers NLayerDiscriminator): ``Bx3xHxW`` ->
    ``Bx1xhxw`` real/fake logits per patch."""

    def __init__(self, channels: int = 32, layers: int = 3) -> None:
        super().__init__()
        seq: list[torch.nn.Module] = [torch.nn.Conv2d(3, channels, 4, 2, 1),
                                      torch.nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(layers - 1):
            seq += [torch.nn.Conv2d(c, c * 2, 4, 2, 1), torch.nn.GroupNorm(8, c * 2),
                    torch.nn.LeakyReLU(0.2)]
            c *= 2
        seq.append(torch.nn.Conv2d(c, 1, 3, 1, 1))
        self.net = torch.nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def vae_losses(vae, images: torch.Tensor, kl_weight: float,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float],
                                                                  torch.Tensor]:
    """(loss, parts, reconstruction) of L1 + ``kl_weight`` * KL for a batch in [-1, 1]."""
    dist = vae.encode(images).latent_dist
    z = dist.sample(generator=generator)
    rec = vae.decode(z).sample
    l1 = (rec - images).abs().mean()
    kl = dist.kl().mean() / images[0].numel()
    return l1 + kl_weight * kl, {"l1": float(l1.detach()), "kl": float(kl.detach())}, rec


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-12))


# --------------------------------------------------------------------------- worker loop
def _train_loop(config: dict[str, Any]) -> None:
    from dataengine.models.ldm import build_vae
    from dataengine.pipeline.ldm.images import image_stream

    cfg = TrainVaeConfig(**{k: v for k, v in config["cfg"].items()})
    ctx = trainer.context(config)
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker
    vae = build_vae(cfg.vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    models: dict[str, torch.nn.Module] = {"vae": vae}
    opts: dict[str, torch.optim.Optimizer] = {"opt": opt}
    disc = None
    if cfg.disc_weight > 0:
        disc = PatchDiscriminator()
        models["disc"] = disc
        opts["disc_opt"] = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    state = trainer.restore(models=models, optimizers=opts)
    start = int(state["step"]) + 1 if state else 0
    vae = trainer.prepare(vae)
    if disc is not None:
        disc = trainer.prepare(disc)
    batches = image_stream(config["shards"], cfg.resolution, cfg.batch_size, rank=ctx.rank,
                           world=ctx.world_size, seed=cfg.seed + start, split="train",
                           exclude=set(config["rejected"]), buffer=cfg.shuffle_buffer)
    g = torch.Generator().manual_seed(cfg.seed * 7919 + ctx.rank + start)
    t0 = time.time()
    for step in range(start, cfg.steps):
        images = next(batches).to(ctx.device)
        with trainer.autocast(ctx.device):
            loss, parts, rec = vae_losses(vae, images, cfg.kl_weight, g)
            if disc is not None and step >= cfg.disc_start:
                loss = loss - cfg.disc_weight * disc(rec).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if disc is not None and step >= cfg.disc_start:
            d_loss = (torch.relu(1 - disc(images)).mean()
                      + torch.relu(1 + disc(rec.detach())).mean())
            opts["disc_opt"].zero_grad(set_to_none=True)
            d_loss.backward()
            opts["disc_opt"].step()
            parts["disc"] = float(d_loss.detach())
        last = step == cfg.steps - 1
        ckpt = last or (step + 1) % cfg.checkpoint_every == 0
        metrics = {"step": step, "loss": float(loss.detach()), **parts,
                   "images_per_s": (step + 1 - start) * cfg.batch_size * ctx.world_size
                   / max(time.time() - t0, 1e-9)}
        if ckpt or step % 10 == 0:
            trainer.report(metrics, models=models if ckpt else None,
                           optimizers=opts if ckpt else None, extra={"step": step})


# --------------------------------------------------------------------------- driver side
def _publish(corpus: Corpus, version: str, vae, info: dict[str, Any]) -> str:
    """Write ``models/vae/<version>/``: ``vae/`` (diffusers), ``metrics.json``, ``version.json``."""
    d = corpus.model_dir("vae", version)
    with tempfile.TemporaryDirectory() as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        for name in sorted(os.listdir(tmp)):
            storage.put_file(os.path.join(tmp, name), storage.join(d, "vae", name))
    storage.write_json(storage.join(d, "metrics.json"), info)
    versions.publish_version(corpus, "vae", version, **info)
    return d


def load_vae_version(root: str, version: str | None = None) -> tuple[Any, dict[str, Any]]:
    """(AutoencoderKL in eval mode, version info) of a published VAE version (newest if None);
    remote versions are copied to a local temporary folder first."""
    from dataengine.models.ldm import load_vae

    corpus = Corpus(root)
    root = corpus.root
    versions = corpus.model_versions("vae")
    if not version:
        if not versions:
            raise FileNotFoundError(f"{corpus.root}: no VAE version; run `dataengine train-vae`")
        version = versions[-1]
    if version not in versions:
        raise FileNotFoundError(f"VAE version {version!r} is not published in {corpus.root} "
                                f"(have {versions})")
    d = storage.join(corpus.model_dir("vae", version), "vae")
    info = storage.read_json(storage.join(corpus.model_dir("vae", version), "version.json"))
    if storage.is_local(d):
        vae = load_vae(storage.get_fs(d)[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for url in storage.listdir(d):
                with open(os.path.join(tmp, url.rsplit("/", 1)[-1]), "wb") as f:
                    f.write(storage.read_bytes(url))
            vae = load_vae(tmp)
    return vae.eval(), {**info, "version": version}


@torch.no_grad()
def measure(vae, root: str, cfg: TrainVaeConfig, shards: list[str]) -> dict[str, Any]:
    """Latent scale factor (1 / std on training images) and held-out reconstruction PSNR."""
    from dataengine.pipeline.ldm.images import image_batches

    vae.eval()
    zs = []
    for batch, _ in image_batches(shards, cfg.resolution, cfg.batch_size, split="train",
                                  limit=cfg.scale_samples):
        zs.append(vae.encode(batch).latent_dist.sample(
            generator=torch.Generator().manual_seed(cfg.seed)))
    if not zs:
        raise ValueError(f"{root}: no training images to measure the latent scale on")
    std = float(torch.cat(zs).std())
    psnr_split, values = "holdout", []
    for split in ("holdout", "train"):
        for batch, _ in image_batches(shards, cfg.resolution, cfg.batch_size, split=split,
                                      limit=cfg.psnr_images):
            rec = vae.decode(vae.encode(batch).latent_dist.mode()).sample
            values += [psnr(rec[i], batch[i]) for i in range(batch.shape[0])]
        if values:
            psnr_split = split
            break
        logger.warning("no held-out images in %s: PSNR measured on training images", root)
    return {"scale_factor": 1.0 / max(std, 1e-6), "latent_std": std,
            "psnr": float(np.mean(values)) if values else None, "psnr_split": psnr_split,
            "psnr_images": len(values)}


def train_vae(root: str, config: TrainVaeConfig | None = None) -> dict[str, Any]:
    """Train (or import with ``pretrained``) a VAE on corpus ``root`` and publish it as the next
    ``models/vae/vNNNN``; returns the version's info."""
    from dataengine.models.ldm import build_vae, load_vae, vae_factor
    from dataengine.pipeline.core.curation import excluded_image_keys

    cfg = config or TrainVaeConfig()
    corpus = Corpus(root)
    root = corpus.root
    shards = [corpus.image_shard(n) for n in corpus.image_shards()]
    if not shards:
        raise FileNotFoundError(f"{corpus.root}: no image shards; run `dataengine shard` first")
    version, _ = versions.claim_version(corpus, "vae")
    t0 = time.time()
    info: dict[str, Any] = {"config": _cfg_dict(cfg), "image_shards": len(shards)}
    if cfg.pretrained:
        vae = load_vae(cfg.pretrained, cfg.vae)
        info.update(source="pretrained", pretrained=cfg.pretrained)
    else:
        run = cfg.run_name or f"vae-{version}"
        rejected = sorted(excluded_image_keys(corpus))
        result = trainer.launch(_train_loop, {"cfg": _cfg_dict(cfg), "shards": shards,
                                              "rejected": rejected},
                                runs_url=corpus.runs, name=run, scale=cfg.scale)
        ckpt = trainer.checkpoint_files(result)
        if ckpt is None:
            raise RuntimeError(f"VAE run {run} ended without a checkpoint: {result.error}")
        from safetensors.torch import load_file

        vae = build_vae(cfg.vae)
        vae.load_state_dict(load_file(os.path.join(ckpt, "vae.safetensors")))
        with open(os.path.join(ckpt, "state.json")) as f:
            final = json.load(f)
        info.update(source="trained", run=storage.join(corpus.runs, run),
                    final_loss=final["metrics"].get("loss"), steps=cfg.steps,
                    train_images_per_s=final["metrics"].get("images_per_s"))
    info.update(measure(vae, root, cfg, shards))
    if cfg.pretrained and "scaling_factor" in vae.config:
        info["scale_factor_config"] = float(vae.config.scaling_factor)
    vae.register_to_config(scaling_factor=info["scale_factor"])
    info.update(factor=vae_factor(vae), latent_channels=int(vae.config.latent_channels),
                resolution=cfg.resolution, seconds=round(time.time() - t0, 1))
    _publish(corpus, version, vae, info)
    logger.info("vae %s: psnr %.2f dB (%s), scale %.4f", version, info["psnr"] or float("nan"),
                info["psnr_split"], info["scale_factor"])
    return {"version": version, **info}


def _cfg_dict(cfg: TrainVaeConfig) -> dict[str, Any]:
    from dataengine.pipeline.core.config import to_dict

    return to_dict(cfg)
