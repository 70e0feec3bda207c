"""The predictor adapter: a ``segment_anything.SamPredictor`` for any model of the registry (SAM v1
and the SAM 2 image models of :mod:`dataengine.models.sam2`), and setting its image from pixels or
from a cached embedding.

Every caller that prompts a model (the clicker, the automatic generator, the embedding cache, the
annotation stages, the server, the detector's pre-fill) makes its predictor with
:func:`make_predictor` and maps images into the model's input frame with
:func:`image_transform`: SAM v1 resizes the longest side and pads, SAM 2 resizes to a square.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dataengine.models.device import autocast


def image_transform(model: Any) -> Any:
    """The model's input-frame transform (``ResizeLongestSide`` API): the model's own
    ``transform`` when it has one (SAM 2: a square resize), else SAM v1's ``ResizeLongestSide``."""
    own = getattr(model, "transform", None)
    if own is not None:
        return own
    from segment_anything.utils.transforms import ResizeLongestSide

    return ResizeLongestSide(model.image_encoder.img_size)


def make_predictor(model: Any) -> Any:
    """A ``SamPredictor`` over ``model`` (any registry model) in the model's input frame."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(model)
    predictor.transform = image_transform(model)
    return predictor


def onnx_exportable(model: Any) -> bool:
    """Whether the model's prompt encoder + decoder export to ONNX
    (:func:`dataengine.models.sam.export_onnx_decoder`: SAM v1 models only)."""
    from dataengine.models.sam import config_of
    from dataengine.models.sam2 import Sam2Config

    return not isinstance(config_of(model), Sam2Config)


def encoder_input(model: Any, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """``HxWx3`` uint8 -> (``3xSxS`` normalised encoder input on the model's device, input size
    ``(h, w)`` of the image inside the frame), as ``SamPredictor.set_image`` prepares it."""
    from dataengine.models.device import model_device

    resized = image_transform(model).apply_image(image)
    t = torch.as_tensor(resized, device=model_device(model)).permute(2, 0, 1).contiguous()
    return model.preprocess(t[None].float())[0], (int(t.shape[-2]), int(t.shape[-1]))


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
