"""``dataengine train-ldm``: a conditional latent diffusion U-Net on precomputed latent shards.

Ray Train through :mod:`dataengine.pipeline.core.trainer` (``TorchTrainer``; DDP with NCCL on GPU,
gloo on CPU; ``RunConfig(storage_path=ROOT/runs)`` on the corpus storage, local or S3;
``FailureConfig`` so a lost worker or node resumes from the last checkpoint). Each worker reads its
own split of the latent shards (webdataset node splitting, shards resampled, fixed number of batches
per epoch), samples z ~ N(mean, exp(logvar)) times the VAE scale, and minimises the ε-prediction MSE
of LDM eq. (2)/(3) under a linear β schedule with AdamW, EMA weights, gradient accumulation and bf16
autocast on GPU only. Conditioning (class tokens, captions, layout maps; dropped with probability
``p_uncond`` for classifier-free guidance) is described in :mod:`dataengine.models.ldm`.

Every checkpoint (``checkpoint_every`` steps) holds the model, its EMA, the optimizer, the
tokenizer and spec, and ``samples.png``: DDIM (``sample_steps``) samples of held-out conditions
without guidance, with guidance ``guidance``, and the held-out originals, decoded by the VAE.
The quality curve is the held-out denoising loss (EMA weights, fixed noise and timesteps on
held-out latents). The finished run is published as ``models/ldm/vNNNN/``: ``pipeline/`` (a
diffusers ``StableDiffusionPipeline`` folder, ``save_pretrained``), ``samples.png``,
``metrics.json`` and ``version.json`` (last).

One machine (2 workers on the local Ray)::

    dataengine train-ldm --root ROOT --workers 2 --set steps=2000

Many nodes: start Ray on each node (``ray start --head`` / ``ray start --address=HEAD:6379``),
keep the corpus on shared storage (S3), then from anywhere::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m dataengine train-ldm --root s3://bucket/corpus --workers 8 \\
        --set scale.use_gpu=true --set scale.placement_strategy=SPREAD

Re-running with the same ``run_name`` resumes the run from its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dataengine.models.checkpoint import weights_digest
from dataengine.pipeline.core import storage, trainer, versions
from dataengine.pipeline.core.layout import Corpus, parse_version

logger = logging.getLogger(__name__)


@dataclass
class TrainLdmConfig:
    """Settings of ``dataengine train-ldm``."""

    latents: str = ""                  # latents folder (e.g. v0001-64-r3); default the newest
    unet: str = "tiny"                 # dataengine.models.ldm.UNET_CONFIGS
    text: str = "tiny"                 # dataengine.models.ldm.TEXT_CONFIGS
    conditions: list[str] = field(default_factory=lambda: ["class", "caption", "layout"])
    unet_overrides: dict[str, Any] = field(default_factory=dict)
    p_uncond: float = 0.1
    steps: int = 400
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    epoch_batches: int = 1000          # batches per resampled epoch (webdataset with_epoch)
    shuffle_buffer: int = 256
    checkpoint_every: int = 100
    log_every: int = 10
    sample_steps: int = 50             # DDIM steps of the checkpoint sample grid
    guidance: float = 3.0
    grid_n: int = 4
    heldout_samples: int = 32
    vocab_size: int = 2000
    seed: int = 0
    run_name: str = ""                 # default ldm-<version>; the same name resumes
    sync_gradients: bool = True        # False only for control runs (no DDP)
    heartbeat_file: str = ""           # local file each worker appends "pid rank step" to
    publish: bool = True               # publish models/ldm/vNNNN at the end
    scale: trainer.ScaleConfig = field(default_factory=lambda: trainer.ScaleConfig(
        cpus_per_worker=1.0))

    def __post_init__(self) -> None:
        from dataengine.models.ldm import CONDITIONS, TEXT_CONFIGS, UNET_CONFIGS

        if isinstance(self.scale, dict):
            self.scale = trainer.ScaleConfig(**self.scale)
        if self.unet not in UNET_CONFIGS:
            raise ValueError(f"unet={self.unet!r}: one of {sorted(UNET_CONFIGS)}")
        if self.text not in TEXT_CONFIGS:
            raise ValueError(f"text={self.text!r}: one of {sorted(TEXT_CONFIGS)}")
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise ValueError(f"conditions={self.conditions}: {bad} not in {list(CONDITIONS)}")
        for name in ("steps", "batch_size", "grad_accum", "epoch_batches", "checkpoint_every",
                     "log_every", "sample_steps", "grid_n"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if not 0 <= self.p_uncond < 1:
            raise ValueError(f"p_uncond={self.p_uncond}: must be in [0, 1)")
        if self.lr <= 0 or not 0 < self.ema_decay < 1:
            raise ValueError(f"lr={self.lr} must be > 0, ema_decay={self.ema_decay} in (0, 1)")


# ------------------------------------------------------------------------------ latent data
def decode_latent_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw latent-shard sample -> ``{"key", "mean", "logvar", "layout", "meta"}`` (numpy)."""
    from dataengine.pipeline.core.shards import load_npy

    meta = json.loads(sample["json"])
    return {"key": sample["__key__"], "meta": meta,
            "mean": load_npy(sample["mean.npy"]).astype(np.float32),
            "logvar": load_npy(sample["logvar.npy"]).astype(np.float32),
            "layout": load_npy(sample["layout.npy"]) if "layout.npy" in sample else None}


