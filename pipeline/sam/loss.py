"""SAM's promptable-segmentation training recipe as a pure torch function over one batch.

After Kirillov et al. 2023 (SAM, §3 and appendix A "Training algorithm"), per ground-truth mask:

1. the first prompt is a foreground point sampled uniformly inside the mask, or (with
   probability ``box_prob``) the mask's box with noise (std = ``box_noise`` x side, at most
   ``box_noise_max`` px per corner);
2. then ``iterations - 1`` more decoder passes: each adds a point sampled uniformly from the
   error region of the previous prediction (positive on false negatives, negative on false
   positives), the previous low-res logits fed back as the mask prompt; ``mask_only_iterations``
   of them add no point (one placed at random among the others, one always at the end);
3. the loss of each pass is ``focal_weight * focal + dice_weight * dice`` (20:1) on the mask —
   on the first pass, the best (lowest-loss) of the multimask outputs — plus
   ``iou_weight * MSE(IoU head, true IoU of the thresholded mask)``; passes are averaged.

``paint_clicks`` (``../shared/findings/sam-from-scratch-on-cpu.md``): each click is also painted as
a +/- disc into the ``mask_input`` logits, as
:func:`dataengine.pipeline.sam.prompts.click_disc_logits` does at inference (same radius and value
in the model input frame), which keeps a small model from collapsing to empty masks.
``paint_first_prob`` is the share of steps whose first pass gets a painted mask prompt; the others
keep SAM's official first pass (no mask prompt, multimask), the path the automatic mask generator
uses.

A batch (:class:`Batch`) holds images already normalised and padded (``Sam.preprocess``) and
ground-truth masks in the padded model input frame. :func:`train_step` is one optimiser step; both
are reused by every SAM trainer (``dataengine.pipeline.sam.train``, the small-SAM pre-training).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from dataengine.pipeline.sam.prompts import paint_clicks

logger = logging.getLogger(__name__)


@dataclass
class RecipeConfig:
    """Knobs of the promptable-segmentation recipe (defaults = the paper + painted clicks)."""

    iterations: int = 11               # decoder passes per mask (paper: 11)
    mask_only_iterations: int = 2      # passes without a new point (paper: 2)
    box_prob: float = 0.5              # first prompt: noisy box with this probability
    box_noise: float = 0.1             # box corner noise std, fraction of the box side
    box_noise_max: float = 20.0        # ... at most this many input-frame px
    multimask_first: bool = True       # first pass: 3 outputs, loss on the best
    feed_back_mask: bool = True        # previous low-res logits as the next mask prompt
    paint_clicks: bool = True          # clicks painted as +/- discs into mask_input
    click_radius: float = 10.0         # disc radius, model input frame px (= the clicker's)
    click_value: float = 10.0          # disc logit value
    paint_first_prob: float = 0.5      # share of steps whose first pass gets painted discs
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # clicks at the deepest point of the region (the RITM clicker's choice) instead of a
    # uniform one, with this probability per click (first click and corrections alike)
    deep_click_prob: float = 0.0
    # up to this many extra correction passes (a uniform number per step) run first without
    # gradients, so the passes that carry the loss see longer click histories
    free_passes_max: int = 0
    # side of the frame the loss is computed in: 0 = the model input frame (SAM: logits
    # upsampled); e.g. 64 = the low-res logits against area-downsampled (soft) ground truth
    loss_size: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations={self.iterations}: must be >= 1")
        if not 0 <= self.mask_only_iterations < max(self.iterations, 1):
            raise ValueError(f"mask_only_iterations={self.mask_only_iterations}: must be in "
                             f"[0, iterations - 1 = {self.iterations - 1}]")
        if self.free_passes_max < 0:
            raise ValueError(f"free_passes_max={self.free_passes_max}: must be >= 0")
        for name in ("box_prob", "paint_first_prob", "focal_alpha", "deep_click_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v}: must be in [0, 1]")
        for name in ("box_noise", "box_noise_max", "click_radius", "focal_weight",
                     "dice_weight", "iou_weight", "focal_gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.focal_weight + self.dice_weight <= 0:
            raise ValueError("focal_weight + dice_weight must be > 0")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @property
    def paints_first(self) -> bool:
        """Whether a model of this recipe is prompted with its first click painted too (the
        recipe paints it in most steps); the clicker, the rounds and the evaluation follow."""
        return self.paint_clicks and self.paint_first_prob >= 0.5


@dataclass
class Batch:
    """One training batch in the padded model input frame (S = ``image_encoder.img_size``).

    ``images`` Bx3xSxS float (normalised + padded, as ``Sam.preprocess``); ``masks`` BxMxSxS
    bool ground truth; ``mask_valid`` BxM bool (False = padding entry); ``sizes`` Bx2 long
    (h, w) of the resized image inside the padded square.
    """

    images: torch.Tensor
    masks: torch.Tensor
    mask_valid: torch.Tensor
    sizes: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.images.to(device), self.masks.to(device), self.mask_valid.to(device),
                     self.sizes.to(device))


# ---- losses --------------------------------------------------------------------------------

def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25,
               gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.) per mask: ``...xHxW`` logits/targets -> ``...`` mean."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice loss per mask: ``...xHxW`` -> ``...``."""
    p = torch.sigmoid(logits).flatten(-2)
    t = target.flatten(-2)
    num = 2 * (p * t).sum(-1) + eps
    den = p.sum(-1) + t.sum(-1) + eps
    return 1 - num / den


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` with a bool/0-1 target per mask (1 when both are empty)."""
    pred = logits > 0
    t = target > 0.5
    inter = (pred & t).flatten(-2).sum(-1).float()
    union = (pred | t).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# ---- prompts -------------------------------------------------------------------------------



def sample_points(region: torch.Tensor, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One point uniformly from each ``NxHxW`` bool region: ``(Nx2 xy long, N bool found)``."""
    n, h, w = region.shape
    scores = torch.rand(n, h * w, generator=generator, device="cpu").to(region.device)
    scores = scores * region.flatten(1) - (~region.flatten(1)).float()
    idx = scores.argmax(1)
    found = region.flatten(1).any(1)
    xy = torch.stack([idx % w, idx // w], dim=1)
    return xy, found


def deepest_points(region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The point of each ``NxHxW`` bool region farthest from its boundary (the image border
    counts as boundary), as :func:`pipeline.clicker.next_click` picks it: ``(Nx2 xy long,
    N bool found)``."""
    import cv2
    import numpy as np

    reg = region.detach().cpu().numpy()
    n, h, w = reg.shape
    xy = np.zeros((n, 2), np.int64)
    found = reg.reshape(n, -1).any(1)
    for i in np.nonzero(found)[0]:
        padded = np.pad(reg[i], 1).astype(np.uint8)
        dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
        y, x = divmod(int(np.argmax(dist)), w)
        xy[i] = (x, y)
    return torch.from_numpy(xy).to(region.device), torch.from_numpy(found).to(region.device)


def pick_points(region: torch.Tensor, deep_prob: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_points`, each point replaced by the region's deepest point with
    probability ``deep_prob``."""
    xy, found = sample_points(region, generator)
    if deep_prob <= 0:
        return xy, found
    deep = torch.rand(region.shape[0], generator=generator).to(region.device) < deep_prob
    if deep.any():
        dxy, _ = deepest_points(region[deep])
        xy = xy.clone()
        xy[deep] = dxy
    return xy, found


def noisy_boxes(masks: torch.Tensor, noise: float, noise_max: float, input_size: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Nx4 xyxy boxes of ``NxHxW`` bool masks with SAM's corner noise, clipped to the frame."""
    n = masks.shape[0]
    ys = masks.any(2)
    xs = masks.any(1)
    ar_h = torch.arange(masks.shape[1], device=masks.device)
    ar_w = torch.arange(masks.shape[2], device=masks.device)
    big = 10 ** 6
    x0 = torch.where(xs, ar_w, big).min(1).values
    x1 = torch.where(xs, ar_w, -1).max(1).values
    y0 = torch.where(ys, ar_h, big).min(1).values
    y1 = torch.where(ys, ar_h, -1).max(1).values
    box = torch.stack([x0, y0, x1, y1], 1).float()
    side = torch.stack([x1 - x0, y1 - y0, x1 - x0, y1 - y0], 1).float().clamp(min=1)
    std = (noise * side).clamp(max=noise_max)
    jitter = torch.randn(n, 4, generator=generator).to(masks.device) * std
    box = (box + jitter).clamp(0, input_size - 1)
    x_lo, x_hi = torch.minimum(box[:, 0], box[:, 2]), torch.maximum(box[:, 0], box[:, 2])
    y_lo, y_hi = torch.minimum(box[:, 1], box[:, 3]), torch.maximum(box[:, 1], box[:, 3])
    return torch.stack([x_lo, y_lo, x_hi, y_hi], 1)


