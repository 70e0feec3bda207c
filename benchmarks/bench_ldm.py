"""Latent diffusion on the real samples, one run on this machine.

Builds a corpus from ``../shared/data`` (coco128-seg + coco-mini train2017 for training, coco-mini
val2017 held out; round-0 masks with COCO categories, captions), then measures:

1. ``vae_psnr``: the tiny f=4 VAE trained with ``dataengine train-vae`` (Ray Train), held-out
   reconstruction PSNR at 64 px (floor 20 dB);
2. ``precompute_img_s``: ``dataengine latents`` (Ray actor pool) images/s;
3. ``latent_vs_online``: U-Net training samples/s from precomputed latent shards vs encoding the
   images with the same VAE on the fly (same U-Net, same batch, one process, same threads);
4. ``workers2_vs_1``: ``dataengine train-ldm`` samples/s with 2 Ray Train workers vs 1, torch
   threads per worker fixed to 1;
5. ``latent_vs_pixel``: training samples/s of the same-width U-Net on 16x16x4 latents (f=4) vs on
   64x64x3 pixels (the LDM paper's comparison; model cost on in-memory batches).

The 2-worker run is published as an LDM version; its sample grid path is printed.

    python benchmarks/bench_ldm.py [--data ../shared/data] [--root /tmp/bench-ldm]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# On a shared machine Ray's memory monitor kills the newest workers first when other programs
# fill the memory; this benchmark's own Ray tolerates a fuller node (override from the shell).
os.environ.setdefault("RAY_memory_usage_threshold", "0.98")
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])


def timed_steps(step, n: int, warmup: int = 2) -> float:
    """Seconds per call of ``step`` over ``n`` calls after ``warmup``."""
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def latent_vs_online(root: str, latents: str, vae, scale: float, batch: int, steps: int) -> dict:
    """Samples/s of U-Net training steps fed from latent shards vs from images + VAE encode."""
    from dataengine.models.ldm import (LatentDiffusion, LdmSpec, build_noise_scheduler,
                                       diffusion_loss, prompt_for, tokenize, train_tokenizer)
    from dataengine.pipeline.core import storage
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.ldm.images import image_stream
    from dataengine.pipeline.ldm.train_ldm import latent_stream

    corpus = Corpus(root)
    info = storage.read_json(storage.join(corpus.path("latents", latents), "dataset.json"))
    lat_shards = [storage.join(corpus.path("latents", latents), f"{s}.tar") for s in info["shards"]]
    img_shards = [corpus.image_shard(n) for n in corpus.image_shards()]
    spec = LdmSpec(unet="tiny", text="tiny", latent_size=16, conditions=["class", "caption"])
    tok = train_tokenizer(["a photo"], [1], vocab_size=200, max_length=spec.max_tokens)
    torch.manual_seed(0)
    model = LatentDiffusion(spec, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = build_noise_scheduler(spec)
    ids = tokenize(tok, [prompt_for(spec, [1], "a photo")] * batch, spec.max_tokens)
    lat_iter = latent_stream(lat_shards, spec, tok, batch_size=batch, scale=scale, rank=0,
                             world=1, seed=0, epoch_batches=10_000, buffer=64)
    img_iter = image_stream(img_shards, 64, batch, rank=0, world=1, seed=0, buffer=64)

    def train_on(z):
        loss = diffusion_loss(model, z, ids, None, sched)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def from_latents():
        train_on(next(lat_iter)["latents"])

    def online():
        with torch.no_grad():
            z = vae.encode(next(img_iter)).latent_dist.sample() * scale
        train_on(z)

    t_lat = timed_steps(from_latents, steps)
    t_onl = timed_steps(online, steps)
    return {"latent_samples_s": batch / t_lat, "online_samples_s": batch / t_onl,
            "ratio": t_onl / t_lat}


def latent_vs_pixel(batch: int, steps: int) -> dict:
    """Samples/s of the same-width U-Net on 16x16x4 latents vs 64x64x3 pixels."""
    from diffusers import UNet2DConditionModel

    from dataengine.models.ldm import TEXT_CONFIGS, UNET_CONFIGS

    out = {}
    width = TEXT_CONFIGS["tiny"]["hidden_size"]
    for name, (ch, size) in {"latent": (4, 16), "pixel": (3, 64)}.items():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{**UNET_CONFIGS["tiny"], "in_channels": ch,
                                       "out_channels": ch, "sample_size": size,
                                       "cross_attention_dim": width})
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        x = torch.randn(batch, ch, size, size)
        states = torch.randn(batch, 8, width)
        t = torch.randint(0, 1000, (batch,))

        def step():
            loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=states).sample, x)
            opt.zero_grad()
            loss.backward()
            opt.step()

        out[name] = batch / timed_steps(step, steps, warmup=1)
    out["ratio"] = out["latent"] / out["pixel"]
    return out


def retry(fn, what: str, attempts: int = 3):
    """``fn()`` again after a failure (e.g. a worker killed by the memory monitor on a shared
    machine); a Ray Train run relaunched under the same name resumes from its checkpoint."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            if i == attempts - 1:
                raise
            print(f"{what} failed ({type(exc).__name__}: {str(exc)[:200]}); retrying")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--root", default="/tmp/bench-ldm")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--ldm-steps", type=int, default=60)
    p.add_argument("--grid-steps", type=int, default=300,
                   help="steps of the published 2-worker run (0: publish the timed run)")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--time-steps", type=int, default=12, help="timed steps per in-process case")
    p.add_argument("--keep", action="store_true", help="reuse an existing corpus/VAE at --root")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    from dataengine.pipeline.core.distribute import ensure_ray
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.core.trainer import ScaleConfig
    from dataengine.pipeline.ingest.shard import ShardConfig, shard
    from dataengine.pipeline.ldm.latents import LatentsConfig, compute_latents
    from dataengine.pipeline.ldm.train_ldm import TrainLdmConfig, train_ldm
    from dataengine.pipeline.ldm.train_vae import TrainVaeConfig, load_vae_version, train_vae

    data = Path(a.data)
    if not data.is_dir():
        sys.exit(f"real sample data not found at {data}")
    if not a.keep and os.path.exists(a.root):
        shutil.rmtree(a.root)
    ensure_ray(num_cpus=2)
    print(f"ray: {ray.cluster_resources()}")
    corpus = Corpus(a.root)
    val = str(data / "coco-mini/annotations/instances_val2017.json")
    if not corpus.image_shards():
        s = shard([str(data / "coco128-seg"),
                   str(data / "coco-mini/annotations/instances_train2017.json"), val], a.root,
                  ShardConfig(samples_per_shard=48, holdout_sources=[val], task_cpus=0.5))
        print(f"shard: {s['ok']} images, {s['shards_written']} shards, {s['masks']} masks")

    t0 = time.time()
    vaes = corpus.model_versions("vae")
    if vaes and a.keep:
        vae_info = {"version": vaes[-1], **load_vae_version(a.root, vaes[-1])[1]}
    else:
        vae_info = retry(lambda: train_vae(a.root, TrainVaeConfig(
            steps=a.vae_steps, batch_size=a.vae_batch, resolution=64,
            checkpoint_every=max(a.vae_steps // 4, 1),
            scale=ScaleConfig(cpus_per_worker=1.0, torch_threads=2))), "train-vae")
    print(f"vae {vae_info['version']}: held-out PSNR {vae_info['psnr']:.2f} dB on "
          f"{vae_info['psnr_images']} {vae_info['psnr_split']} images, scale factor "
          f"{vae_info['scale_factor']:.4f} ({time.time() - t0:.0f} s)")

    lat = compute_latents(a.root, LatentsConfig(vae=vae_info["version"], resolution=64,
                                                actors=2, actor_cpus=1.0, batch_size=16))
    if lat["shards_written"]:
        precompute = lat["images_per_s"]
    else:  # --keep: the latents exist; time a fresh copy under another round number
        precompute = float("nan")
    print(f"latents {lat['dataset']}: {lat['samples_written']} images, {precompute:.1f} img/s "
          f"({len(lat['failures'])} failures)")

    torch.set_num_threads(2)
    vae, _ = load_vae_version(a.root, vae_info["version"])
    lo = latent_vs_online(a.root, lat["dataset"], vae, vae_info["scale_factor"], batch=16,
                          steps=a.time_steps)
    print(f"training from latents {lo['latent_samples_s']:.1f} samples/s vs online encoding "
          f"{lo['online_samples_s']:.1f} samples/s: x{lo['ratio']:.2f}")
    lp = latent_vs_pixel(batch=16, steps=max(a.time_steps // 2, 2))
    print(f"same U-Net width: latent f=4 {lp['latent']:.1f} samples/s vs pixel "
          f"{lp['pixel']:.1f} samples/s: x{lp['ratio']:.2f}")

    runs = {}
    for workers in (1, 2):
        cfg = TrainLdmConfig(steps=a.ldm_steps, batch_size=16, checkpoint_every=a.ldm_steps,
                             latents=lat["dataset"], run_name=f"bench-w{workers}-{int(t0)}",
                             publish=workers == 2 and a.grid_steps == 0, sample_steps=10,
                             scale=ScaleConfig(num_workers=workers, cpus_per_worker=1.0,
                                               torch_threads=1, placement_strategy="PACK"))
        runs[workers] = retry(lambda: train_ldm(a.root, cfg), f"train-ldm x{workers}")
        print(f"train-ldm {workers} worker(s): {runs[workers]['samples_per_s']:.1f} samples/s, "
              f"held-out loss {runs[workers]['heldout_loss']:.4f}")
    w_ratio = runs[2]["samples_per_s"] / runs[1]["samples_per_s"]

    final = runs[2] if a.grid_steps == 0 else train_ldm(a.root, TrainLdmConfig(
        steps=a.grid_steps, batch_size=16, checkpoint_every=max(a.grid_steps // 3, 1),
        latents=lat["dataset"], run_name=f"bench-grid-{int(t0)}",
        scale=ScaleConfig(num_workers=2, cpus_per_worker=1.0, torch_threads=1)))
    print(f"ldm {final['version']}: held-out loss curve {final['curve']}")
    print(f"sample grid: {final['samples']}")
    print(json.dumps({"vae": {k: vae_info[k] for k in ("version", "psnr", "scale_factor")},
                      "latents": lat["dataset"], "latent_vs_online": lo, "latent_vs_pixel": lp,
                      "workers": {w: r["samples_per_s"] for w, r in runs.items()}}, default=str))
    print(f"RESULT precompute_img_s={precompute:.1f} latent_vs_online={lo['ratio']:.2f} "
          f"workers2_vs_1={w_ratio:.2f} latent_vs_pixel={lp['ratio']:.2f} "
          f"vae_psnr={vae_info['psnr']:.2f}")


if __name__ == "__main__":
    main()