def condition_of(item: dict[str, Any], rng: random.Random, rejected_masks: set[str]
                 ) -> tuple[list[int], str, np.ndarray | None]:
    """(class ids, one caption, layout) of a decoded sample; a sample whose masks were
    rejected after precompute loses its class and layout conditioning."""
    meta = item["meta"]
    caps = meta.get("captions") or []
    caption = rng.choice(caps) if caps else ""
    if rejected_masks and set(meta.get("mask_ids") or []) & rejected_masks:
        return [], caption, None
    return list(meta.get("classes") or []), caption, item["layout"]


def collate(items: list[tuple[np.ndarray, list[int], str, np.ndarray | None]], spec, tokenizer
            ) -> dict[str, torch.Tensor]:
    """Latents ``BxCxhxw``, token ids ``BxT`` and layout ``Bxhxw`` uint8 of one batch."""
    from dataengine.models.ldm import prompt_for, tokenize

    z = torch.from_numpy(np.stack([i[0] for i in items]))
    h, w = z.shape[2:]
    lay = torch.from_numpy(np.stack([i[3] if i[3] is not None else np.zeros((h, w), np.uint8)
                                     for i in items]))
    ids = tokenize(tokenizer, [prompt_for(spec, i[1], i[2]) for i in items], spec.max_tokens)
    return {"latents": z, "ids": ids, "layout": lay}


def latent_stream(shards: list[str], spec, tokenizer, *, batch_size: int, scale: float, rank: int,
                  world: int, seed: int, epoch_batches: int, buffer: int = 256,
                  rejected_images: set[str] | None = None, rejected_masks: set[str] | None = None
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches from this worker's share of the latent ``shards`` (webdataset node
    splitting, resampled shards, ``epoch_batches`` batches per epoch), train split only."""
    import webdataset as wds

    import dataengine.pipeline.core.shards  # noqa: F401 - registers fsspec URLs with webdataset

    mine = list(wds.split_by_node(list(shards))) if world > 1 else list(shards)
    if not mine:
        raise ValueError(f"worker {rank}/{world}: no latent shards ({len(shards)} shards for "
                         f"{world} workers; use fewer workers or more image shards)")
    rng = random.Random(seed * 1000 + rank)
    gen = np.random.default_rng(seed * 1000 + rank)
    rejected_images, rejected_masks = rejected_images or set(), rejected_masks or set()

    def prepare(sample):
        meta = json.loads(sample["json"])
        if meta.get("split", "train") != "train" or sample["__key__"] in rejected_images:
            return None
        item = decode_latent_sample(sample)
        z = (item["mean"] + np.exp(0.5 * item["logvar"]) *
             gen.standard_normal(item["mean"].shape, dtype=np.float32)) * scale
        classes, caption, layout = condition_of(item, rng, rejected_masks)
        return z.astype(np.float32), classes, caption, layout

    pipe = wds.DataPipeline(
        wds.ResampledShards(mine, seed=seed, worker_seed=lambda: rank, deterministic=True),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.map(prepare), wds.select(lambda x: x is not None),
        wds.shuffle(buffer, initial=min(buffer, 32), rng=rng),
        wds.batched(batch_size, collation_fn=lambda b: collate(b, spec, tokenizer), partial=False),
    ).with_epoch(nbatches=epoch_batches)
    while True:
        n = 0
        for batch in pipe:
            n += 1
            yield batch
        if n == 0:
            raise ValueError(f"worker {rank}: latent shards {mine} hold no training samples")


def heldout_batch(shards: list[str], spec, tokenizer, scale: float, n: int
                  ) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The first ``n`` held-out latents (posterior means, scaled) with their conditions
    (train latents when the corpus holds none out); returns (batch, split used)."""
    from dataengine.pipeline.core.shards import iter_tar

    for split in ("holdout", "train"):
        items = []
        for url in shards:
            for s in iter_tar(url):
                if json.loads(s["json"]).get("split", "train") != split:
                    continue
                it = decode_latent_sample(s)
                c, cap, lay = condition_of(it, random.Random(0), set())
                items.append(((it["mean"] * scale).astype(np.float32), c, cap, lay))
                if len(items) >= n:
                    break
            if len(items) >= n:
                break
        if items:
            return collate(items, spec, tokenizer), split
    return None, "none"


