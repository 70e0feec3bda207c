"""DETR's set-prediction matching and loss (Carion et al. 2020), class-agnostic or per category.

Matching: for each image, the cost of assigning prediction ``i`` to ground-truth box ``j`` is
``w_class * -p_i(c_j) + w_l1 * |b_i - b_j|_1 + w_giou * -GIoU(b_i, b_j)`` with the paper's weights
(class 1, L1 5, GIoU 2); :func:`match` solves the assignment exactly with
``scipy.optimize.linear_sum_assignment`` (one prediction per object, the rest are "no object").

Loss (:func:`set_loss`): a classification term over *every* query (matched queries must predict
their object's class, the others must predict nothing) plus L1 and GIoU on the matched boxes,
normalised by the number of objects, summed over the decoder layers (auxiliary losses as in the
paper). The classifier is sigmoid-based, as in Conditional DETR, so the class term is binary
cross-entropy per class, optionally focal-modulated (``focal_gamma`` > 0; 0 = plain
cross-entropy). Boxes are ``cx, cy, w, h`` normalised to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


@dataclass
class MatchWeights:
    """Cost (and loss) weights; defaults are the paper's matching weights."""

    cls: float = 1.0
    l1: float = 5.0
    giou: float = 2.0

    def __post_init__(self) -> None:
        for name in ("cls", "l1", "giou"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """``...x4`` cx, cy, w, h -> x0, y0, x1, y1."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)




def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``NxM`` GIoU of ``Nx4`` and ``Mx4`` xyxy boxes (Rezatofighi et al. 2019), in [-1, 1]."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / union.clamp(min=1e-7)
    lt_c = torch.min(a[:, None, :2], b[None, :, :2])
    rb_c = torch.max(a[:, None, 2:], b[None, :, 2:])
    wh_c = (rb_c - lt_c).clamp(min=0)
    enclose = (wh_c[..., 0] * wh_c[..., 1]).clamp(min=1e-7)
    return iou - (enclose - union) / enclose


def cost_matrix(logits: torch.Tensor, boxes: torch.Tensor, gt_labels: torch.Tensor,
                gt_boxes: torch.Tensor, weights: MatchWeights | None = None) -> torch.Tensor:
    """``QxG`` matching cost for one image: ``logits`` QxC (sigmoid), ``boxes`` Qx4 cxcywh,
    ``gt_labels`` G int64, ``gt_boxes`` Gx4 cxcywh."""
    w = weights or MatchWeights()
    prob = logits.sigmoid()[:, gt_labels]                       # QxG
    c_l1 = torch.cdist(boxes, gt_boxes, p=1)
    c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(gt_boxes))
    return w.cls * -prob + w.l1 * c_l1 + w.giou * c_giou


@torch.no_grad()
def match(logits: torch.Tensor, boxes: torch.Tensor, gt_labels: torch.Tensor,
          gt_boxes: torch.Tensor, weights: MatchWeights | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one assignment for one image: ``(prediction indices, gt indices)``,
    sorted by prediction index; empty arrays when there is no ground truth."""
    if gt_boxes.numel() == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    cost = cost_matrix(logits.float(), boxes.float(), gt_labels, gt_boxes.float(), weights)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return rows.astype(np.int64), cols.astype(np.int64)


@dataclass
class LossConfig:
    """Loss weights (Conditional DETR's: class 2, L1 5, GIoU 2), focal modulation, matching."""

    cls_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    focal_gamma: float = 2.0     # 0 = plain (binary) cross-entropy
    focal_alpha: float = 0.25    # < 0 disables the alpha balance
    match_cls: float = 1.0       # the paper's matching cost weights
    match_l1: float = 5.0
    match_giou: float = 2.0

    def __post_init__(self) -> None:
        for name in ("cls_weight", "l1_weight", "giou_weight", "focal_gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.focal_alpha > 1:
            raise ValueError(f"focal_alpha={self.focal_alpha} must be <= 1 (or < 0 to disable)")

    @property
    def match_weights(self) -> MatchWeights:
        return MatchWeights(self.match_cls, self.match_l1, self.match_giou)


def _class_loss(logits: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if cfg.focal_gamma > 0:
        p = logits.sigmoid()
        p_t = p * target + (1 - p) * (1 - target)
        ce = ce * (1 - p_t) ** cfg.focal_gamma
    if cfg.focal_alpha >= 0:
        ce = ce * (cfg.focal_alpha * target + (1 - cfg.focal_alpha) * (1 - target))
    return ce.sum()


def set_loss(layer_logits: torch.Tensor, layer_boxes: torch.Tensor,
             targets: list[dict[str, torch.Tensor]], cfg: LossConfig | None = None,
             num_boxes: float | None = None) -> dict[str, torch.Tensor]:
    """Hungarian loss summed over decoder layers.

    ``layer_logits`` LxBxQxC, ``layer_boxes`` LxBxQx4 (cxcywh in [0, 1]); ``targets`` one dict per
    image with ``labels`` (G int64) and ``boxes`` (Gx4 cxcywh). ``num_boxes`` normalises the sums
    (DDP passes the all-reduced mean object count); default: objects in this batch. Returns
    ``loss`` plus the last layer's ``cls``, ``l1``, ``giou`` terms (detached).
    """
    cfg = cfg or LossConfig()
    if layer_logits.ndim == 3:
        layer_logits, layer_boxes = layer_logits[None], layer_boxes[None]
    n = float(num_boxes if num_boxes is not None else sum(len(t["labels"]) for t in targets))
    n = max(n, 1.0)
    total = layer_logits.new_zeros(())
    parts = {}
    for logits, boxes in zip(layer_logits, layer_boxes, strict=True):
        cls_l = logits.new_zeros(())
        l1_l = logits.new_zeros(())
        giou_l = logits.new_zeros(())
        for b, t in enumerate(targets):
            qi, gi = match(logits[b].detach(), boxes[b].detach(), t["labels"], t["boxes"],
                           cfg.match_weights)
            target_cls = torch.zeros_like(logits[b])
            if len(qi):
                qi_t = torch.as_tensor(qi, device=logits.device)
                gi_t = torch.as_tensor(gi, device=logits.device)
                target_cls[qi_t, t["labels"][gi_t]] = 1.0
                pb, gb = boxes[b][qi_t], t["boxes"][gi_t]
                l1_l = l1_l + (pb - gb).abs().sum()
                giou_l = giou_l + (1 - torch.diag(generalized_box_iou(
                    box_cxcywh_to_xyxy(pb), box_cxcywh_to_xyxy(gb)))).sum()
            cls_l = cls_l + _class_loss(logits[b], target_cls, cfg)
        cls_l, l1_l, giou_l = cls_l / n, l1_l / n, giou_l / n
        total = total + cfg.cls_weight * cls_l + cfg.l1_weight * l1_l + cfg.giou_weight * giou_l
        parts = {"cls": cls_l.detach(), "l1": l1_l.detach(), "giou": giou_l.detach()}
    return {"loss": total, **parts}
