"""Setting a ``segment_anything.SamPredictor``'s image, from pixels or from a cached embedding."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dataengine.models.device import autocast


def set_features(predictor: Any, features: Any, original_size: tuple[int, int],
                 input_size: tuple[int, int] | None = None) -> None:
    """Seed ``predictor`` with a cached image embedding (``CxSxS`` or ``1xCxSxS`` float) of an
    image of ``original_size`` (h, w), exactly as ``predictor.set_image`` would have; the resized
    ``input_size`` is derived from the predictor's transform when not given."""
    predictor.reset_image()
    f = torch.as_tensor(np.asarray(features, dtype=np.float32)).to(predictor.device)
    predictor.features = f[None] if f.ndim == 3 else f
    predictor.original_size = tuple(int(v) for v in original_size)
    if input_size is None:
        t = predictor.transform
        input_size = t.get_preprocess_shape(original_size[0], original_size[1], t.target_length)
    predictor.input_size = tuple(int(v) for v in input_size)
    predictor.is_image_set = True


def set_image(predictor: Any, image: np.ndarray, features: Any = None) -> None:
    """Set ``predictor``'s ``HxWx3`` uint8 image: from its cached embedding when ``features`` is
    given, else by running the image encoder (inference mode, bf16 autocast on CUDA)."""
    if features is not None:
        set_features(predictor, features, image.shape[:2])
        return
    with torch.inference_mode(), autocast(predictor.device):
        predictor.set_image(image)