@torch.no_grad()
def heldout_loss(model, batch: dict[str, torch.Tensor], scheduler, device) -> float:
    """Denoising loss with fixed noise (seed 1234) and evenly spaced timesteps."""
    from dataengine.models.ldm import diffusion_loss

    z = batch["latents"].to(device)
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(z.shape, generator=g)
    t = torch.linspace(0, scheduler.config.num_train_timesteps - 1, z.shape[0]).long()
    return float(diffusion_loss(model, z, batch["ids"].to(device), batch["layout"].to(device),
                                scheduler, noise=noise.to(device), timesteps=t))


@torch.no_grad()
def sample_grid(model, vae, batch: dict[str, torch.Tensor], scale: float, *, steps: int,
                guidance: float, n: int, seed: int = 0) -> bytes:
    """PNG rows: DDIM samples without guidance, with ``guidance``, and the originals."""
    from dataengine.models.ldm import ddim_sample, decode_latents, grid_png, to_uint8

    ids, lay = batch["ids"][:n], batch["layout"][:n]
    dev = next(model.parameters()).device
    rows = []
    for gs in (1.0, guidance):
        z = ddim_sample(model, ids, lay, steps=steps, guidance=gs,
                        generator=torch.Generator().manual_seed(seed))
        rows.append(to_uint8(decode_latents(vae, z.to(dev), scale)))
    if batch["latents"].shape[0]:
        rows.append(to_uint8(decode_latents(vae, batch["latents"][:n].to(dev), scale)))
    return grid_png(rows)




# ------------------------------------------------------------------------------ worker loop
def _accumulate(ddp: Any, data: Iterator[dict[str, Any]], model: Any, spec: Any, sched: Any,
                cfg: TrainLdmConfig, device: Any, g: torch.Generator) -> tuple[float, int]:
    """Forward and backward ``grad_accum`` micro-batches (gradients synchronised on the last):
    ``(summed loss, samples seen)``."""
    from dataengine.models.ldm import diffusion_loss, drop_conditions

    total, seen = 0.0, 0
    for micro in range(cfg.grad_accum):
        batch = next(data)
        ids, lay = drop_conditions(batch["ids"], batch["layout"], model.null_ids.cpu(),
                                   spec.p_uncond, g)
        sync = micro == cfg.grad_accum - 1 or not hasattr(ddp, "no_sync")
        with (contextlib.nullcontext() if sync else ddp.no_sync()), trainer.autocast(device):
            loss = diffusion_loss(ddp, batch["latents"].to(device), ids.to(device),
                                  lay.to(device), sched, generator=g) / cfg.grad_accum
        loss.backward()
        total += float(loss.detach())
        seen += batch["latents"].shape[0]
    return total, seen


