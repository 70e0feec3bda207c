"""The LDM paper's sweep of DDIM steps against sample quality, at a size this machine runs.

One command: ``python benchmarks/bench_ddim_sweep.py [--root DIR] [--steps 5,10,25,50]
[--inception-weights PATH] [--clip-model DIR]``.

Without ``--root`` it builds a small corpus: coco-mini val2017 (``../shared/data``, a quarter held
out) sharded with its COCO masks and captions, the tiny f=4 VAE (random weights imported as a
version: this measures the sampler, not the autoencoder), 64 px images (16x16 latents), and the
``tiny`` U-Net trained ``--ldm-steps`` steps in this process (train-ldm's model, data stream and
loss). With ``--root`` it evaluates that corpus' newest LDM version. Then ``dataengine eval-ldm``
with the steps sweep: per step count seconds per sample, PSNR against the 200-step sample of the
same noise (sampler convergence), and FID / KID / precision / recall / CLIP score when the local
weights are given; the held-out denoising loss and the VAE's PSNR do not depend on the step count
and are printed once.

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
    """Corpus, random VAE version, latents, and a small LDM trained in this process (the same
    model, data stream and loss as ``train-ldm``, without Ray); returns its checkpoint folder."""
    import json

    import torch
    from safetensors.torch import save_file

    from dataengine.models.ldm import (LatentDiffusion, LdmSpec, build_noise_scheduler, build_vae,
                                       diffusion_loss, drop_conditions, tokenizer_from_json)
    from dataengine.pipeline.ingest.shard import ShardConfig, shard
    from dataengine.pipeline.ldm.latents import LatentsConfig, compute_latents
    from dataengine.pipeline.ldm.train_ldm import TrainLdmConfig, latent_stream, prepare_run
    from dataengine.pipeline.ldm.train_vae import TrainVaeConfig, train_vae

    shard([str(SHARED / "coco-mini/annotations/instances_val2017.json")], root,
          ShardConfig(samples_per_shard=40, holdout=0.25, use_ray=False))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        build_vae("tiny-f4").save_pretrained(tmp)
        train_vae(root, TrainVaeConfig(vae="tiny-f4", pretrained=tmp, resolution=64,
                                       scale_samples=32, psnr_images=8, batch_size=8))
    compute_latents(root, LatentsConfig(resolution=64, batch_size=16, use_ray=False))
    cfg = TrainLdmConfig(batch_size=16)
    run = prepare_run(root, cfg)
    spec = LdmSpec.from_json(run["spec"])
    tok = tokenizer_from_json(run["tokenizer"], spec.max_tokens)
    model = LatentDiffusion(spec, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = build_noise_scheduler(spec)
    data = latent_stream(run["shards"], spec, tok, batch_size=cfg.batch_size,
                         scale=run["scale_factor"], rank=0, world=1, seed=0, epoch_batches=50)
    g = torch.Generator().manual_seed(0)
    for step in range(ldm_steps):
        batch = next(data)
        ids, lay = drop_conditions(batch["ids"], batch["layout"], model.null_ids,
                                   spec.p_uncond, g)
        loss = diffusion_loss(model, batch["latents"], ids, lay, sched, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == ldm_steps - 1:
            print(f"ldm step {step}: loss {float(loss.detach()):.4f}", flush=True)
    ckpt = os.path.join(root, "runs", "bench-ddim", "checkpoint_000000")
    os.makedirs(ckpt, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(ckpt, "ema.safetensors"))
    for name, text in (("spec.json", json.dumps(run["spec"])),
                       ("tokenizer.json", run["tokenizer"]),
                       ("state.json", json.dumps({"vae_version": run["vae_version"],
                                                  "scale_factor": run["scale_factor"],
                                                  "step": ldm_steps - 1}))):
        with open(os.path.join(ckpt, name), "w") as f:
            f.write(text)
    return ckpt


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
