"""``dataengine train-sam``: retrain SAM on the accepted rounds with Ray Train, publish a version.

One machine (a local Ray is started when none is running)::

    dataengine train-sam --root ROOT --set steps=600 --set scale.num_workers=2 \\
        --set scale.cpus_per_worker=1 --set scale.torch_threads=1

Many machines: start Ray on every node (``ray start --head`` / ``ray start --address=HEAD``), put
the corpus on shared storage (``--root s3://bucket/corpus``) and run the same command on the head
with ``RAY_ADDRESS=auto`` (or submit it: ``ray job submit -- dataengine train-sam ...``); use
``--set scale.use_gpu=true --set scale.placement_strategy=SPREAD`` for one GPU worker per node.

What a run does:

1. plans its data on the driver (:func:`dataengine.pipeline.sam.training_data.plan_training_data`:
   every complete
   round, round 0 only with ``data.train_on_imported``, curation rejections and held-out keys
   excluded);
2. picks its starting weights (``init``): ``current`` = the promoted version
   (:func:`dataengine.pipeline.core.promotion.current_version`; random init when none), ``random``,
   a version name ``vNNNN``, or ``checkpoint`` = an official ``.pth`` / safetensors file
   (``checkpoint``);
3. trains with :func:`dataengine.pipeline.core.trainer.launch` (DDP, gloo on CPU; each worker
   streams its own disjoint shards; checkpoints under ``ROOT/runs/sam-vNNNN/`` with
   ``FailureConfig``, so a lost worker resumes from the last checkpoint, and re-running the command
   after a crash resumes the same version's run) with
   :func:`dataengine.pipeline.sam.loss.train_step` (AdamW, linear warm-up, cosine decay, optional
   frozen encoder);
4. publishes ``ROOT/models/sam/vNNNN/``: ``model.safetensors`` + ``config.json``
   (:func:`dataengine.models.sam.save_sam`), ``training.json`` (rounds, mask counts, data plan
   summary, config, parent), ``metrics.json`` (training figures), then ``version.json`` last.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from dataengine.models.checkpoint import weights_digest
from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import storage, versions
from dataengine.pipeline.core.checkpoints import read_state_dict
from dataengine.pipeline.core.layout import Corpus, parse_version
from dataengine.pipeline.core.trainer import ScaleConfig
from dataengine.pipeline.sam.loss import RecipeConfig
from dataengine.pipeline.sam.training_data import DataConfig, TrainingPlan, plan_with_masks

logger = logging.getLogger(__name__)

INITS = ("current", "random", "checkpoint")


@dataclass
class TrainSamConfig:
    """Settings of one SAM training run (``dataengine train-sam``)."""

    model: str = "tiny"                 # registry config for random init / checkpoint loading
    init: str = "current"               # current | random | checkpoint | vNNNN
    checkpoint: str | None = None       # official .pth / .safetensors (init=checkpoint)
    steps: int = 300
    batch_images: int = 4               # images per worker per step
    masks_per_image: int = 4
    min_mask_area: int = 64             # model-frame px; smaller masks are not trained on
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 30
    min_lr_factor: float = 0.1          # cosine decay floor (fraction of lr)
    grad_clip: float = 1.0
    freeze_encoder: bool = False        # decoder-only retraining (fast)
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    sync_gradients: bool = True         # False only for control runs (workers diverge)
    heartbeat: str | None = None        # file each step appends "pid rank step" to (liveness)
    data: DataConfig = field(default_factory=DataConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)

    def __post_init__(self) -> None:
        for name, cls in (("data", DataConfig), ("recipe", RecipeConfig), ("scale", ScaleConfig)):
            v = getattr(self, name)
            if isinstance(v, dict):
                setattr(self, name, config_mod.from_dict(cls, v, where=name))
        if self.init not in INITS:
            try:
                parse_version(self.init)
            except ValueError:
                raise ValueError(f"init={self.init!r}: one of {INITS} or a version vNNNN") \
                    from None
        if self.init == "checkpoint" and not self.checkpoint:
            raise ValueError("init='checkpoint' needs checkpoint=PATH (.pth or .safetensors)")
        for name in ("steps", "batch_images", "masks_per_image", "checkpoint_every",
                     "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr}: must be > 0")
        if self.warmup_steps < 0 or self.min_mask_area < 0:
            raise ValueError("warmup_steps and min_mask_area must be >= 0")
        if not 0.0 <= self.min_lr_factor <= 1.0:
            raise ValueError(f"min_lr_factor={self.min_lr_factor}: must be in [0, 1]")
        from dataengine.models.sam import get_config

        get_config(self.model)


# ---- worker side ---------------------------------------------------------------------------

def _train_loop(config: dict[str, Any]) -> None:
    """Per-worker training loop (runs inside a Ray Train worker)."""
    import random

    import torch

    from dataengine.models.sam import build_sam, load_weights
    from dataengine.models.sam2 import SquareResize
    from dataengine.pipeline.core import trainer
    from dataengine.pipeline.sam.loss import SamLossModule, lr_factor, train_step
    from dataengine.pipeline.sam.training_data import (batches, my_shard_share, stream_samples,
                                                       write_read_log)

    cfg = config_mod.from_dict(TrainSamConfig, config["cfg"])
    plan = TrainingPlan.from_dict(config["plan"])
    corpus = Corpus(config["root"])
    ctx = trainer.context(config)
    torch.manual_seed(cfg.seed)
    sam = build_sam(config["sam_config"], seed=cfg.seed, device="cpu")
    if config.get("init_url"):
        load_weights(sam, read_state_dict(config["init_url"]))
    module = SamLossModule(sam, cfg.recipe, freeze_encoder=cfg.freeze_encoder)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = trainer.restore(models={"sam": sam}, optimizers={"opt": opt})
    start = int(state["step"]) + 1 if state else 0
    history: list[dict[str, float]] = list((state or {}).get("history", []))
    model = trainer.prepare(module, sync_gradients=cfg.sync_gradients)
    shards = my_shard_share(plan.shards, ctx.rank, ctx.world_size)
    read_keys: set[str] = set()
    read_shards: set[str] = set()

    def on_read(s):
        read_keys.add(s.key)
        read_shards.add(s.shard)

    stream = stream_samples(corpus, plan, shards, seed=cfg.seed * 1009 + ctx.rank * 7 + start,
                            skip_crowd=cfg.data.skip_crowd, on_read=on_read)
    size = sam.image_encoder.img_size
    feed = batches(stream, cfg.batch_images, image_size=size,
                   pixel_mean=tuple(float(v) for v in sam.pixel_mean.flatten()),
                   pixel_std=tuple(float(v) for v in sam.pixel_std.flatten()),
                   masks_per_image=cfg.masks_per_image, min_area=cfg.min_mask_area,
                   seed=cfg.seed * 31 + ctx.rank + start,
                   square=isinstance(getattr(sam, "transform", None), SquareResize))
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + ctx.rank * 104729 + start)
    random.seed(cfg.seed + ctx.rank)
    window: list[dict[str, float]] = []
    t0 = time.time()
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_factor)
        batch, _keys = next(feed)
        stats = train_step(model, opt, batch.to(ctx.device), generator=gen,
                           grad_clip=cfg.grad_clip)
        window.append(stats)
        if cfg.heartbeat:
            with open(cfg.heartbeat, "a") as f:
                f.write(f"{os.getpid()} {ctx.rank} {step}\n")
        last = step == cfg.steps - 1
        ckpt = (step + 1) % cfg.checkpoint_every == 0 or last
        if (step + 1) % cfg.log_every == 0 or ckpt:
            history.append({"step": step, "lr": opt.param_groups[0]["lr"],
                            **window_stats(window),
                            "steps_per_s": len(window) / max(time.time() - t0, 1e-6)})
            window, t0 = [], time.time()
            trainer.report({"step": step, "start": start, "rank": ctx.rank, **history[-1]},
                           models={"sam": sam} if ckpt else None,
                           optimizers={"opt": opt} if ckpt else None,
                           extra={"step": step, "history": history})
    import ray

    write_read_log(config["read_log_url"], ctx.rank, read_keys, read_shards,
                   {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                    "start": start, "weights_sha256": weights_digest(sam)})


STAT_KEYS = ("loss", "focal", "dice", "iou_mse", "iou_first", "iou_last")


def window_stats(window: list[dict[str, float]]) -> dict[str, Any]:
    """Mean training stats over the logged window of steps, and how many had no prompt.

    A batch without a usable mask still steps (its zero loss keeps DDP workers in lockstep)
    but has no prompt stats; the means are over the batches that had prompts (None if none).
    """
    full = [w for w in window if w.get("masks")]
    mean = {k: sum(float(w[k]) for w in full) / len(full) if full else None for k in STAT_KEYS}
    return {**mean, "empty_batches": len(window) - len(full)}




# ---- driver side ---------------------------------------------------------------------------




def resolve_init(corpus: Corpus, cfg: TrainSamConfig) -> tuple[str | None, Any, str | None]:
    """``(parent version, SAM config, weights URL)`` for the run's starting point."""
    from dataengine.models.sam import get_config

    if cfg.init == "checkpoint":
        return None, get_config(cfg.model), cfg.checkpoint
    if cfg.init == "random":
        return None, get_config(cfg.model), None
    if cfg.init == "current":
        from dataengine.pipeline.core.promotion import current_version

        version = current_version(corpus)
        if version is None:
            logger.info("no promoted SAM version yet: starting from random init (%s)",
                        cfg.model)
            return None, get_config(cfg.model), None
    else:
        version = cfg.init
    vdir = corpus.model_dir("sam", version)
    if not storage.exists(storage.join(vdir, "version.json")):
        raise FileNotFoundError(f"init={version}: SAM version {vdir} is not published")
    meta = storage.read_json(storage.join(vdir, "config.json"))
    return version, get_config(meta["sam"]), vdir


