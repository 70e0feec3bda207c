"""Fully automatic mask generation: SAM's point-grid generator, filtering at low resolution.

Same settings and the same answers as Meta's ``SamAutomaticMaskGenerator`` (regular point grid,
multimask outputs, predicted-IoU filter, stability filter, box NMS, optional zoomed crop layers,
small-region cleanup), plus an optional drop of masks covering nearly the whole image.

Where the time goes differs: the official generator upsamples *every* candidate mask (3 per grid
point) to the full image resolution before it filters. Here the predicted-IoU filter runs on the
decoder's scores, a conservative stability pre-filter runs on the low-res logits (threshold minus
``low_res_margin``), and only the survivors are upsampled (with the same
``Sam.postprocess_masks``) and filtered exactly at full resolution, so the kept masks are the
official ones. RLE encoding happens only for masks that survive NMS.

The output is a list of SA-1B annotation dicts: ``segmentation`` (COCO RLE, string counts),
``bbox`` (xywh), ``area``, ``predicted_iou``, ``stability_score``, ``point_coords``, ``crop_box``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dataengine.pipeline.core import masks as mask_utils
from dataengine.pipeline.sam.predictor import make_predictor, set_image
from dataengine.pipeline.sam.prompts import paint_clicks

logger = logging.getLogger(__name__)


@dataclass
class AmgConfig:
    """Automatic generator settings (defaults = ``SamAutomaticMaskGenerator``'s, plus
    ``max_area_fraction`` and the low-res pre-filter margin)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    max_area_fraction: float = 0.95   # drop masks covering more of the image (1.0 keeps all)
    low_res_margin: float = 0.1       # stability pre-filter at low res: thresh - margin
    # > 0: each grid point is also painted as a disc (this radius, model input px) into the mask
    # prompt, the prompt form of models trained with painted clicks
    # (dataengine.pipeline.sam.loss.RecipeConfig.paint_clicks), and the single-mask output answers,
    # as for a painted click in training and in the clicker (the multimask outputs are trained only
    # on unpainted first clicks); 0 = SAM's point-only prompts with multimask outputs (the official
    # generator's, the only setting it can match)
    disc_radius: float = 0.0

    def __post_init__(self) -> None:
        if self.points_per_side < 1:
            raise ValueError(f"points_per_side={self.points_per_side} must be >= 1")
        if self.points_per_batch < 1:
            raise ValueError(f"points_per_batch={self.points_per_batch} must be >= 1")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh",
                     "crop_nms_thresh"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v} must be in [0, 1]")
        if not 0.0 < self.max_area_fraction <= 1.0:
            raise ValueError(f"max_area_fraction={self.max_area_fraction} must be in (0, 1]")
        if self.crop_n_layers < 0:
            raise ValueError(f"crop_n_layers={self.crop_n_layers} must be >= 0")
        if self.low_res_margin < 0:
            raise ValueError(f"low_res_margin={self.low_res_margin} must be >= 0")
        if self.disc_radius < 0:
            raise ValueError(f"disc_radius={self.disc_radius} must be >= 0")

    def official_kwargs(self) -> dict[str, Any]:
        """The same settings as keyword arguments of ``SamAutomaticMaskGenerator``."""
        return {k: getattr(self, k) for k in (
            "points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
            "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
            "crop_overlap_ratio", "crop_n_points_downscale_factor", "min_mask_region_area")}


