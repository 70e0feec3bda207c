"""Masks as COCO RLE (pycocotools): encode, decode, area, box, IoU.

A mask in memory is an ``HxW`` bool array; on disk and in manifests it is a COCO RLE dict
``{"size": [H, W], "counts": str}`` with the counts as a UTF-8 string (JSON-safe).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

RLE = dict[str, Any]


def encode(mask: np.ndarray) -> RLE:
    """HxW bool/uint8 mask -> COCO RLE with string counts."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"]}


def _coco(rle: RLE) -> dict:
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE (COCO iscrowd)
        return mask_utils.frPyObjects(rle, rle["size"][0], rle["size"][1])
    return {"size": list(rle["size"]),
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode(rle: RLE) -> np.ndarray:
    """COCO RLE (compressed or uncompressed) -> HxW bool mask."""
    return mask_utils.decode(_coco(rle)).astype(bool)


def area(rle: RLE) -> int:
    """Foreground pixel count."""
    return int(mask_utils.area(_coco(rle)))


def bbox(rle: RLE) -> list[float]:
    """``[x, y, w, h]`` box of the foreground (COCO convention)."""
    return [float(v) for v in mask_utils.toBbox(_coco(rle))]


def iou(a: RLE, b: RLE) -> float:
    """Intersection over union of two masks of the same size."""
    return float(mask_utils.iou([_coco(a)], [_coco(b)], [0])[0][0])


def iou_matrix(dets: list[RLE], gts: list[RLE]) -> np.ndarray:
    """``len(dets) x len(gts)`` IoU matrix (zeros-shaped when either is empty)."""
    if not dets or not gts:
        return np.zeros((len(dets), len(gts)), dtype=np.float64)
    return np.asarray(mask_utils.iou([_coco(d) for d in dets], [_coco(g) for g in gts],
                                     [0] * len(gts)), dtype=np.float64)


def from_polygons(polygons: list[list[float]], height: int, width: int) -> RLE:
    """COCO polygons (absolute pixel coords ``[x1, y1, x2, y2, ...]``) -> merged RLE."""
    polys = [p for p in polygons if len(p) >= 6]
    if not polys:
        raise ValueError("a polygon needs at least 3 points")
    rles = mask_utils.frPyObjects(polys, height, width)
    merged = mask_utils.merge(rles)
    merged["counts"] = merged["counts"].decode("ascii")
    return {"size": [height, width], "counts": merged["counts"]}



# ---- quality scores, NMS and cleanup (as segment_anything.utils.amg) --------------------------

def stability_score(logits: np.ndarray, threshold: float = 0.0, offset: float = 1.0) -> np.ndarray:
    """SAM's stability score of ``...xHxW`` mask logits: IoU of the masks thresholded at
    ``threshold + offset`` and ``threshold - offset`` (the first lies inside the second)."""
    logits = np.asarray(logits)
    inter = (logits > threshold + offset).sum(axis=(-1, -2), dtype=np.int64)
    union = (logits > threshold - offset).sum(axis=(-1, -2), dtype=np.int64)
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float32)


def box_xyxy(mask: np.ndarray) -> np.ndarray:
    """``[x0, y0, x1, y1]`` (inclusive pixel indices, as SAM's ``batched_mask_to_box``) of an
    HxW bool mask; zeros when empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return np.zeros(4, dtype=np.float32)
    return np.array([xs[0], ys[0], xs[-1], ys[-1]], dtype=np.float32)


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``Nx4`` and ``Mx4`` xyxy boxes (torchvision's convention: area = (x1-x0)*(y1-y0))."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy box NMS (highest score first), as ``torchvision.ops.nms``."""
    import torch
    from torchvision.ops import nms

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    keep = nms(torch.as_tensor(boxes), torch.as_tensor(np.asarray(scores, np.float32)),
               float(iou_threshold))
    return keep.numpy()


def mask_nms(rles: list[RLE], scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy mask-IoU NMS (highest score first)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    if len(order) == 0:
        return np.zeros(0, dtype=np.int64)
    ious = iou_matrix([rles[i] for i in order], [rles[i] for i in order])
    keep: list[int] = []
    suppressed = np.zeros(len(order), dtype=bool)
    for j in range(len(order)):
        if suppressed[j]:
            continue
        keep.append(int(order[j]))
        suppressed |= ious[j] > iou_threshold
    return np.asarray(keep, dtype=np.int64)


def remove_small_regions(mask: np.ndarray, area_thresh: float,
                         mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) smaller than
    ``area_thresh`` px in an HxW bool mask (8-connectivity; the largest island always stays).
    Returns ``(mask, changed)``, exactly as segment_anything's ``remove_small_regions``."""
    import cv2

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode {mode!r} is not one of ('holes', 'islands')")
    correct_holes = mode == "holes"
    working = (correct_holes ^ mask.astype(bool)).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, 8)
    sizes = stats[:, -1][1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask.astype(bool), False
    fill = [0] + small
    if not correct_holes:
        fill = [i for i in range(n_labels) if i not in fill]
        if not fill:
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


def clean_mask(mask: np.ndarray, min_area: float) -> tuple[np.ndarray, bool]:
    """Fill holes then drop islands under ``min_area`` px; ``(mask, changed)``."""
    m, c1 = remove_small_regions(mask, min_area, "holes")
    m, c2 = remove_small_regions(m, min_area, "islands")
    return m, c1 or c2