def iteration_plan(cfg: RecipeConfig, generator: torch.Generator | None = None) -> list[bool]:
    """Per pass after the first: True = add a point, False = mask prompt only (one mask-only
    pass at the end, the others at random positions among the point passes)."""
    n = cfg.iterations - 1
    if n <= 0:
        return []
    plan = [True] * n
    k = cfg.mask_only_iterations
    if k >= 1:
        plan[-1] = False
        slots = list(range(n - 1))
        perm = torch.randperm(len(slots), generator=generator).tolist()
        for j in perm[: k - 1]:
            plan[slots[j]] = False
    return plan


# ---- the recipe ----------------------------------------------------------------------------

@dataclass
class LossOutput:
    """The batch loss (a scalar with grad) and detached figures for logging."""

    loss: torch.Tensor
    stats: dict[str, float]


def _sparse(model: Any, coords: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor | None,
            is_box: torch.Tensor) -> torch.Tensor:
    """Sparse prompt tokens exactly as ``PromptEncoder`` builds them: point prompts = clicks +
    one padding point; box prompts = clicks + the two box corners (same token count)."""
    pe = model.prompt_encoder
    n = coords.shape[0]
    dim = pe.embed_dim
    out = torch.zeros(n, coords.shape[1] + 1 if n else 0, dim, device=coords.device)
    pt = ~is_box
    if pt.any():
        out[pt] = pe._embed_points(coords[pt].float(), labels[pt], pad=True)
    if is_box.any():
        parts = []
        if coords.shape[1] > 1:
            parts.append(pe._embed_points(coords[is_box][:, 1:].float(),
                                          labels[is_box][:, 1:], pad=False))
        parts.append(pe._embed_boxes(boxes[is_box]))
        out[is_box] = torch.cat(parts, dim=1)
    return out