class MaskGenerator:
    """Automatic masks for one image at a time with a SAM model (see the module docstring)."""

    def __init__(self, model: Any, config: AmgConfig | None = None) -> None:
        from segment_anything.utils.amg import build_all_layer_point_grids

        self.config = config or AmgConfig()
        self.model = model
        self.predictor = make_predictor(model)
        c = self.config
        self.point_grids = build_all_layer_point_grids(c.points_per_side, c.crop_n_layers,
                                                       c.crop_n_points_downscale_factor)
        self.stats: dict[str, int] = {}

    @torch.inference_mode()
    def generate(self, image: np.ndarray, features: Any = None) -> list[dict[str, Any]]:
        """Masks of ``image`` (HxWx3 uint8 RGB). ``features`` (1xCxSxS or CxSxS), when given, is
        the cached embedding of the whole image and skips the encoder for crop layer 0."""
        from segment_anything.utils.amg import generate_crop_boxes

        from dataengine.models.device import autocast

        c = self.config
        h, w = image.shape[:2]
        self.stats = {"candidates": 0, "after_iou": 0, "after_lowres": 0, "after_stability": 0,
                      "after_edge": 0}
        crop_boxes, layer_idxs = generate_crop_boxes((h, w), c.crop_n_layers,
                                                     c.crop_overlap_ratio)
        results: list[dict[str, Any]] = []
        with autocast(self.predictor.device):
            for crop_box, layer in zip(crop_boxes, layer_idxs):
                results.extend(self._process_crop(image, crop_box, layer, (h, w),
                                                  features if layer == 0 else None))
        if len(crop_boxes) > 1 and results:
            boxes = np.stack([r["box"] for r in results])
            cb = np.stack([r["crop_box_xyxy"] for r in results]).astype(np.float64)
            scores = 1.0 / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))
            keep = mask_utils.box_nms(boxes, scores, c.crop_nms_thresh)
            results = [results[i] for i in keep]
        if c.min_mask_region_area > 0 and results:
            results = self._postprocess_small_regions(results, c.min_mask_region_area,
                                                      max(c.box_nms_thresh, c.crop_nms_thresh))
        out = []
        for r in results:
            rle = mask_utils.encode(r["mask"])
            area = int(r["mask"].sum())
            if area > c.max_area_fraction * h * w and c.max_area_fraction < 1.0:
                continue
            x0, y0, x1, y1 = (float(v) for v in r["box"])
            cx0, cy0, cx1, cy1 = (float(v) for v in r["crop_box_xyxy"])
            out.append({"segmentation": rle, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area,
                        "predicted_iou": float(r["iou"]), "point_coords": [list(r["point"])],
                        "stability_score": float(r["stability"]),
                        "crop_box": [cx0, cy0, cx1 - cx0, cy1 - cy0]})
        return out

    # -- internals ---------------------------------------------------------------------------
    def _set_crop(self, image: np.ndarray, crop_box: list[int], features: Any) -> None:
        p = self.predictor
        x0, y0, x1, y1 = crop_box
        set_image(p, image[y0:y1, x0:x1, :], features)

    def _process_crop(self, image: np.ndarray, crop_box: list[int], layer: int,
                      orig_size: tuple[int, int], features: Any) -> list[dict[str, Any]]:
        x0, y0, x1, y1 = crop_box
        crop_h, crop_w = y1 - y0, x1 - x0
        self._set_crop(image, crop_box, features)
        points = self.point_grids[layer] * np.array([[crop_w, crop_h]])
        kept: list[dict[str, Any]] = []
        for start in range(0, len(points), self.config.points_per_batch):
            pts = points[start:start + self.config.points_per_batch]
            low, iou = self._decode_points(pts, (crop_h, crop_w))
            idx = self._low_res_filter(low, iou)
            if idx.numel():
                kept += self._full_res_filter(low, iou, idx, pts, crop_box, orig_size)
        self.predictor.reset_image()
        return self._crop_nms(kept, crop_box, orig_size)

    def _decode_points(self, pts: np.ndarray, crop_hw: tuple[int, int]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-point prompts at ``pts`` (crop px): ``(P*K)xLxL`` low-res logits and
        ``(P*K)`` predicted IoUs, the K outputs of each point consecutive."""
        p, c = self.predictor, self.config
        model = p.model
        tp = torch.as_tensor(p.transform.apply_coords(pts, crop_hw), device=p.device)
        labels = torch.ones(tp.shape[0], dtype=torch.int, device=p.device)
        discs = None
        if c.disc_radius > 0:
            discs = paint_clicks(None, tp[:, None, :].float(), labels[:, None].long(),
                                 model.image_encoder.img_size, c.disc_radius)
        sparse, dense = model.prompt_encoder(points=(tp[:, None, :], labels[:, None]),
                                             boxes=None, masks=discs)
        low, iou = model.mask_decoder(image_embeddings=p.features,
                                      image_pe=model.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse,
                                      dense_prompt_embeddings=dense,
                                      multimask_output=discs is None)
        low, iou = low.float().flatten(0, 1), iou.float().flatten(0, 1)
        self.stats["candidates"] += int(low.shape[0])
        return low, iou

    def _low_res_filter(self, low: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
        """Indices of the candidates that pass the IoU threshold and a stability pre-check on
        the low-res logits (with ``low_res_margin`` of slack), before any upsampling."""
        p, c = self.predictor, self.config
        keep = iou > c.pred_iou_thresh if c.pred_iou_thresh > 0 else \
            torch.ones_like(iou, dtype=torch.bool)
        self.stats["after_iou"] += int(keep.sum())
        if c.stability_score_thresh > 0 and keep.any():
            in_h, in_w = p.input_size
            scale = low.shape[-1] / p.model.image_encoder.img_size
            valid = low[:, :int(np.ceil(in_h * scale)), :int(np.ceil(in_w * scale))]
            thr, off = p.model.mask_threshold, c.stability_score_offset
            inter = (valid > thr + off).sum((-1, -2))
            union = (valid > thr - off).sum((-1, -2)).clamp(min=1)
            keep &= (inter / union) >= c.stability_score_thresh - c.low_res_margin
        self.stats["after_lowres"] += int(keep.sum())
        return torch.nonzero(keep).flatten()

    def _full_res_filter(self, low: torch.Tensor, iou: torch.Tensor, idx: torch.Tensor,
                         pts: np.ndarray, crop_box: list[int], orig_size: tuple[int, int]
                         ) -> list[dict[str, Any]]:
        """The exact stability filter and crop-edge filter on the upsampled survivors; each
        kept mask with its crop-frame box, scores and point."""
        from segment_anything.utils.amg import batched_mask_to_box, is_box_near_crop_edge

        p, c = self.predictor, self.config
        x0, y0, x1, y1 = crop_box
        thr, off = p.model.mask_threshold, c.stability_score_offset
        full = p.model.postprocess_masks(low[idx][:, None], p.input_size, (y1 - y0, x1 - x0))[:, 0]
        inter = (full > thr + off).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
        union = (full > thr - off).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
        stab = inter / union
        ok = stab >= c.stability_score_thresh if c.stability_score_thresh > 0 else \
            torch.ones_like(stab, dtype=torch.bool)
        self.stats["after_stability"] += int(ok.sum())
        binm = full[ok] > thr
        if binm.shape[0] == 0:
            return []
        boxes = batched_mask_to_box(binm)
        edge_ok = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
        sel = torch.nonzero(ok).flatten()[edge_ok]
        binm, boxes = binm[edge_ok], boxes[edge_ok]
        self.stats["after_edge"] += int(binm.shape[0])
        outputs = low.shape[0] // len(pts)
        return [{"mask": binm[j].cpu().numpy(), "box": boxes[j].cpu().float().numpy(),
                 "iou": float(iou[idx][sel][j]), "stability": float(stab[sel][j]),
                 "point": [float(v) for v in pts[int(idx[sel[j]]) // outputs]]}
                for j in range(binm.shape[0])]

    def _crop_nms(self, kept: list[dict[str, Any]], crop_box: list[int],
                  orig_size: tuple[int, int]) -> list[dict[str, Any]]:
        """Box NMS within the crop (by predicted IoU), then masks, boxes and points moved to
        the original image's frame."""
        if not kept:
            return []
        x0, y0, x1, y1 = crop_box
        boxes = np.stack([k["box"] for k in kept])
        keep = mask_utils.box_nms(boxes, np.array([k["iou"] for k in kept]),
                                  self.config.box_nms_thresh)
        full_frame = x0 == 0 and y0 == 0 and x1 == orig_size[1] and y1 == orig_size[0]
        out = []
        for i in keep:
            k = kept[int(i)]
            m = k["mask"]
            if not full_frame:
                canvas = np.zeros(orig_size, dtype=bool)
                canvas[y0:y1, x0:x1] = m
                m = canvas
            out.append({"mask": m, "box": boxes[int(i)] + np.array([x0, y0, x0, y0],
                                                                   dtype=np.float32),
                        "iou": k["iou"], "stability": k["stability"],
                        "point": [k["point"][0] + x0, k["point"][1] + y0],
                        "crop_box_xyxy": np.array(crop_box, dtype=np.float32)})
        return out

    @staticmethod
    def _postprocess_small_regions(results: list[dict[str, Any]], min_area: int,
                                   nms_thresh: float) -> list[dict[str, Any]]:
        new_masks, scores = [], []
        for r in results:
            m, changed = mask_utils.clean_mask(r["mask"], min_area)
            new_masks.append(m)
            scores.append(0.0 if changed else 1.0)
        boxes = np.stack([mask_utils.box_xyxy(m) for m in new_masks])
        keep = mask_utils.box_nms(boxes, np.array(scores), nms_thresh)
        out = []
        for i in keep:
            r = dict(results[int(i)])
            if scores[int(i)] == 0.0:
                r["mask"] = new_masks[int(i)]
                r["box"] = boxes[int(i)]
            out.append(r)
        return out


def official_generate(model: Any, image: np.ndarray, config: AmgConfig) -> list[dict[str, Any]]:
    """Meta's ``SamAutomaticMaskGenerator`` with the same settings (benchmark reference);
    masks as HxW bool in ``segmentation``; ``max_area_fraction`` applied the same way."""
    from segment_anything import SamAutomaticMaskGenerator

    gen = SamAutomaticMaskGenerator(model, output_mode="binary_mask", **config.official_kwargs())
    anns = gen.generate(image)
    if config.max_area_fraction < 1.0:
        h, w = image.shape[:2]
        anns = [a for a in anns if a["area"] <= config.max_area_fraction * h * w]
    return anns
