"""Perceptual signatures: what near-duplicate detection compares besides model embeddings.

A signature is pHash's construction kept real-valued and made to survive the edits that make
near-duplicates: the image's luminance in a window is shrunk to ``size`` x ``size`` px, averaged
with its mirror image (so a horizontal flip changes nothing), and its 2-D DCT's lowest
``coeffs`` x ``coeffs`` frequencies (the DC term and the odd horizontal ones, zero after the
averaging, dropped) are L2-normalised (so brightness and contrast change nothing either). Each
image gets one such vector for the whole frame and one per window of a grid of crops
(``crop_scale`` of each side, ``crop_grid`` x ``crop_grid`` positions): an image cropped by up to
``1 - crop_scale`` of each side lines up with one of the windows of its original.

The similarity of two images is the best cosine between one's whole frame and any window of the
other, both ways round (:func:`pair_similarity`). MEASURED (coco-mini + coco128, 367 photos):
copies cropped by 10% of each side at random positions score >= 0.98, while the closest distinct
photos score <= 0.96; imagehash's 64-bit pHash of the frame does not separate them (crops 4-24
bits away, distinct photos from 12), nor does it survive a flip.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class SignatureConfig:
    """How signatures are computed; :attr:`name` versions the stored ones."""

    size: int = 32           # the thumbnail's side (px)
    coeffs: int = 12         # lowest DCT frequencies kept per axis
    crop_scale: float = 0.9  # window side as a share of the image side
    crop_grid: int = 5       # window positions per axis

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 256:
            raise ValueError(f"size={self.size}: must be in 8..256")
        if not 2 <= self.coeffs <= self.size:
            raise ValueError(f"coeffs={self.coeffs}: must be in 2..size ({self.size})")
        if not 0.5 <= self.crop_scale <= 1.0:
            raise ValueError(f"crop_scale={self.crop_scale}: must be in [0.5, 1]")
        if not 0 <= self.crop_grid <= 9:
            raise ValueError(f"crop_grid={self.crop_grid}: must be in 0..9 (0 = whole frame only)")

    @property
    def name(self) -> str:
        """The stored signatures' version: ``signature-<8 hex digits of the settings>``."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"signature-{digest[:8]}"

    @property
    def windows(self) -> int:
        return 1 + self.crop_grid ** 2

    @property
    def dims(self) -> int:
        return self.coeffs * ((self.coeffs + 1) // 2) - 1

    def boxes(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """``(y0, y1, x0, x1)`` of the whole frame, then of each crop window."""
        out = [(0, h, 0, w)]
        ch, cw = max(1, round(h * self.crop_scale)), max(1, round(w * self.crop_scale))
        steps = np.linspace(0.0, 1.0, self.crop_grid) if self.crop_grid > 1 else [0.5]
        for fy in steps if self.crop_grid else []:
            for fx in steps:
                y0, x0 = int(round((h - ch) * fy)), int(round((w - cw) * fx))
                out.append((y0, y0 + ch, x0, x0 + cw))
        return out


def luminance(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB (or HxW) -> HxW float32 luminance."""
    if image.ndim == 2:
        return image.astype(np.float32)
    return image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def signature(image: np.ndarray, config: SignatureConfig | None = None) -> np.ndarray:
    """``windows x dims`` float32 signature of an HxWx3 uint8 image (row 0: the whole frame);
    each row has unit norm (zero for a flat window)."""
    import cv2
    from scipy.fft import dctn

    cfg = config or SignatureConfig()
    grey = luminance(image)
    h, w = grey.shape
    rows = []
    for y0, y1, x0, x1 in cfg.boxes(h, w):
        thumb = cv2.resize(grey[y0:y1, x0:x1], (cfg.size, cfg.size), interpolation=cv2.INTER_AREA)
        thumb = (thumb + thumb[:, ::-1]) / 2
        d = dctn(thumb.astype(np.float64), norm="ortho")[:cfg.coeffs, :cfg.coeffs:2]
        v = d.ravel()[1:]
        n = np.linalg.norm(v)
        rows.append(v / n if n > 1e-3 else np.zeros_like(v))  # flat: no signature
    return np.stack(rows).astype(np.float32)


def pair_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Similarity of two signatures (``windows x dims``): the best cosine of one's whole frame
    with any window of the other, both ways round; 1.0 for identical frames."""
    return float(max((b @ a[0]).max(), (a @ b[0]).max()))
