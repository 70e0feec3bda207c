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


def compress(rle: RLE) -> RLE:
    """Any COCO RLE (e.g. uncompressed crowd counts) -> compressed string form."""
    return encode(decode(rle))