def _dense(sam: Any, mask_input: torch.Tensor | None, n: int) -> torch.Tensor:
    """Dense prompt embeddings: the embedded mask prompt, or SAM's "no mask" embedding."""
    pe = sam.prompt_encoder
    if mask_input is None:
        return pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1,
                                                                    *pe.image_embedding_size)
    return pe._embed_masks(mask_input)


def _decode(sam: Any, feats: torch.Tensor, img_idx: torch.Tensor, sparse: torch.Tensor,
            dense: torch.Tensor, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask decoder over every prompt (each with its own image's embedding): ``NxKxLxL``
    low-res logits and ``NxK`` predicted IoUs, in prompt order."""
    image_pe = sam.prompt_encoder.get_dense_pe()
    lows, ious = [None] * len(img_idx), [None] * len(img_idx)
    for b in img_idx.unique().tolist():
        sel = (img_idx == b).nonzero()[:, 0]
        low, iou = sam.mask_decoder(image_embeddings=feats[b:b + 1], image_pe=image_pe,
                                    sparse_prompt_embeddings=sparse[sel],
                                    dense_prompt_embeddings=dense[sel],
                                    multimask_output=multimask)
        for j, i in enumerate(sel.tolist()):
            lows[i], ious[i] = low[j], iou[j]
    return torch.stack(lows), torch.stack(ious)


def _correction(prev_low: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, deep_prob: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per prompt from the error region of the previous prediction (positive on a
    false negative, negative on a false positive; inside the mask when there is no error)."""
    size = gt.shape[-1]
    with torch.no_grad():
        up = F.interpolate(prev_low, size=(size, size), mode="bilinear",
                           align_corners=False)[:, 0] > 0
        err = (up != (gt > 0.5)) & valid
        pt, found = pick_points(err, deep_prob, generator)
        fallback, _ = sample_points(gt > 0.5, generator)
        pt = torch.where(found[:, None], pt, fallback)
        lab = (gt[torch.arange(gt.shape[0]), pt[:, 1], pt[:, 0]] > 0.5).long()
    return pt, lab


def _pass_loss(low: torch.Tensor, iou_pred: torch.Tensor, gt: torch.Tensor,
               cfg: RecipeConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One pass: ``(loss, index of the best output per prompt, per-prompt figures)``; the mask
    loss is the best output's, plus the IoU head's MSE on every output."""
    size = cfg.loss_size or gt.shape[-1]
    if size != gt.shape[-1]:
        gt = F.interpolate(gt[:, None], size=(size, size), mode="area")[:, 0]
    logits = low if low.shape[-1] == size else \
        F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    target = gt[:, None].expand_as(logits)
    focal = focal_loss(logits, target, cfg.focal_alpha, cfg.focal_gamma)   # NxK
    dice = dice_loss(logits, target)
    seg = cfg.focal_weight * focal + cfg.dice_weight * dice
    best = seg.detach().argmin(1)
    ar = torch.arange(gt.shape[0], device=gt.device)
    true_iou = mask_iou(logits.detach(), target)
    iou_mse = ((iou_pred - true_iou) ** 2).mean(1)
    loss = (seg[ar, best] + cfg.iou_weight * iou_mse).mean()
    figures = {"focal": focal[ar, best].detach(), "dice": dice[ar, best].detach(),
               "iou_mse": iou_mse.detach(), "iou": true_iou[ar, best]}
    return loss, best, figures


def _pass_plan(cfg: RecipeConfig, generator: torch.Generator | None
               ) -> tuple[bool, list[bool], int]:
    """Whether the first click is painted, which passes add a click, and how many passes after
    the first run without gradients (they come right after the first pass)."""
    paint_first = cfg.paint_clicks and \
        float(torch.rand(1, generator=generator)) < cfg.paint_first_prob
    plan = [True, *iteration_plan(cfg, generator)]
    n_free = int(torch.randint(0, cfg.free_passes_max + 1, (1,), generator=generator)) \
        if cfg.free_passes_max > 0 else 0
    return paint_first, plan[:1] + [True] * n_free + plan[1:], n_free


def promptable_loss(model: Any, batch: Batch, cfg: RecipeConfig | None = None, *,
                    generator: torch.Generator | None = None,
                    freeze_encoder: bool = False, aux_loss: Any = None) -> LossOutput:
    """SAM's iterative promptable-segmentation loss over ``batch`` (see the module docstring).

    ``model`` is a bare ``segment_anything`` ``Sam`` in train mode (for DDP wrap a
    :class:`SamLossModule` instead). With ``freeze_encoder`` the image encoder runs without
    gradients. ``aux_loss(feats, gt, img_idx) -> (loss, stats)``, when given, adds a loss on
    the image embeddings (``feats`` BxCxGxG, ``gt`` NxSxS float masks of image ``img_idx``).
    """
    cfg = cfg or RecipeConfig()
    sam = model
    dev = batch.images.device
    size = sam.image_encoder.img_size
    with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_encoder):
        feats = sam.image_encoder(batch.images)

    # one prompt per valid (image, mask)
    img_idx, m_idx = torch.nonzero(batch.mask_valid, as_tuple=True)
    n = img_idx.numel()
    if n == 0:
        zero = sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)
        return LossOutput(zero, {"loss": 0.0, "masks": 0})
    gt = batch.masks[img_idx, m_idx].float()                       # NxSxS
    hh = torch.arange(size, device=dev)
    valid = (hh[None, :, None] < batch.sizes[img_idx, 0, None, None]) & \
            (hh[None, None, :] < batch.sizes[img_idx, 1, None, None])  # NxSxS

    # first prompt: a point inside the mask, or a noisy box; a box prompt carries a placeholder
    # first "click" (label -1) so that token counts line up
    use_box = torch.rand(n, generator=generator).to(dev) < cfg.box_prob
    first, _ = pick_points(gt > 0.5, cfg.deep_click_prob, generator)
    coords = first[:, None, :].to(dev)                              # NxKx2
    labels = torch.where(use_box[:, None], -1, 1).long()
    boxes = noisy_boxes(gt > 0.5, cfg.box_noise, cfg.box_noise_max, size, generator)

    paint_first, plan, n_free = _pass_plan(cfg, generator)
    prev_low: torch.Tensor | None = None
    total = torch.zeros((), device=dev)
    sums = {"focal": 0.0, "dice": 0.0, "iou_mse": 0.0}
    ious: list[torch.Tensor] = []
    for it, adds_point in enumerate(plan):
        free = 1 <= it <= n_free
        if it > 0 and adds_point:
            pt, lab = _correction(prev_low, gt, valid, cfg.deep_click_prob, generator)
            coords = torch.cat([coords, pt[:, None, :]], 1)
            labels = torch.cat([labels, lab[:, None]], 1)
        mask_input = prev_low.detach() if (cfg.feed_back_mask and prev_low is not None) else None
        if cfg.paint_clicks and (it > 0 or paint_first):
            mask_input = paint_clicks(mask_input, coords, labels, size, cfg.click_radius,
                                      cfg.click_value)
        multimask = cfg.multimask_first and it == 0 and mask_input is None
        grad_ctx = torch.no_grad() if free else contextlib.nullcontext()
        with grad_ctx:
            low, iou_pred = _decode(sam, feats, img_idx,
                                    _sparse(sam, coords, labels, boxes, use_box),
                                    _dense(sam, mask_input, n), multimask)
        if free:
            prev_low = low[:, :1]
            continue
        loss, best, figures = _pass_loss(low, iou_pred, gt, cfg)
        total = total + loss
        for k in sums:
            sums[k] += float(figures[k].mean())
        ious.append(figures["iou"])
        prev_low = low[torch.arange(n, device=dev), best][:, None]
    steps = len(ious)
    loss = total / steps
    aux_stats: dict[str, float] = {}
    if aux_loss is not None:
        aux, aux_stats = aux_loss(feats, gt, img_idx)
        loss = loss + aux
    stats = {"loss": float(loss.detach()), **{k: v / steps for k, v in sums.items()},
             "iou_first": float(ious[0].mean()), "iou_last": float(ious[-1].mean()),
             "masks": int(n), "box_share": float(use_box.float().mean()), "passes": len(plan),
             **aux_stats}
    return LossOutput(loss, stats)


def _decode_all(sam: Any, feats: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor, img_idx: torch.Tensor, multimask: bool, n_images: int,
                n: int, size: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder on every prompt, image by image: ``(NxKxLxL low-res logits, NxK IoU)``."""
    lows = []
    for b in range(n_images):
        sel = img_idx == b
        if not sel.any():
            continue
        low, iou = sam.mask_decoder(image_embeddings=feats[b:b + 1], image_pe=image_pe,
                                    sparse_prompt_embeddings=sparse[sel],
                                    dense_prompt_embeddings=dense[sel],
                                    multimask_output=multimask)
        lows.append((sel, low, iou))
    k = lows[0][1].shape[1]
    low = torch.zeros(n, k, size // 4, size // 4, device=dev)
    iou_pred = torch.zeros(n, k, device=dev)
    for sel, lo, io in lows:
        low = low.index_put((sel.nonzero()[:, 0],), lo)
        iou_pred = iou_pred.index_put((sel.nonzero()[:, 0],), io)
    return low, iou_pred


class SamLossModule(torch.nn.Module):
    """``Sam`` + recipe as one module whose ``forward(batch, generator)`` returns
    ``(loss, stats)``: the unit to wrap in DDP, so gradient sync sees the whole computation.

    Every trainable parameter takes part in the loss (unused prompt embeddings with weight 0),
    so DDP needs no ``find_unused_parameters``.
    """

    def __init__(self, sam: Any, recipe: RecipeConfig | None = None,
                 freeze_encoder: bool = False) -> None:
        super().__init__()
        self.sam = sam
        self.recipe = recipe or RecipeConfig()
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            for p in sam.image_encoder.parameters():
                p.requires_grad_(False)

    def forward(self, batch: Batch, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        out = promptable_loss(self.sam, batch, self.recipe, generator=generator,
                              freeze_encoder=self.freeze_encoder)
        keep = sum(p.sum() for p in self.parameters() if p.requires_grad)
        return out.loss + 0.0 * keep, out.stats


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """Linear warm-up then cosine decay to ``min_factor`` of the base learning rate."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))


def train_step(model: Any, optimizer: torch.optim.Optimizer, batch: Batch,
               cfg: RecipeConfig | None = None, *, generator: torch.Generator | None = None,
               freeze_encoder: bool = False, grad_clip: float = 1.0) -> dict[str, float]:
    """One optimiser step of :func:`promptable_loss`; returns its stats (+ ``grad_norm``).

    ``model`` is a bare ``Sam`` (``cfg`` and ``freeze_encoder`` apply) or a
    :class:`SamLossModule`, possibly DDP-wrapped (its own recipe applies).
    """
    model.train()
    inner = model.module if hasattr(model, "module") else model
    if isinstance(inner, SamLossModule):
        loss, stats = model(batch, generator)
    else:
        out = promptable_loss(model, batch, cfg, generator=generator,
                              freeze_encoder=freeze_encoder)
        loss, stats = out.loss, out.stats
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else \
        torch.zeros(())
    optimizer.step()
    return {**stats, "grad_norm": float(norm)}
