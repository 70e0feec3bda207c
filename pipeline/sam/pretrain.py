"""``dataengine pretrain-sam``: pre-train a small SAM before round 1, publish a starting version.

When there is no published checkpoint, the engine starts from random weights; this stage gives it
a better start, in three phases (any may be 0 steps):

1. **MAE** (He et al. 2022; SAM's encoder was MAE-pre-trained): ``mask_ratio`` of the 16x16 px
   patches of each training image are blanked (set to the mean colour), the image encoder + a small
   pixel decoder (:class:`dataengine.models.sam_small.MaeHead`) reconstruct the per-patch normalised
   pixels of the blanked patches. No labels. The decoder is dropped afterwards.
2. **Procedural** (``procedural_steps``, default 0): "dead leaves" scenes generated on the fly
   (:mod:`dataengine.pipeline.sam.procedural`; shapes, fills and real cut-outs of the training
   split as donors; occlusion gives exact masks), a pure function of ``(seed, rank, step)``, so a
   resumed run sees the same stream and nothing is stored. The curriculum ``level`` rises
   linearly from ``procedural_level_start`` to ``procedural_level_end`` over the phase. The whole
   SAM is trained with the promptable recipe, plus, for models with prototype matching
   (``tiny-hq-match``), the dense prototype loss (``proto_loss_weight``).
3. **Copy-paste** (Ghiasi et al. 2021): object cut-outs from masks the corpus already has
   (imported round 0 and accepted rounds, training split only) are pasted, rescaled and flipped,
   onto other training images; each composite carries exact masks (a pasted object's mask is exactly
   the pixels it replaced; objects it covers lose those pixels), and the whole SAM is trained on
   them with the promptable recipe (:func:`dataengine.pipeline.sam.loss.promptable_loss`).

Held-out keys never reach it (:func:`dataengine.pipeline.sam.training_data.plan_training_data`). The
result is ``ROOT/models/sam/vNNNN/`` like ``train-sam`` writes (``training.json`` with ``kind:
pretrain``); start the engine or ``train-sam`` from it with ``init=vNNNN``.

One machine::

    dataengine pretrain-sam --root ROOT --set model=tiny-conv --set mae_steps=200 \\
        --set copypaste_steps=300 --set scale.torch_threads=2

The starting checkpoint's recipe (README, "Small SAM"): procedural phases chained with
``init=vNNNN`` (easy flat shapes first, then the full generator), then copy-paste.

Many machines: as ``train-sam`` (Ray on every node, the corpus on shared storage, ``RAY_ADDRESS``
set, ``--set scale.num_workers=N``); each worker reads its own disjoint shards, gradients are
synchronised by DDP, checkpoints go to ``ROOT/runs/pretrain-sam-vNNNN/`` and a re-run resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import storage, versions
from dataengine.pipeline.core.checkpoints import read_state_dict
from dataengine.pipeline.core.layout import Corpus, parse_version
from dataengine.pipeline.core.trainer import ScaleConfig
from dataengine.pipeline.sam.loss import Batch, RecipeConfig, promptable_loss
from dataengine.pipeline.sam.procedural import DonorPool, ProceduralConfig, scene_samples
from dataengine.pipeline.sam.training_data import (DataConfig, Sample, TrainingPlan,
                                                   plan_with_masks)

logger = logging.getLogger(__name__)


@dataclass
class CopyPasteConfig:
    """How composites are made."""

    max_objects: int = 3                 # objects pasted per composite (1..max)
    min_size: float = 0.15               # pasted object's longest side / image's longest side
    max_size: float = 0.6
    flip_prob: float = 0.5
    min_donor_area: int = 256            # donor masks smaller than this (px at 256) are skipped
    min_kept_area: int = 64              # occluded masks left smaller than this are dropped

    def __post_init__(self) -> None:
        if self.max_objects < 1:
            raise ValueError(f"max_objects={self.max_objects}: must be >= 1")
        if not 0 < self.min_size <= self.max_size <= 1:
            raise ValueError(f"min_size={self.min_size}, max_size={self.max_size}: need "
                             f"0 < min_size <= max_size <= 1")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob={self.flip_prob}: must be in [0, 1]")


@dataclass
class PretrainSamConfig:
    """Settings of one pre-training run (``dataengine pretrain-sam``)."""

    model: str = "tiny-conv"            # registry config (random init)
    init: str = "random"                # random | vNNNN (continue from a version)
    mae_steps: int = 200
    procedural_steps: int = 0
    copypaste_steps: int = 300
    procedural_level_start: float = 0.0  # curriculum level at the start of the procedural phase
    procedural_level_end: float = 1.0    # ... at its end (linear)
    proto_loss_weight: float = 0.0       # dense prototype loss (models with hq_proto only)
    mask_ratio: float = 0.6
    batch_images: int = 4
    masks_per_image: int = 4
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 20              # per phase
    min_lr_factor: float = 0.1
    grad_clip: float = 1.0
    donor_pool: int = 64                # samples kept as cut-out donors
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    copypaste: CopyPasteConfig = field(default_factory=CopyPasteConfig)
    procedural: ProceduralConfig = field(default_factory=ProceduralConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(train_on_imported=True))
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)

    def __post_init__(self) -> None:
        for name, cls in (("copypaste", CopyPasteConfig), ("procedural", ProceduralConfig),
                          ("data", DataConfig),
                          ("recipe", RecipeConfig), ("scale", ScaleConfig)):
            v = getattr(self, name)
            if isinstance(v, dict):
                setattr(self, name, config_mod.from_dict(cls, v, where=name))
        if self.init != "random":
            try:
                parse_version(self.init)
            except ValueError:
                raise ValueError(f"init={self.init!r}: 'random' or a version vNNNN") from None
        for name in ("mae_steps", "procedural_steps", "copypaste_steps", "warmup_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.steps < 1:
            raise ValueError("mae_steps + procedural_steps + copypaste_steps must be >= 1")
        for name in ("procedural_level_start", "procedural_level_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1]")
        if self.proto_loss_weight < 0:
            raise ValueError(f"proto_loss_weight={self.proto_loss_weight}: must be >= 0")
        for name in ("batch_images", "masks_per_image", "donor_pool", "checkpoint_every",
                     "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio}: must be in (0, 1)")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr}: must be > 0")
        from dataengine.models.sam import get_config
        from dataengine.models.sam2 import Sam2Config

        if isinstance(get_config(self.model), Sam2Config):
            raise ValueError(f"model={self.model!r}: pretrain-sam pre-trains SAM v1 encoders; "
                             f"a SAM 2 model starts from an official checkpoint or random "
                             f"weights (train-sam)")
        if self.proto_loss_weight > 0 and not get_config(self.model).hq_proto:
            raise ValueError(f"proto_loss_weight={self.proto_loss_weight}: needs a model with "
                             f"prototype matching (hq_proto, e.g. tiny-hq-match), not "
                             f"{self.model!r}")

    @property
    def steps(self) -> int:
        return self.mae_steps + self.procedural_steps + self.copypaste_steps

    def level_at(self, k: int) -> float:
        """Curriculum level of step ``k`` of the procedural phase."""
        t = k / max(1, self.procedural_steps - 1)
        return self.procedural_level_start + t * (self.procedural_level_end -
                                                  self.procedural_level_start)


# ---- copy-paste composites -----------------------------------------------------------------

def shrink_sample(sample: Sample, size: int) -> Sample:
    """The sample with its longest side resized to ``size`` (masks nearest-neighbour); masks
    that vanish are dropped."""
    h, w = sample.image.shape[:2]
    scale = size / max(h, w)
    if abs(scale - 1.0) < 1e-6:
        return sample
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    image = cv2.resize(sample.image, (nw, nh), interpolation=cv2.INTER_AREA)
    masks, ids = [], []
    for m, mid in zip(sample.masks, sample.mask_ids, strict=True):
        r = cv2.resize(m.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST) > 0
        if r.any():
            masks.append(r)
            ids.append(mid)
    return Sample(sample.key, sample.shard, image, masks, ids)


def cut_out(sample: Sample, index: int) -> tuple[np.ndarray, np.ndarray]:
    """``(crop HxWx3 uint8, mask HxW bool)`` of object ``index`` inside its bounding box."""
    m = sample.masks[index]
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        raise ValueError(f"mask {sample.mask_ids[index]} of {sample.key} is empty")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return sample.image[y0:y1, x0:x1].copy(), m[y0:y1, x0:x1].copy()


def copy_paste(target: Sample, donors: Sequence[Sample], rng: random.Random,
               cfg: CopyPasteConfig | None = None) -> tuple[Sample, list[int]]:
    """Paste 1..``max_objects`` donor objects onto ``target``; returns the composite and the
    indices of the pasted masks in it.

    Exact masks: a pasted mask is exactly the set of pixels its object replaced; every mask
    below it (the target's own and earlier pasted ones) loses those pixels, and is dropped when
    fewer than ``min_kept_area`` px (at 256) remain. Donors with no usable mask are skipped.
    """
    cfg = cfg or CopyPasteConfig()
    image = target.image.copy()
    h, w = image.shape[:2]
    masks = [m.copy() for m in target.masks]
    ids = list(target.mask_ids)
    pasted_idx: list[int] = []
    scale256 = (256.0 / max(h, w)) ** 2
    choices = [(d, k) for d in donors if d.key != target.key
               for k, m in enumerate(d.masks) if m.sum() * (256.0 / max(m.shape)) ** 2
               >= cfg.min_donor_area]
    n = rng.randint(1, cfg.max_objects)
    for _ in range(n if choices else 0):
        donor, k = rng.choice(choices)
        crop, cmask = cut_out(donor, k)
        ch, cw = cmask.shape
        side = rng.uniform(cfg.min_size, cfg.max_size) * max(h, w)
        s = min(side / max(ch, cw), (h - 1) / ch, (w - 1) / cw)
        nh, nw = max(1, int(round(ch * s))), max(1, int(round(cw * s)))
        # nearest for pixels and mask alike: every pixel under a pasted mask is an object pixel
        crop = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_NEAREST)
        cmask = cv2.resize(cmask.astype(np.uint8), (nw, nh),
                           interpolation=cv2.INTER_NEAREST) > 0
        if rng.random() < cfg.flip_prob:
            crop, cmask = crop[:, ::-1], cmask[:, ::-1]
        if not cmask.any():
            continue
        y0 = rng.randint(0, h - nh)
        x0 = rng.randint(0, w - nw)
        full = np.zeros((h, w), dtype=bool)
        full[y0:y0 + nh, x0:x0 + nw] = cmask
        region = image[y0:y0 + nh, x0:x0 + nw]
        region[cmask] = crop[cmask]
        for m in masks:
            m &= ~full
        masks.append(full)
        ids.append(f"paste/{donor.mask_ids[k]}")
        pasted_idx.append(len(masks) - 1)
    # an object (pasted or not) covered down to under min_kept_area px by later pastes is
    # dropped; every kept mask is exactly its object's visible pixels
    keep = [i for i, m in enumerate(masks) if m.any() and m.sum() * scale256 >= cfg.min_kept_area]
    remap = {old: new for new, old in enumerate(keep)}
    out = Sample(f"{target.key}+paste", target.shard, image, [masks[i] for i in keep],
                 [ids[i] for i in keep])
    return out, [remap[i] for i in pasted_idx if i in remap]


def composite_batch(targets: Sequence[Sample], donors: Sequence[Sample], rng: random.Random,
                    cfg: PretrainSamConfig, image_size: int, pixel_mean: Sequence[float],
                    pixel_std: Sequence[float]) -> Batch:
    """A :class:`Batch` of copy-paste composites in the padded ``image_size`` model frame,
    pasted masks first in each image's list."""
    from dataengine.pipeline.sam.training_data import make_batch

    comps = []
    for t in targets:
        comp, pasted = copy_paste(t, donors, rng, cfg.copypaste)
        order = pasted + [i for i in range(len(comp.masks)) if i not in pasted]
        comps.append(Sample(comp.key, comp.shard, comp.image, [comp.masks[i] for i in order],
                            [comp.mask_ids[i] for i in order]))
    return make_batch(comps, image_size, tuple(pixel_mean), tuple(pixel_std),
                      cfg.masks_per_image, min_area=16, rng=rng)


# ---- masked autoencoder --------------------------------------------------------------------

def mae_loss(encoder: torch.nn.Module, head: torch.nn.Module, images: torch.Tensor,
             sizes: torch.Tensor | None = None, mask_ratio: float = 0.6,
             generator: torch.Generator | None = None, patch: int = 16) -> torch.Tensor:
    """Masked-autoencoder loss: blank ``mask_ratio`` of the ``patch`` px patches of ``images``
    (Bx3xSxS normalised, 0 = mean colour), reconstruct them with ``head(encoder(.))``; MSE on
    per-patch normalised pixels of the blanked patches that lie inside the image (``sizes``
    Bx2 (h, w) of the unpadded image; None = all)."""
    b, _, s, _ = images.shape
    g = s // patch
    masked = torch.rand(b, 1, g, g, generator=generator).to(images.device) < mask_ratio
    pix_mask = masked.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    x = images * (~pix_mask)
    pred = head(encoder(x))                                         # Bx3xSxS
    tgt = F.unfold(images, patch, stride=patch)                     # Bx(3pp)xL
    mean, var = tgt.mean(1, keepdim=True), tgt.var(1, keepdim=True)
    tgt = (tgt - mean) / (var + 1e-6).sqrt()
    out = F.unfold(pred, patch, stride=patch)
    per_patch = ((out - tgt) ** 2).mean(1)                          # BxL
    weight = masked.flatten(1).float()
    if sizes is not None:
        cy = (torch.arange(g, device=images.device) * patch)[None, :, None]
        cx = (torch.arange(g, device=images.device) * patch)[None, None, :]
        inside = (cy < sizes[:, 0, None, None]) & (cx < sizes[:, 1, None, None])
        weight = weight * inside.flatten(1).float()
    return (per_patch * weight).sum() / weight.sum().clamp(min=1)


class PretrainModule(torch.nn.Module):
    """SAM + MAE pixel decoder as one module (one DDP wrap for both phases):
    ``forward("mae" | "seg", batch, generator) -> (loss, stats)``; parameters a phase does not
    use enter its loss with weight 0, so DDP needs no ``find_unused_parameters``."""

    def __init__(self, sam: Any, head: torch.nn.Module, recipe: RecipeConfig,
                 mask_ratio: float = 0.6, proto_loss_weight: float = 0.0) -> None:
        super().__init__()
        self.sam = sam
        self.head = head
        self.recipe = recipe
        self.mask_ratio = mask_ratio
        self.proto_loss_weight = proto_loss_weight

    def _aux(self, feats: torch.Tensor, gt: torch.Tensor, img_idx: torch.Tensor) -> Any:
        from dataengine.models.sam_hq import prototype_loss

        loss, stats = prototype_loss(feats, gt, img_idx, self.sam.prompt_encoder.embed_dim)
        return self.proto_loss_weight * loss, stats

    def forward(self, kind: str, batch: Batch, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        keep = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        if kind == "mae":
            loss = mae_loss(self.sam.image_encoder, self.head, batch.images, batch.sizes,
                            self.mask_ratio, generator)
            return loss + keep, {"loss": float(loss.detach())}
        if kind in ("proc", "seg"):
            aux = self._aux if self.proto_loss_weight > 0 else None
            out = promptable_loss(self.sam, batch, self.recipe, generator=generator, aux_loss=aux)
            return out.loss + keep, out.stats
        raise ValueError(f"kind={kind!r}: 'mae', 'proc' or 'seg'")


def pretrain_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, kind: str,
                  batch: Batch, generator: torch.Generator | None = None,
                  grad_clip: float = 1.0) -> dict[str, float]:
    """One optimiser step of phase ``kind`` on a (possibly DDP-wrapped) :class:`PretrainModule`."""
    module.train()
    loss, stats = module(kind, batch, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in module.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else torch.zeros(())
    optimizer.step()
    return {**stats, "grad_norm": float(norm)}


def phase_lr(step: int, cfg: PretrainSamConfig) -> tuple[str, float]:
    """``(phase, lr)`` of global ``step``: MAE steps first, then procedural scenes, then
    copy-paste; warm-up + cosine within each phase."""
    from dataengine.pipeline.sam.loss import lr_factor

    if step < cfg.mae_steps:
        return "mae", cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.mae_steps,
                                         cfg.min_lr_factor)
    k = step - cfg.mae_steps
    if k < cfg.procedural_steps:
        return "proc", cfg.lr * lr_factor(k, cfg.warmup_steps, cfg.procedural_steps,
                                          cfg.min_lr_factor)
    k -= cfg.procedural_steps
    return "seg", cfg.lr * lr_factor(k, cfg.warmup_steps, cfg.copypaste_steps,
                                     cfg.min_lr_factor)


# ---- Ray Train worker ----------------------------------------------------------------------

def _pretrain_loop(config: dict[str, Any]) -> None:
    """Per-worker loop (inside a Ray Train worker)."""
    from dataengine.models.sam import build_sam, load_weights
    from dataengine.models.sam_small import MaeHead
    from dataengine.pipeline.core import trainer
    from dataengine.pipeline.sam.training_data import make_batch, my_shard_share, stream_samples

    cfg = config_mod.from_dict(PretrainSamConfig, config["cfg"])
    plan = TrainingPlan.from_dict(config["plan"])
    corpus = Corpus(config["root"])
    ctx = trainer.context(config)
    torch.manual_seed(cfg.seed)
    sam = build_sam(config["sam_config"], seed=cfg.seed, device="cpu")
    if config.get("init_url"):
        load_weights(sam, read_state_dict(config["init_url"]))
    head = MaeHead(sam.prompt_encoder.embed_dim)
    module = PretrainModule(sam, head, cfg.recipe, cfg.mask_ratio, cfg.proto_loss_weight)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = trainer.restore(models={"sam": sam, "mae_head": head}, optimizers={"opt": opt})
    start = int(state["step"]) + 1 if state else 0
    history: list[dict[str, float]] = list((state or {}).get("history", []))
    model = trainer.prepare(module)
    shards = my_shard_share(plan.shards, ctx.rank, ctx.world_size)
    stream = stream_samples(corpus, plan, shards, seed=cfg.seed * 1009 + ctx.rank * 7 + start,
                            skip_crowd=cfg.data.skip_crowd)
    mean = tuple(float(v) for v in sam.pixel_mean.flatten())
    std = tuple(float(v) for v in sam.pixel_std.flatten())
    size = sam.image_encoder.img_size
    rng = random.Random(cfg.seed * 31 + ctx.rank + start)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + ctx.rank * 104729 + start)
    pool: list[Sample] = []

    def take(n: int) -> list[Sample]:
        out = []
        for s in stream:
            s = shrink_sample(s, size)
            if not s.masks:
                continue
            out.append(s)
            if len(pool) < cfg.donor_pool:
                pool.append(s)
            else:
                pool[rng.randrange(len(pool))] = s
            if len(out) == n:
                break
        return out

    window: list[dict[str, float]] = []
    donors: DonorPool | None = None
    t0 = time.time()
    for step in range(start, cfg.steps):
        kind, lr = phase_lr(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        if kind == "proc":
            donors = _donors(pool, donors, take, cfg)
            scenes = _scenes(cfg, step - cfg.mae_steps, ctx.rank, size, donors)
            batch = make_batch(scenes, size, mean, std, cfg.masks_per_image, min_area=16,
                               rng=rng)
        elif kind == "mae":
            batch = make_batch(take(cfg.batch_images), size, mean, std, 1, rng=rng)
        else:
            targets = take(cfg.batch_images)
            batch = composite_batch(targets, pool, rng, cfg, size, mean, std)
        stats = pretrain_step(model, opt, kind, batch.to(ctx.device), gen, cfg.grad_clip)
        window.append(stats)
        last = step == cfg.steps - 1
        ckpt = (step + 1) % cfg.checkpoint_every == 0 or last or \
            step + 1 in (cfg.mae_steps, cfg.mae_steps + cfg.procedural_steps)
        if (step + 1) % cfg.log_every == 0 or ckpt:
            keys = sorted(set.intersection(*(set(w) for w in window)))
            row = {"step": step, "phase": kind, "lr": lr,
                   **{k: float(np.mean([w[k] for w in window])) for k in keys},
                   "steps_per_s": len(window) / max(time.time() - t0, 1e-6)}
            history.append(row)
            window, t0 = [], time.time()
            trainer.report({"step": step, "rank": ctx.rank, "loss": row["loss"]},
                           models={"sam": sam, "mae_head": head} if ckpt else None,
                           optimizers={"opt": opt} if ckpt else None,
                           extra={"step": step, "history": history})


def _scenes(cfg: PretrainSamConfig, k: int, rank: int, size: int,
            donors: DonorPool | None) -> list[Sample]:
    """Procedural step ``k``'s scenes for worker ``rank`` at the curriculum level of that step."""
    level_cfg = dataclasses.replace(cfg.procedural, level=cfg.level_at(k), size=size)
    return scene_samples(cfg.seed * 1000 + rank, k * cfg.batch_images, cfg.batch_images,
                         level_cfg, donors)


def _donors(pool: list[Sample], donors: DonorPool | None, take: Any,
            cfg: PretrainSamConfig) -> DonorPool:
    """The procedural phase's donors (photos and object cut-outs of the training split): the
    pool is filled once (``donor_pool`` samples), then kept."""
    if donors is not None:
        return donors
    while len(pool) < cfg.donor_pool and take(cfg.batch_images):
        pass
    return DonorPool.from_samples([s.image for s in pool], [s.masks for s in pool])


# ---- driver --------------------------------------------------------------------------------




def pretrain_sam(root: str, config: PretrainSamConfig | None = None) -> dict[str, Any]:
    """Pre-train a SAM on the training split of ``root`` and publish it as a new version.

    Raises ValueError when the corpus has no training masks to cut objects from.
    """
    from dataengine.models.sam import build_sam, get_config, load_weights
    from dataengine.pipeline.core import trainer
    from dataengine.pipeline.core.checkpoints import save_sam

    cfg = config or PretrainSamConfig()
    corpus = Corpus(root)
    root = corpus.root
    t0 = time.time()
    plan = plan_with_masks(corpus, cfg.data, "pretrain-sam")
    parent, init_url = None, None
    sam_cfg = get_config(cfg.model)
    if cfg.init != "random":
        vdir0 = corpus.model_dir("sam", cfg.init)
        if not storage.exists(storage.join(vdir0, "version.json")):
            raise FileNotFoundError(f"init={cfg.init}: SAM version {vdir0} is not published")
        parent, init_url = cfg.init, vdir0
        sam_cfg = get_config(storage.read_json(storage.join(vdir0, "config.json"))["sam"])
    fp = versions.fingerprint(config_mod.to_dict(cfg), masks=plan.n_masks, rounds=plan.rounds)
    version, vdir, run_name, run_url = versions.begin_version(corpus, "sam", fp, "pretrain-sam",
                                                             kind="pretrain")
    logger.info("pretrain-sam %s (%s): %d images / %d masks, MAE %d + procedural %d + "
                "copy-paste %d steps", version, sam_cfg.name, plan.n_images, plan.n_masks,
                cfg.mae_steps, cfg.procedural_steps, cfg.copypaste_steps)
    loop_cfg = {"cfg": config_mod.to_dict(cfg), "plan": plan.to_dict(), "root": root,
                "sam_config": sam_cfg.to_dict(), "init_url": init_url}
    result = trainer.launch(_pretrain_loop, loop_cfg, runs_url=corpus.runs, name=run_name,
                            scale=cfg.scale)
    ckpt_dir, state = trainer.final_checkpoint(result, f"pretrain-sam {version}")
    model = build_sam(sam_cfg, seed=None, device="cpu")
    load_weights(model, os.path.join(ckpt_dir, "sam.safetensors"))
    seconds = round(time.time() - t0, 1)
    save_sam(model, vdir, extra={"version": version, "parent": parent})
    cfg_d = config_mod.to_dict(cfg)
    storage.write_json(storage.join(vdir, "training.json"),
                       {"version": version, "kind": "pretrain", "parent": parent,
                        "rounds": plan.rounds, "mask_counts": plan.mask_counts,
                        "data": plan.summary(), "init": cfg.init, "config": cfg_d,
                        "run": run_url})
    history = state.get("history", [])
    storage.write_json(storage.join(vdir, "metrics.json"),
                       {"version": version, "steps": int(state.get("step", -1)) + 1,
                        "final_loss": history[-1]["loss"] if history else None,
                        "seconds": seconds, "history": history})
    steps = int(state.get("step", -1)) + 1
    versions.publish_version(corpus, "sam", version, parent=parent, model=sam_cfg.name,
                             rounds=plan.rounds, masks=plan.n_masks, pretrain=True,
                             seed=cfg.seed, steps=steps, wall_seconds=seconds,
                             data={"corpus": plan.summary(), "mae_steps": cfg.mae_steps,
                                   "procedural_steps": cfg.procedural_steps,
                                   "procedural": config_mod.to_dict(cfg.procedural),
                                   "copypaste_steps": cfg.copypaste_steps})
    logger.info("pretrain-sam %s published (%.0f s)", version, seconds)
    return {"version": version, "model": sam_cfg.name, "images": plan.n_images,
            "masks": plan.n_masks, "steps": int(state.get("step", -1)) + 1,
            "final_loss": history[-1]["loss"] if history else None, "seconds": seconds,
            "run": run_url}


