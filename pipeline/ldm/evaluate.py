"""``dataengine eval-ldm``: how good an LDM version's samples are, and the DDIM-steps sweep.

On the first ``n`` held-out images of the model's latents (train images when the corpus holds none
out): their conditions (classes, caption, layout) drive ``n`` DDIM samples per entry of ``steps``
(same seed, same starting noise), compared with the real images (center crop at the model
resolution) by

- always: the held-out denoising loss (fixed noise and timesteps, as training reports it), the
  VAE's PSNR on the real images (encode + decode), seconds per sample, and the sampler's
  convergence: PSNR of each sample against the sample of the same noise with
  ``reference_steps`` DDIM steps;
- with ``inception_weights`` (a local file, :mod:`.metrics`): FID, KID, precision and recall;
- with ``clip_model`` (a local CLIP folder): CLIP score against the conditioning prompt.

Several ``steps`` give the LDM paper's sweep of DDIM steps against sample quality (Rombach et al.
2022, fig. 7/§4.1): one row per step count. The result is written to
``ROOT/runs/eval-ldm/<model>-<time>.json``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus

logger = logging.getLogger(__name__)


@dataclass
class EvalLdmConfig:
    """Settings of ``dataengine eval-ldm``."""

    model: str = ""                 # vNNNN, run name or checkpoint folder (default: newest)
    latents: str = ""               # latents folder (default: the newest)
    n: int = 64                     # held-out images, and samples per step count
    steps: list[int] = field(default_factory=lambda: [50])   # several: the DDIM sweep
    reference_steps: int = 200      # sampler-convergence reference (0: off)
    guidance: float = 3.0
    seed: int = 0
    batch_size: int = 8
    inception_weights: str = ""     # local FID Inception-v3 weights (FID, KID, P/R)
    clip_model: str = ""            # local Hugging Face CLIP folder (CLIP score)
    pr_k: int = 3                   # precision/recall neighbourhood
    out: str = ""                   # result JSON (default ROOT/runs/eval-ldm/...)

    def __post_init__(self) -> None:
        if isinstance(self.steps, (int, str)):
            self.steps = [int(s) for s in str(self.steps).split(",") if str(s).strip()]
        self.steps = [int(s) for s in self.steps]
        if not self.steps or min(self.steps) < 1:
            raise ValueError(f"steps={self.steps}: give one or more step counts >= 1")
        if self.n < 2:
            raise ValueError(f"n={self.n}: must be >= 2 (KID and the sweep compare sets)")
        if self.reference_steps < 0 or self.batch_size < 1 or self.pr_k < 1:
            raise ValueError("reference_steps must be >= 0, batch_size and pr_k >= 1")
        if self.guidance < 0:
            raise ValueError(f"guidance={self.guidance}: must be >= 0")


def eval_items(root: str, latents: str, n: int) -> tuple[list[dict[str, Any]], str]:
    """The first ``n`` held-out latent samples (train ones when none is held out), each with
    its real image at the latents' resolution: ``(items, split)``."""
    from dataengine.pipeline.core.imagecodec import image_bytes
    from dataengine.pipeline.core.shards import iter_tar
    from dataengine.pipeline.ldm.images import decode_square
    from dataengine.pipeline.ldm.train_ldm import condition_of, decode_latent_sample

    corpus = Corpus(root)
    shards = storage.listdir(storage.join(corpus.path("latents"), latents), r"shard-\d+\.tar")
    for split in ("holdout", "train"):
        items: list[dict[str, Any]] = []
        for url in shards:
            for s in iter_tar(url):
                if json.loads(s["json"]).get("split", "train") == split:
                    it = decode_latent_sample(s)
                    it["classes"], it["caption"], it["layout"] = condition_of(
                        it, random.Random(0), set())
                    items.append(it)
                if len(items) >= n:
                    break
            if len(items) >= n:
                break
        if items:
            wanted = {it["key"]: it for it in items}
            res = int(items[0]["meta"]["resolution"])
            for shard in sorted({it["meta"]["image_shard"] for it in items}):
                for s in iter_tar(corpus.image_shard(shard)):
                    if s["__key__"] in wanted:
                        wanted[s["__key__"]]["image"] = decode_square(image_bytes(s), res)[0]
            return [it for it in items if "image" in it], split
    raise FileNotFoundError(f"latents {latents!r} of {root} hold no samples")


@torch.no_grad()
def generate(model: Any, vae: Any, scale: float, ids: torch.Tensor, layout: torch.Tensor, *,
             steps: int, guidance: float, seed: int, batch_size: int) -> np.ndarray:
    """DDIM samples for the conditions, decoded: ``NxHxWx3`` uint8. Batch ``i`` starts from the
    noise of ``seed + i``, so every step count starts from the same noise."""
    from dataengine.models.ldm import ddim_sample, decode_latents, to_uint8

    dev = next(model.parameters()).device
    out = []
    for b, i in enumerate(range(0, len(ids), batch_size)):
        z = ddim_sample(model, ids[i:i + batch_size], layout[i:i + batch_size], steps=steps,
                        guidance=guidance, generator=torch.Generator().manual_seed(seed + b))
        out.append(to_uint8(decode_latents(vae, z.to(dev), scale)))
    return np.concatenate(out)


def _psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    from dataengine.pipeline.ldm.train_vae import psnr

    def t(x):
        return torch.from_numpy(x).float() / 127.5 - 1

    return psnr(t(a), t(b))


