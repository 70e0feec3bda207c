"""Image payloads of the corpus: which tar members hold an image, and decoding them to RGB."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

#: Extensions of an image-shard sample's image member, in lookup order.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def image_ext(sample: dict[str, Any]) -> str:
    """The extension of a sample's image member (ValueError naming the sample when none)."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    members = sorted(k for k in sample if not k.startswith("__"))
    raise ValueError(f"sample {sample.get('__key__')!r} of {sample.get('__url__')} has no image "
                     f"payload (looked for {IMAGE_EXTS}; it has {members})")


def image_bytes(sample: dict[str, Any]) -> bytes:
    """The encoded image of an image-shard sample."""
    return sample[image_ext(sample)]


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> ``HxWx3`` uint8 RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def sample_image(sample: dict[str, Any]) -> np.ndarray:
    """The ``HxWx3`` uint8 RGB image of an image-shard sample."""
    return decode_image(image_bytes(sample))