class _Evaluator:
    """Rank 0's checkpoint figures: held-out denoising loss of the EMA weights and a sample grid
    (the VAE is loaded on first use)."""

    def __init__(self, config: dict[str, Any], spec: Any, tokenizer: Any, scale: float,
                 cfg: TrainLdmConfig) -> None:
        self.config, self.spec, self.scale, self.cfg = config, spec, scale, cfg
        self.held, self.split = heldout_batch(config["shards"], spec, tokenizer, scale,
                                              cfg.heldout_samples)
        self.vae = None

    def __call__(self, ema: Any, sched: Any, device: Any, step: int, curve: list,
                 metrics: dict[str, Any]) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        if self.held is not None:
            from dataengine.pipeline.ldm.train_vae import load_vae_version

            ema.eval()
            metrics["heldout_loss"] = heldout_loss(ema, self.held, sched, device)
            metrics["heldout_split"] = self.split
            curve.append([step, metrics["heldout_loss"]])
            if self.vae is None:
                self.vae, _ = load_vae_version(self.config["root"], self.config["vae_version"])
                self.vae.to(device)
            files["samples.png"] = sample_grid(ema, self.vae, self.held, self.scale,
                                               steps=self.cfg.sample_steps,
                                               guidance=self.cfg.guidance, n=self.cfg.grid_n)
        files["spec.json"] = json.dumps(self.spec.to_json()).encode()
        files["tokenizer.json"] = self.config["tokenizer"].encode()
        return files


def _train_loop(config: dict[str, Any]) -> None:
    """Per-worker training loop (runs inside a Ray Train worker)."""
    from dataengine.models.ldm import (LatentDiffusion, LdmSpec, build_noise_scheduler, ema_update,
                                       tokenizer_from_json)

    cfg = TrainLdmConfig(**config["cfg"])
    ctx = trainer.context(config)
    spec = LdmSpec.from_json(config["spec"])
    tokenizer = tokenizer_from_json(config["tokenizer"], spec.max_tokens)
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    model = LatentDiffusion(spec, tokenizer)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = trainer.restore(models={"model": model, "ema": ema}, optimizers={"opt": opt})
    start = int(state["step"]) + 1 if state else 0
    curve = list(state.get("curve", [])) if state else []
    ddp = trainer.prepare(model, sync_gradients=cfg.sync_gradients)
    ema.to(ctx.device)
    sched = build_noise_scheduler(spec)
    scale = float(config["scale_factor"])
    data = latent_stream(config["shards"], spec, tokenizer, batch_size=cfg.batch_size,
                         scale=scale, rank=ctx.rank, world=ctx.world_size, seed=cfg.seed + start,
                         epoch_batches=cfg.epoch_batches, buffer=cfg.shuffle_buffer,
                         rejected_images=set(config["rejected_images"]),
                         rejected_masks=set(config["rejected_masks"]))
    g = torch.Generator().manual_seed(cfg.seed * 7919 + 31 * ctx.rank + start)
    evaluate = _Evaluator(config, spec, tokenizer, scale, cfg) if ctx.is_main else None
    t0, seen = time.time(), 0
    for step in range(start, cfg.steps):
        total, n = _accumulate(ddp, data, model, spec, sched, cfg, ctx.device, g)
        seen += n
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, trainer.unwrap(ddp), step, cfg.ema_decay)
        if cfg.heartbeat_file:
            with open(cfg.heartbeat_file, "a") as f:
                f.write(f"{os.getpid()} {ctx.rank} {step}\n")
        ckpt = step == cfg.steps - 1 or (step + 1) % cfg.checkpoint_every == 0
        if not (ckpt or step % cfg.log_every == 0):
            continue
        metrics: dict[str, Any] = {"step": step, "loss": total, "samples_per_s": seen
                                   * ctx.world_size / max(time.time() - t0, 1e-9)}
        files = evaluate(ema, sched, ctx.device, step, curve, metrics) \
            if ckpt and evaluate else {}
        trainer.report(metrics, models={"model": model, "ema": ema} if ckpt else None,
                       optimizers={"opt": opt} if ckpt else None,
                       extra={"step": step, "curve": curve, "vae_version": config["vae_version"],
                              "scale_factor": scale, "latents": config["latents"]},
                       files=files or None)
    _record_worker(config, ctx, cfg, start, weights_digest(trainer.unwrap(ddp)))