@torch.no_grad()
def fixed_metrics(model: Any, vae: Any, scale: float, batch: dict, real: np.ndarray,
                  batch_size: int) -> dict[str, float]:
    """Held-out denoising loss and the VAE's PSNR on the real images."""
    from dataengine.models.ldm import build_noise_scheduler, decode_latents, encode_images
    from dataengine.pipeline.ldm.images import to_tensor
    from dataengine.pipeline.ldm.train_ldm import heldout_loss

    dev = next(model.parameters()).device
    loss = heldout_loss(model, batch, build_noise_scheduler(model.spec), dev)
    rec = []
    for i in range(0, len(real), batch_size):
        x = to_tensor(list(real[i:i + batch_size])).to(dev)
        mean, _ = encode_images(vae, x)
        rec.append(((decode_latents(vae, mean * scale, scale) + 1) * 127.5).round()
                   .clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return {"heldout_loss": round(loss, 5),
            "vae_psnr": round(_psnr_uint8(np.concatenate(rec), real), 3)}


def _extractors(cfg: EvalLdmConfig) -> tuple[Any, Any]:
    """(Inception-v3 or None, (CLIP model, processor) or None), from local files only."""
    from dataengine.pipeline.ldm import metrics

    inception = metrics.load_inception(cfg.inception_weights) if cfg.inception_weights else None
    clip = metrics.load_clip(cfg.clip_model) if cfg.clip_model else None
    return inception, clip


def sweep_row(samples: np.ndarray, seconds: float, *, reference: np.ndarray | None,
              real_feats: torch.Tensor | None, inception: Any, clip: Any, prompts: list[str],
              pr_k: int) -> dict[str, Any]:
    """The figures of one step count's samples."""
    from dataengine.pipeline.ldm import metrics

    row: dict[str, Any] = {"seconds_per_sample": round(seconds / len(samples), 3)}
    if reference is not None:
        row["psnr_vs_reference"] = round(_psnr_uint8(samples, reference), 3)
    if inception is not None:
        fake = metrics.inception_features(inception, samples)
        k = min(pr_k, len(samples) - 1)
        row.update({key: round(v, 5) for key, v in
                    metrics.distribution_metrics(real_feats, fake, k=k).items()})
    if clip is not None:
        row["clip_score"] = round(metrics.clip_score(*clip, samples, prompts), 3)
    return row


def evaluate_ldm(root: str, config: EvalLdmConfig | None = None) -> dict[str, Any]:
    """Evaluate an LDM version (see the module docstring); returns and writes the result."""
    from dataengine.models.ldm import prompt_for
    from dataengine.pipeline.ldm import metrics
    from dataengine.pipeline.ldm.sample import load_model
    from dataengine.pipeline.ldm.train_ldm import collate, pick_latents

    cfg = config or EvalLdmConfig()
    corpus = Corpus(root)
    inception, clip = _extractors(cfg)  # a missing file fails before any sampling
    model, tok, vae, scale, what = load_model(corpus.root, cfg.model)
    spec = model.spec
    latents = pick_latents(corpus, cfg.latents)
    items, split = eval_items(corpus.root, latents, cfg.n)
    real = np.stack([it["image"] for it in items])
    batch = collate([((it["mean"] * scale).astype(np.float32), it["classes"], it["caption"],
                      it["layout"]) for it in items], spec, tok)
    prompts = [prompt_for(spec, it["classes"], it["caption"]) for it in items]
    result: dict[str, Any] = {"model": what, "latents": latents, "split": split,
                              "n": len(items), "guidance": cfg.guidance,
                              **fixed_metrics(model, vae, scale, batch, real, cfg.batch_size)}
    real_feats = metrics.inception_features(inception, real) if inception is not None else None
    gen = {"guidance": cfg.guidance, "seed": cfg.seed, "batch_size": cfg.batch_size}
    reference = None
    if cfg.reference_steps:
        reference = generate(model, vae, scale, batch["ids"], batch["layout"],
                             steps=cfg.reference_steps, **gen)
        result["reference_steps"] = cfg.reference_steps
    rows = []
    for steps in cfg.steps:
        t0 = time.perf_counter()
        samples = generate(model, vae, scale, batch["ids"], batch["layout"], steps=steps, **gen)
        rows.append({"steps": steps, **sweep_row(
            samples, time.perf_counter() - t0, reference=reference, real_feats=real_feats,
            inception=inception, clip=clip, prompts=prompts, pr_k=cfg.pr_k)})
        logger.info("eval-ldm %s: %s", what, rows[-1])
    result["sweep"] = rows
    if inception is None:
        result["fid"] = metrics.missing_inception_message()
    out = cfg.out or storage.join(corpus.runs, "eval-ldm",
                                  f"{what}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    storage.write_json(out, result)
    result["out"] = out
    return result


def sweep_table(result: dict[str, Any]):  # -> rich.table.Table
    """The sweep as a rich table (one row per DDIM step count)."""
    from rich.table import Table

    t = Table(title=f"eval-ldm {result['model']} · {result['n']} {result['split']} images · "
                    f"held-out loss {result['heldout_loss']} · VAE PSNR {result['vae_psnr']} dB")
    cols = [c for c in ("steps", "seconds_per_sample", "psnr_vs_reference", "fid", "kid",
                        "kid_std", "precision", "recall", "clip_score")
            if any(c in r for r in result["sweep"])]
    for c in cols:
        t.add_column(c, justify="right")
    for r in result["sweep"]:
        t.add_row(*(str(r.get(c, "")) for c in cols))
    return t
