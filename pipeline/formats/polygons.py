"""Masks as one polygon ring and back, for the polygon formats (YOLO-seg, Label Studio polygons).

**Out** (:func:`mask_to_ring`): every boundary of the mask (outer boundaries of all parts and the
boundaries of holes, ``cv2.findContours`` with ``RETR_CCOMP`` on the mask upsampled 2x) is traced
a quarter pixel inside the pixel edges (vertex = ``(u + 0.5) / 2`` in upsampled coordinates), so
every boundary pixel's centre lies strictly inside the ring and no vertex sits on a pixel centre.
The rings are joined into one ring by zero-width bridges (each next ring linked at its nearest
vertex, there and back), the convention of Ultralytics' ``merge_multi_segment`` for objects of
several parts, applied to holes too. One object stays one polygon (one YOLO line, one Label Studio
region).

**In** (:func:`ring_to_mask`): pycocotools' polygon rasteriser (pixel in when its centre is
inside, even-odd), the one COCO tools use. Zero-width bridges cover no pixel centre and hole
rings are subtracted by the even-odd rule, so *out then in* gives back the same pixels.

What is lost elsewhere: a rasteriser that draws polygon edges as pixels (OpenCV ``fillPoly``, used
by Ultralytics' data loader) also paints each bridge as a 1-pixel line across the gap between two
parts or across a hole; a tool that treats the ring as a simple polygon (Label Studio's editor
lets a person drag the bridge vertices apart) turns a hole into a notch. The round-trip
benchmark (``benchmarks/bench_formats.py``) measures both rasterisers.
"""

from __future__ import annotations

import numpy as np

from dataengine.pipeline.core import masks as mask_utils


def mask_rings(mask: np.ndarray) -> list[np.ndarray]:
    """Every boundary ring of an ``HxW`` bool mask as ``Nx2`` float (x, y) image coordinates,
    outer boundaries and holes (see the module docstring); empty for an empty mask."""
    import cv2

    if not mask.any():
        return []
    m = mask.astype(np.uint8)
    up = cv2.resize(m, (2 * m.shape[1], 2 * m.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return [(c.reshape(-1, 2).astype(np.float64) + 0.5) / 2.0 for c in contours]


def join_rings(rings: list[np.ndarray]) -> np.ndarray:
    """One ``Nx2`` ring from several: each next ring is bridged from the nearest vertex of the
    ring so far, walked round, and left by the same bridge."""
    if not rings:
        return np.zeros((0, 2))
    out = rings[0]
    for ring in rings[1:]:
        d = ((out[:, None, :] - ring[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(d.argmin()), d.shape)
        walk = np.roll(ring, -j, axis=0)
        out = np.concatenate([out[:i + 1], walk, walk[:1], out[i:]])
    return out


def mask_to_ring(mask: np.ndarray) -> np.ndarray:
    """``HxW`` bool mask -> one ``Nx2`` (x, y) ring in image pixel coordinates."""
    return join_rings(mask_rings(mask))


def ring_to_mask(ring: np.ndarray | list[float], height: int, width: int) -> np.ndarray:
    """One ring (``Nx2`` or flat ``[x1, y1, ...]`` image coordinates) -> ``HxW`` bool mask
    (pycocotools' rasteriser)."""
    flat = np.asarray(ring, dtype=np.float64).reshape(-1).tolist()
    if len(flat) < 6:
        raise ValueError(f"a polygon needs at least 3 points, got {len(flat) // 2}")
    return mask_utils.decode(mask_utils.from_polygons([flat], height, width))


def ring_to_mask_fillpoly(ring: np.ndarray, height: int, width: int) -> np.ndarray:
    """The same ring rasterised as Ultralytics' loader does (``cv2.fillPoly`` on int32 pixel
    coordinates): bridges become 1-pixel lines. For measuring what such tools see."""
    import cv2

    out = np.zeros((height, width), np.uint8)
    cv2.fillPoly(out, [np.asarray(ring, dtype=np.float64).reshape(-1, 2).astype(np.int32)], 1)
    return out.astype(bool)