def train_sam(root: str, config: TrainSamConfig | None = None) -> dict[str, Any]:
    """Train a new SAM version on the corpus at ``root``; returns its summary.

    Raises ValueError when the plan holds no training masks.
    """
    from dataengine.models.sam import build_sam, load_weights
    from dataengine.pipeline.core import trainer
    from dataengine.pipeline.core.checkpoints import save_sam

    cfg = config or TrainSamConfig()
    corpus = Corpus(root)
    root = corpus.root
    t0 = time.time()
    plan = plan_with_masks(corpus, cfg.data, "train-sam")
    parent, sam_cfg, init_url = resolve_init(corpus, cfg)
    fp = versions.fingerprint(config_mod.to_dict(cfg), rounds=plan.rounds, masks=plan.n_masks,
                              parent=parent)
    version, vdir, run_name, run_url = versions.begin_version(corpus, "sam", fp, "sam",
                                                             parent=parent)
    logger.info("train-sam %s: parent=%s, %d images / %d masks from rounds %s, %d steps x %d "
                "workers", version, parent, plan.n_images, plan.n_masks, plan.rounds,
                cfg.steps, cfg.scale.num_workers)
    loop_cfg = {"cfg": config_mod.to_dict(cfg), "plan": plan.to_dict(), "root": root,
                "sam_config": sam_cfg.to_dict(), "init_url": init_url,
                "read_log_url": run_url}
    result = trainer.launch(_train_loop, loop_cfg, runs_url=corpus.runs, name=run_name,
                            scale=cfg.scale)
    ckpt_dir, state = trainer.final_checkpoint(result, f"train-sam {version}")
    model = build_sam(sam_cfg, seed=None, device="cpu")
    load_weights(model, os.path.join(ckpt_dir, "sam.safetensors"))
    seconds = round(time.time() - t0, 1)
    save_sam(model, vdir, extra={"version": version, "parent": parent})
    training = {"version": version, "parent": parent, "rounds": plan.rounds,
                "mask_counts": plan.mask_counts, "data": plan.summary(),
                "init": cfg.init, "init_weights": init_url, "config": config_mod.to_dict(cfg),
                "run": run_url}
    storage.write_json(storage.join(vdir, "training.json"), training)
    history = state.get("history", [])
    final = history[-1] if history else {}
    metrics = {"version": version, "steps": int(state.get("step", -1)) + 1,
               "final_loss": final.get("loss"), "final_iou_first": final.get("iou_first"),
               "final_iou_last": final.get("iou_last"), "seconds": seconds,
               "workers": cfg.scale.num_workers, "history": history}
    storage.write_json(storage.join(vdir, "metrics.json"), metrics)
    versions.publish_version(corpus, "sam", version, parent=parent, model=sam_cfg.name,
                             rounds=plan.rounds, masks=plan.n_masks)
    logger.info("train-sam %s published (%.0f s, final loss %s)", version, seconds,
                final.get("loss"))
    return {"version": version, "parent": parent, "rounds": plan.rounds,
            "masks": plan.n_masks, "images": plan.n_images, "steps": metrics["steps"],
            "final_loss": final.get("loss"), "seconds": seconds, "run": run_url}


