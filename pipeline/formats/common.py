"""What every format reads and writes: images with their masks, in the stored image's frame."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dataengine.pipeline.core import masks as mask_utils


@dataclass
class FormatMask:
    """One object: a COCO RLE in the image's frame, its category, and what the tool may carry
    (``score`` = predicted IoU, ``model_version``, free ``attributes``)."""

    rle: dict[str, Any]
    category: str | None = None
    category_id: int | None = None
    score: float | None = None
    model_version: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        """HxW bool."""
        return mask_utils.decode(self.rle)

    @classmethod
    def from_mask(cls, mask: np.ndarray, **kw: Any) -> FormatMask:
        return cls(mask_utils.encode(mask.astype(bool)), **kw)


@dataclass
class FormatImage:
    """One image of an export or import: its file name as the tool sees it (relative path with
    the real extension), size, masks, and the corpus key when known."""

    file_name: str
    width: int
    height: int
    masks: list[FormatMask] = field(default_factory=list)
    key: str | None = None


def category_names(images: list[FormatImage]) -> list[str]:
    """The category names in use, sorted (``object`` for masks without one)."""
    return sorted({m.category or "object" for img in images for m in img.masks})


def check_size(what: str, mask: np.ndarray, height: int, width: int) -> None:
    """A ValueError naming ``what`` when a decoded mask is not ``height x width``."""
    if mask.shape != (height, width):
        raise ValueError(f"{what}: mask is {mask.shape[0]}x{mask.shape[1]}, the image is "
                         f"{height}x{width}")