def _record_worker(config: dict[str, Any], ctx: Any, cfg: TrainLdmConfig, start: int,
                   digest: str) -> None:
    """Provenance of this worker: where it ran, what it read, what it ended with."""
    import ray
    import webdataset as wds

    shards = config["shards"]
    record = {"rank": ctx.rank, "world_size": ctx.world_size, "pid": os.getpid(),
              "node": ray.get_runtime_context().get_node_id(),
              "shards": list(wds.split_by_node(list(shards))) if ctx.world_size > 1
              else list(shards), "steps": cfg.steps, "start": start, "digest": digest}
    storage.write_json(storage.join(config["run_url"], "workers", f"rank-{ctx.rank}.json"), record)


# ------------------------------------------------------------------------------ driver side
def pick_latents(corpus: Corpus, name: str = "") -> str:
    """The latents folder to train on: ``name``, or the newest VAE version's highest round."""
    found = [u.rsplit("/", 1)[-1] for u in storage.listdir(corpus.path("latents"))
             if storage.exists(storage.join(u, "dataset.json"))]
    if name:
        if name not in found:
            raise FileNotFoundError(f"latents {name!r} not in {corpus.root}/latents (have "
                                    f"{sorted(found)}); run `dataengine latents`")
        return name
    if not found:
        raise FileNotFoundError(f"{corpus.root}: no latent shards; run `dataengine latents`")

    def order(n: str) -> tuple[int, int, int]:
        v, res, r = n.split("-")
        return parse_version(v), int(r[1:]), int(res)
    return max(found, key=order)


def _categories(corpus: Corpus) -> dict[str, str]:
    from dataengine.pipeline.core import rounds

    table = rounds.load_manifest(corpus)
    out: dict[str, str] = {}
    if table.num_rows:
        for cid, name in zip(table.column("category_id").to_pylist(),
                             table.column("category").to_pylist(), strict=True):
            if cid is not None and cid >= 0 and name:
                out.setdefault(str(cid), name)
    return out


def latent_shards(corpus: Corpus, name: str) -> tuple[dict[str, Any], list[str]]:
    """A latents dataset's ``dataset.json`` and the URLs of its finished shards."""
    d = corpus.path("latents", name)
    info = storage.read_json(storage.join(d, "dataset.json"))
    shards = [storage.join(d, f"{s}.tar") for s in info["shards"]]
    if not shards:
        raise FileNotFoundError(f"{d}: no finished latent shards")
    return info, shards


def prepare_run(root: str, cfg: TrainLdmConfig) -> dict[str, Any]:
    """Everything the workers need: shards, spec, tokenizer (trained on the corpus captions,
    reused when the run already has one), VAE version and scale, curation rejections."""
    from dataengine.models.ldm import LdmSpec, tokenizer_to_json, train_tokenizer
    from dataengine.pipeline.core.curation import excluded_image_keys, rejected_mask_ids
    from dataengine.pipeline.core.shards import iter_tar

    corpus = Corpus(root)
    root = corpus.root
    name = pick_latents(corpus, cfg.latents)
    info, shards = latent_shards(corpus, name)
    vae_info = storage.read_json(storage.join(corpus.model_dir("vae", info["vae_version"]),
                                              "version.json"))
    factor = int(vae_info.get("factor") or 4)
    spec = LdmSpec(unet=cfg.unet, text=cfg.text, conditions=list(cfg.conditions),
                   latent_channels=int(vae_info.get("latent_channels") or 4),
                   latent_size=int(info["resolution"]) // factor, p_uncond=cfg.p_uncond,
                   categories=_categories(corpus), unet_overrides=dict(cfg.unet_overrides))
    version, _ = versions.claim_version(corpus, "ldm")
    run = cfg.run_name or f"ldm-{version}"
    run_url = storage.join(corpus.runs, run)
    tok_url = storage.join(run_url, "tokenizer.json")
    if storage.exists(tok_url):
        tok_json = storage.read_bytes(tok_url).decode()
    else:
        captions, classes = [], set()
        for url in shards:
            for s in iter_tar(url):
                meta = json.loads(s["json"])
                captions += meta.get("captions") or []
                classes.update(int(c) for c in meta.get("classes") or [])
        classes.update(int(c) for c in spec.categories)
        tok_json = tokenizer_to_json(train_tokenizer(captions, classes, vocab_size=cfg.vocab_size,
                                                     max_length=spec.max_tokens))
        storage.write_bytes(tok_url, tok_json.encode())
    return {"root": root, "latents": name, "shards": shards, "spec": spec.to_json(),
            "tokenizer": tok_json, "vae_version": info["vae_version"],
            "scale_factor": float(vae_info["scale_factor"]), "run": run, "run_url": run_url,
            "version": version, "rejected_images": sorted(excluded_image_keys(corpus)),
            "rejected_masks": sorted(rejected_mask_ids(corpus))}


