"""The LDM paper's sweep of DDIM steps against sample quality, at a size this machine runs.

One command: ``python benchmarks/bench_ddim_sweep.py [--root DIR] [--steps 5,10,25,50]
[--inception-weights PATH] [--clip-model DIR]``.

Without ``--root`` it builds a small corpus: coco-mini val2017 (``../shared/data``, a quarter held
out) sharded with its COCO masks and captions, the tiny f=4 VAE (random weights imported as a
version: this measures the sampler, not the autoencoder), 64 px images (16x16 latents), and the
``tiny`` U-Net trained ``--ldm-steps`` steps with Ray Train (1 worker). With ``--root`` it evaluates
that corpus' newest LDM version. Then ``dataengine eval-ldm`` with the steps sweep: per step count
seconds per sample, PSNR against the 200-step sample of the same noise (sampler convergence), and
FID / KID / precision / recall / CLIP score when the local weights are given; the held-out denoising
loss and the VAE's PSNR do not depend on the step count and are printed once.

Last line: ``RESULT steps_<N>_psnr_vs_ref=... steps_<N>_s_per_sample=... [steps_<N>_fid=...]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
SHARED = Path(os.environ.get("DATAENGINE_SHARED_DATA", REPO.parent / "shared" / "data"))


def build(root: str, ldm_steps: int) -> str:
    """Corpus, random VAE version, latents, a trained LDM version; returns the version."""
    import torch

    from dataengine.models.ldm import build_vae
    from dataengine.pipeline.core.distribute import ensure_ray
    from dataengine.pipeline.core.trainer import ScaleConfig
    from dataengine.pipeline.ingest.shard import ShardConfig, shard
    from dataengine.pipeline.ldm.latents import LatentsConfig, compute_latents
    from dataengine.pipeline.ldm.train_ldm import TrainLdmConfig, train_ldm
    from dataengine.pipeline.ldm.train_vae import TrainVaeConfig, train_vae

    shard([str(SHARED / "coco-mini/annotations/instances_val2017.json")], root,
          ShardConfig(samples_per_shard=40, holdout=0.25, use_ray=False))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        build_vae("tiny-f4").save_pretrained(tmp)
        train_vae(root, TrainVaeConfig(vae="tiny-f4", pretrained=tmp, resolution=32,
                                       scale_samples=32, psnr_images=8, batch_size=8))
    compute_latents(root, LatentsConfig(resolution=64, batch_size=16, use_ray=False))
    ensure_ray(num_cpus=2)
    info = train_ldm(root, TrainLdmConfig(
        steps=ldm_steps, batch_size=16, checkpoint_every=ldm_steps, sample_steps=10,
        heldout_samples=16, scale=ScaleConfig(num_workers=1, cpus_per_worker=1.0,
                                              torch_threads=2)))
    print(f"ldm {info['version']}: {ldm_steps} steps, held-out loss {info['heldout_loss']:.4f}")
    return info["version"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--root", default="")
    ap.add_argument("--model", default="")
    ap.add_argument("--steps", default="5,10,25,50")
    ap.add_argument("--reference-steps", type=int, default=200)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--ldm-steps", type=int, default=300)
    ap.add_argument("--inception-weights", default="")
    ap.add_argument("--clip-model", default="")
    a = ap.parse_args()

    from rich.console import Console

    from dataengine.pipeline.ldm.evaluate import EvalLdmConfig, evaluate_ldm, sweep_table

    root, model = a.root, a.model
    if not root:
        root = tempfile.mkdtemp(prefix="bench-ddim-")
        model = build(root, a.ldm_steps)
    result = evaluate_ldm(root, EvalLdmConfig(
        model=model, steps=a.steps, reference_steps=a.reference_steps, n=a.n, batch_size=8,
        inception_weights=a.inception_weights, clip_model=a.clip_model))
    Console(width=140).print(sweep_table(result))
    if not a.inception_weights:
        print(f"(no FID: {result['fid']})")
    print(f"corpus {root}, result {result['out']}")
    parts = []
    for row in result["sweep"]:
        s = row["steps"]
        parts.append(f"steps_{s}_s_per_sample={row['seconds_per_sample']}")
        if "psnr_vs_reference" in row:
            parts.append(f"steps_{s}_psnr_vs_ref={row['psnr_vs_reference']}")
        if "fid" in row:
            parts.append(f"steps_{s}_fid={row['fid']}")
    print("RESULT " + " ".join(parts))


if __name__ == "__main__":
    main()
