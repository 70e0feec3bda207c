"""Procedural "dead leaves" scenes with exact instance masks, generated on the fly.

Unlimited training images for a small SAM that must learn to see edges and regions before it
sees a few hundred real masks. A scene is a background fill plus a stack of random shapes
(ellipses, star polygons, smooth blobs, rotated rectangles, thin strokes and, when a donor pool
is given, cut-outs of real training objects), painted back to front; each shape's instance mask
is the part of it that stays visible after the shapes above it are painted (occlusion defines
the masks, as in the dead-leaves model). Shapes are filled with flat colours, linear gradients,
smooth noise, stripes, or crops of real training photos; some objects are made of two parts
with different fills (an object is not one colour); low-contrast shapes, global shading, blur
and pixel noise make edges less trivial. Masks stay exact: every effect after painting changes
pixels, never labels.

Reproducible: a scene is a pure function of ``(seed, index)`` (and the config and donor pool),
so nothing is stored; :func:`generate` returns ``(image HxWx3 uint8, masks [HxW bool])``.
``ProceduralConfig.level`` is the curriculum knob: 0 = a few large shapes with plain fills,
1 = many small shapes, more textures, more clutter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

SHAPES = ("ellipse", "polygon", "blob", "rect", "stroke", "real")
FILLS = ("flat", "gradient", "noise", "stripes", "photo")


@dataclass
class ProceduralConfig:
    """How scenes are drawn. ``level`` in [0, 1] interpolates the ``*_easy`` / ``*_hard``
    ranges (curriculum: few large shapes -> many small ones)."""

    size: int = 256
    level: float = 0.5
    shapes_easy: tuple[int, int] = (2, 6)          # shapes per scene at level 0
    shapes_hard: tuple[int, int] = (12, 40)        # ... at level 1
    scale_easy: tuple[float, float] = (0.25, 0.6)  # shape size / image side at level 0
    scale_hard: tuple[float, float] = (0.05, 0.4)  # ... at level 1
    shape_weights: dict[str, float] = field(default_factory=lambda: {
        "ellipse": 1.0, "polygon": 1.0, "blob": 1.5, "rect": 0.7, "stroke": 0.3, "real": 1.5})
    fill_weights: dict[str, float] = field(default_factory=lambda: {
        "flat": 1.0, "gradient": 1.0, "noise": 1.0, "stripes": 0.5, "photo": 1.5})
    photo_background_prob: float = 0.4   # background = a crop of a real training photo
    multipart_prob: float = 0.3          # an object drawn as two differently filled parts
    low_contrast_prob: float = 0.15      # fill colour close to the background's
    shading_prob: float = 0.5            # a smooth global illumination field
    blur_max: float = 1.2                # Gaussian blur sigma, uniform in [0, blur_max]
    noise_max: float = 8.0               # pixel noise std, uniform in [0, noise_max]
    min_area: int = 120                  # visible px (at ``size``) to keep an instance

    def __post_init__(self) -> None:
        if not 0.0 <= self.level <= 1.0:
            raise ValueError(f"level={self.level}: must be in [0, 1]")
        if self.size < 32:
            raise ValueError(f"size={self.size}: must be >= 32")
        for name in ("shape_weights", "fill_weights"):
            w = getattr(self, name)
            allowed = SHAPES if name == "shape_weights" else FILLS
            bad = sorted(set(w) - set(allowed))
            if bad or not any(v > 0 for v in w.values()):
                raise ValueError(f"{name}={w}: keys from {allowed}, some weight > 0")

    def n_shapes_range(self) -> tuple[int, int]:
        t = self.level
        lo = round(self.shapes_easy[0] + t * (self.shapes_hard[0] - self.shapes_easy[0]))
        hi = round(self.shapes_easy[1] + t * (self.shapes_hard[1] - self.shapes_easy[1]))
        return max(1, lo), max(lo, hi)

    def scale_range(self) -> tuple[float, float]:
        t = self.level
        return (self.scale_easy[0] + t * (self.scale_hard[0] - self.scale_easy[0]),
                self.scale_easy[1] + t * (self.scale_hard[1] - self.scale_easy[1]))


@dataclass
class DonorPool:
    """Real training material: ``photos`` (HxWx3 uint8, fills and backgrounds) and
    ``objects`` ((crop HxWx3 uint8, mask HxW bool) cut-outs of real training masks)."""

    photos: list[np.ndarray] = field(default_factory=list)
    objects: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @classmethod
    def from_samples(cls, images: Sequence[np.ndarray],
                     masks: Sequence[Sequence[np.ndarray]], min_area: int = 400) -> DonorPool:
        """Photos and object cut-outs (masks of at least ``min_area`` px) of training images."""
        objects = []
        for img, ms in zip(images, masks, strict=True):
            for m in ms:
                if m.sum() < min_area:
                    continue
                ys, xs = np.nonzero(m)
                y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
                objects.append((img[y0:y1, x0:x1].copy(), m[y0:y1, x0:x1].copy()))
        return cls([np.ascontiguousarray(i) for i in images], objects)


@dataclass
class Scene:
    """One generated scene: ``image``, instance ``masks`` (visible parts, in painting order)
    and ``labels`` (HxW int32: k+1 on the pixels of ``masks[k]``, 0 elsewhere)."""

    image: np.ndarray
    masks: list[np.ndarray]
    labels: np.ndarray


# ---- drawing helpers -----------------------------------------------------------------------

def _colour(rng: np.random.Generator, near: np.ndarray | None = None) -> np.ndarray:
    if near is not None:
        return np.clip(near + rng.normal(0, 18, 3), 0, 255)
    return rng.uniform(0, 255, 3)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """HxW smooth noise in [0, 1] (bicubic upsampling of a cells x cells random grid)."""
    g = rng.random((cells, cells)).astype(np.float32)
    out = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def _fill(rng: np.random.Generator, kind: str, h: int, w: int, donors: DonorPool | None,
          base: np.ndarray | None = None) -> np.ndarray:
    """HxWx3 float32 texture of ``kind`` (``base``: a colour the first colour stays near)."""
    c1 = _colour(rng, base)
    c2 = _colour(rng, c1 if rng.random() < 0.5 else None)
    if kind == "photo" and donors is not None and donors.photos:
        photo = donors.photos[int(rng.integers(len(donors.photos)))]
        ph, pw = photo.shape[:2]
        zoom = rng.uniform(0.3, 1.0)
        ch, cw = max(4, int(ph * zoom)), max(4, int(pw * zoom))
        y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
        crop = photo[y0:y0 + ch, x0:x0 + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return cv2.resize(np.ascontiguousarray(crop), (w, h),
                          interpolation=cv2.INTER_LINEAR).astype(np.float32)
    if kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * math.cos(a) + yy * math.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return (c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
                ).astype(np.float32)
    if kind == "noise":
        t = _smooth_noise(rng, h, w, int(rng.integers(3, 12)))
        return (c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
                ).astype(np.float32)
    if kind == "stripes":
        a = rng.uniform(0, math.pi)
        period = rng.uniform(4, 24)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        s = np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period)
        t = (s > 0).astype(np.float32) if rng.random() < 0.5 else (s + 1) / 2
        return (c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
                ).astype(np.float32)
    return np.broadcast_to(c1.astype(np.float32), (h, w, 3)).copy()


def _polygon_mask(h: int, w: int, pts: np.ndarray) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return m.astype(bool)


def _shape_mask(rng: np.random.Generator, kind: str, size: int, scale: float,
                donors: DonorPool | None
                ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """A ``size`` x ``size`` bool mask of one random shape, and for ``real`` the donor's
    pixels placed the same way (crop HxWx3 uint8 over the whole frame, its mask)."""
    r = scale * size / 2
    cx, cy = rng.uniform(-0.1, 1.1) * size, rng.uniform(-0.1, 1.1) * size
    if kind == "real" and donors is not None and donors.objects:
        crop, cmask = donors.objects[int(rng.integers(len(donors.objects)))]
        ch, cw = cmask.shape
        s = 2 * r / max(ch, cw)
        nh, nw = max(2, int(round(ch * s))), max(2, int(round(cw * s)))
        crop = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_LINEAR)
        cmask = cv2.resize(cmask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST) > 0
        if rng.random() < 0.5:
            crop, cmask = crop[:, ::-1], cmask[:, ::-1]
        x0, y0 = int(cx - nw / 2), int(cy - nh / 2)
        full = np.zeros((size, size), bool)
        pix = np.zeros((size, size, 3), np.uint8)
        fy0, fx0 = max(0, y0), max(0, x0)
        fy1, fx1 = min(size, y0 + nh), min(size, x0 + nw)
        if fy1 <= fy0 or fx1 <= fx0:
            return full, (pix, full)
        full[fy0:fy1, fx0:fx1] = cmask[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]
        pix[fy0:fy1, fx0:fx1] = crop[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]
        return full, (pix, full)
    if kind == "real":
        kind = "blob"
    ang = rng.uniform(0, 2 * math.pi)
    if kind == "ellipse":
        m = np.zeros((size, size), np.uint8)
        ax = (max(1, int(r * 16)), max(1, int(r * rng.uniform(0.3, 1.0) * 16)))
        cv2.ellipse(m, (int(cx * 16), int(cy * 16)), ax, math.degrees(ang), 0, 360, 1, -1,
                    lineType=cv2.LINE_8, shift=4)
        return m.astype(bool), None
    if kind == "rect":
        a, b = r, r * rng.uniform(0.2, 1.0)
        corners = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
        rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        return _polygon_mask(size, size, corners @ rot.T + [cx, cy]), None
    if kind == "stroke":
        m = np.zeros((size, size), np.uint8)
        n = int(rng.integers(2, 5))
        pts = [np.array([cx, cy])]
        for _ in range(n):
            a = ang + rng.normal(0, 0.6)
            pts.append(pts[-1] + 2 * r / n * np.array([math.cos(a), math.sin(a)]))
        thick = max(2, int(r * rng.uniform(0.08, 0.3)))
        cv2.polylines(m, [np.round(np.array(pts)).astype(np.int32)], False, 1, thick)
        return m.astype(bool), None
    n = int(rng.integers(3, 10)) if kind == "polygon" else 72
    theta = np.sort(rng.uniform(0, 2 * math.pi, n)) if kind == "polygon" else \
        np.linspace(0, 2 * math.pi, n, endpoint=False)
    if kind == "polygon":
        rad = r * rng.uniform(0.45, 1.0, n)
    else:  # smooth blob: a random radial Fourier series
        rad = np.ones(n)
        for k in range(1, 6):
            rad += rng.normal(0, 0.25 / k) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
        rad = r * np.clip(rad, 0.25, 2.0) / max(float(rad.max()), 1e-6)
    stretch = rng.uniform(0.5, 1.0)
    pts = np.stack([rad * np.cos(theta), stretch * rad * np.sin(theta)], 1)
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    return _polygon_mask(size, size, pts @ rot.T + [cx, cy]), None


def _pick(rng: np.random.Generator, weights: dict[str, float], skip: set[str]) -> str:
    names = [k for k, v in weights.items() if v > 0 and k not in skip]
    p = np.array([weights[k] for k in names], np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


# ---- the generator -------------------------------------------------------------------------

def generate_scene(seed: int, index: int, cfg: ProceduralConfig | None = None,
                   donors: DonorPool | None = None) -> Scene:
    """Scene ``index`` of stream ``seed`` (deterministic for the config and donor pool)."""
    cfg = cfg or ProceduralConfig()
    rng = np.random.default_rng([int(seed), int(index), 0x5EED])
    s = cfg.size
    skip_shapes = set() if donors is not None and donors.objects else {"real"}
    skip_fills = set() if donors is not None and donors.photos else {"photo"}
    bg_kind = "photo" if (not skip_fills and rng.random() < cfg.photo_background_prob) else \
        _pick(rng, cfg.fill_weights, skip_fills | {"photo"})
    image = _fill(rng, bg_kind, s, s, donors)
    bg_mean = image.reshape(-1, 3).mean(0)
    labels = np.zeros((s, s), np.int32)
    lo, hi = cfg.n_shapes_range()
    n = int(rng.integers(lo, hi + 1))
    slo, shi = cfg.scale_range()
    for k in range(1, n + 1):
        kind = _pick(rng, cfg.shape_weights, skip_shapes)
        scale = math.exp(rng.uniform(math.log(slo), math.log(shi)))
        m, real = _shape_mask(rng, kind, s, scale, donors)
        if not m.any():
            continue
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        bh, bw = y1 - y0, x1 - x0
        if real is not None:
            tex = real[0][y0:y1, x0:x1].astype(np.float32)
        else:
            near = bg_mean if rng.random() < cfg.low_contrast_prob else None
            tex = _fill(rng, _pick(rng, cfg.fill_weights, skip_fills), bh, bw, donors, near)
            if rng.random() < cfg.multipart_prob:
                part, _ = _shape_mask(rng, _pick(rng, {"ellipse": 1, "polygon": 1, "rect": 1},
                                                 set()), s, scale * rng.uniform(0.4, 0.9), None)
                # place the part so that it overlaps the object: centre it on an object pixel
                j = int(rng.integers(len(ys)))
                pys, pxs = np.nonzero(part)
                if len(pys):
                    dy = int(ys[j] - pys.mean())
                    dx = int(xs[j] - pxs.mean())
                    part = np.roll(np.roll(part, dy, 0), dx, 1)
                    sub = part[y0:y1, x0:x1]
                    tex2 = _fill(rng, _pick(rng, cfg.fill_weights, skip_fills), bh, bw, donors)
                    tex = np.where(sub[..., None], tex2, tex)
        sel = m[y0:y1, x0:x1]
        region = image[y0:y1, x0:x1]
        region[sel] = tex[sel]
        labels[y0:y1, x0:x1][sel] = k
    # global photometric effects: pixels only, labels stay exact
    if rng.random() < cfg.shading_prob:
        field_ = 0.65 + 0.6 * _smooth_noise(rng, s, s, int(rng.integers(2, 5)))
        image = image * field_[..., None]
    sigma = rng.uniform(0, cfg.blur_max)
    if sigma > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    noise = rng.uniform(0, cfg.noise_max)
    if noise > 0:
        image = image + rng.normal(0, noise, image.shape).astype(np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)
    masks: list[np.ndarray] = []
    out_labels = np.zeros_like(labels)
    for k in range(1, n + 1):
        m = labels == k
        if m.sum() >= cfg.min_area:
            masks.append(m)
            out_labels[m] = len(masks)
    return Scene(image, masks, out_labels)


def generate(seed: int, index: int, cfg: ProceduralConfig | None = None,
             donors: DonorPool | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(image HxWx3 uint8, instance masks [HxW bool])`` of scene ``index`` of stream
    ``seed``: the visible part of each shape, at least ``cfg.min_area`` px, disjoint."""
    scene = generate_scene(seed, index, cfg, donors)
    return scene.image, scene.masks


def scene_samples(seed: int, first_index: int, n: int, cfg: ProceduralConfig,
                  donors: DonorPool | None = None) -> list[Any]:
    """``n`` training :class:`dataengine.pipeline.sam.training_data.Sample` s from the scenes
    ``first_index * 4 + k`` of stream ``seed`` (a scene without a usable mask, rare, is
    replaced by the next one of its slot), so a step's scenes are a pure function of its index
    and a resumed run sees the same stream."""
    from dataengine.pipeline.sam.training_data import Sample

    out: list[Sample] = []
    for slot in range(n):
        for attempt in range(4):
            idx = (first_index + slot) * 4 + attempt
            sc = generate_scene(seed, idx, cfg, donors)
            if sc.masks:
                out.append(Sample(f"procedural/{seed}/{idx}", "procedural", sc.image, sc.masks,
                                  [str(k) for k in range(len(sc.masks))]))
                break
    return out