def load_checkpoint(path: str, *, use_ema: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """(LatentDiffusion, tokenizer, state) from a local checkpoint folder of a run."""
    from safetensors.torch import load_file

    from dataengine.models.ldm import LatentDiffusion, LdmSpec, tokenizer_from_json

    with open(os.path.join(path, "spec.json")) as f:
        spec = LdmSpec.from_json(json.load(f))
    with open(os.path.join(path, "tokenizer.json")) as f:
        tokenizer = tokenizer_from_json(f.read(), spec.max_tokens)
    model = LatentDiffusion(spec, tokenizer)
    model.load_state_dict(load_file(os.path.join(path, "ema.safetensors" if use_ema
                                                 else "model.safetensors")))
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    return model.eval(), tokenizer, state


def train_ldm(root: str, config: TrainLdmConfig | None = None) -> dict[str, Any]:
    """Train the latent diffusion model on ``root``'s latents and publish ``models/ldm/vNNNN``;
    returns the version's info (held-out loss, curve, samples/s, paths)."""
    from dataengine.models.ldm import export_pipeline
    from dataengine.pipeline.core.config import to_dict
    from dataengine.pipeline.ldm.train_vae import load_vae_version

    cfg = config or TrainLdmConfig()
    run = prepare_run(root, cfg)
    if cfg.scale.num_workers > len(run["shards"]):
        raise ValueError(f"workers={cfg.scale.num_workers}: only {len(run['shards'])} latent "
                         f"shards; each worker needs its own shards")
    t0 = time.time()
    result = trainer.launch(_train_loop, {**run, "cfg": to_dict(cfg)}, runs_url=Corpus(root).runs,
                            name=run["run"], scale=cfg.scale)
    ckpt = trainer.checkpoint_files(result)
    if ckpt is None:
        raise RuntimeError(f"LDM run {run['run']} ended without a checkpoint: {result.error}")
    model, tokenizer, state = load_checkpoint(ckpt)
    metrics = state["metrics"]
    info = {"run": run["run_url"], "latents": run["latents"], "vae_version": run["vae_version"],
            "steps": cfg.steps, "workers": cfg.scale.num_workers,
            "loss": metrics.get("loss"), "heldout_loss": metrics.get("heldout_loss"),
            "heldout_split": metrics.get("heldout_split"), "curve": state.get("curve", []),
            "samples_per_s": metrics.get("samples_per_s"), "spec": run["spec"],
            "config": to_dict(cfg), "seconds": round(time.time() - t0, 1),
            "checkpoint": str(getattr(result.checkpoint, "path", ""))}
    if not cfg.publish:
        return {"version": None, "checkpoint_dir": ckpt, **info}
    corpus = Corpus(root)
    root = corpus.root
    version = run["version"]
    d = corpus.model_dir("ldm", version)
    vae, _ = load_vae_version(root, run["vae_version"])
    with tempfile.TemporaryDirectory() as tmp:
        export_pipeline(tmp, model, vae, tokenizer)
        for dirpath, _, files in os.walk(tmp):
            for fname in files:
                rel = os.path.relpath(os.path.join(dirpath, fname), tmp)
                storage.put_file(os.path.join(dirpath, fname), storage.join(d, "pipeline", rel))
    grid = os.path.join(ckpt, "samples.png")
    if os.path.exists(grid):
        storage.put_file(grid, storage.join(d, "samples.png"))
    storage.write_json(storage.join(d, "metrics.json"), info)
    versions.publish_version(corpus, "ldm", version, **info)
    logger.info("ldm %s: held-out loss %s, samples %s", version, info["heldout_loss"],
                storage.join(d, "samples.png"))
    return {"version": version, "samples": storage.join(d, "samples.png"), **info}
