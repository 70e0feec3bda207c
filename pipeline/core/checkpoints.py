"""Model checkpoints on any fsspec URL: read a state dict, save and load model versions.

A saved model is a directory with ``model.safetensors`` (written first) and ``config.json``
(``{"<kind>": architecture, **extra}``, written last), so a reader never sees a half-written
model. Official checkpoints (``.pth``, read weights-only, or ``.safetensors``) load from a local
path or ``s3://``. The formats themselves are :mod:`dataengine.models.checkpoint`'s.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dataengine.models.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, parse_state_dict,
                                          state_dict_bytes)
from dataengine.models.device import pick_device
from dataengine.pipeline.core import storage


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, or of the ``model.safetensors`` of a saved model."""
    if storage.exists(storage.join(url, WEIGHTS_FILE)):
        url = storage.join(url, WEIGHTS_FILE)
    if not storage.exists(url):
        raise FileNotFoundError(f"checkpoint {url!r} does not exist")
    return parse_state_dict(storage.read_bytes(url), url)


def read_config(url: str, kind: str) -> dict[str, Any]:
    """The ``kind`` section (``sam``, ``detector``) of a saved model's ``config.json``."""
    cfg_url = storage.join(url, CONFIG_FILE)
    if not storage.exists(cfg_url):
        raise FileNotFoundError(f"{url!r} has no {CONFIG_FILE}: not a saved {kind} model")
    meta = storage.read_json(cfg_url)
    if kind not in meta:
        raise ValueError(f"{cfg_url} has no {kind!r} section")
    return meta[kind]


def save_model(model: nn.Module, url: str, kind: str, config: dict[str, Any],
               extra: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` then ``config.json`` (``{kind: config, **extra}``) under url."""
    storage.write_bytes(storage.join(url, WEIGHTS_FILE), state_dict_bytes(model))
    storage.write_json(storage.join(url, CONFIG_FILE), {kind: config, **(extra or {})})


def save_sam(model: nn.Module, url: str, *, extra: dict[str, Any] | None = None) -> None:
    """Save a SAM model built by :func:`dataengine.models.sam.build_sam` (bit-exact)."""
    from dataengine.models.sam import config_of

    save_model(model, url, "sam", config_of(model).to_dict(), extra)


def load_sam(url: str, device: str | torch.device | None = None) -> nn.Module:
    """Load a model written by :func:`save_sam`, in eval mode."""
    from dataengine.models.sam import build_sam

    model = build_sam(read_config(url, "sam"), read_state_dict(url), seed=None, device="cpu")
    return model.to(pick_device(device))




def save_detector(model: nn.Module, url: str, *, extra: dict[str, Any] | None = None) -> None:
    """Save a detector built by :func:`dataengine.models.detector.build_detector`."""
    from dataengine.models.detector import config_of

    save_model(model, url, "detector", config_of(model).to_dict(), extra)


def load_detector(url: str, device: str | torch.device | None = None) -> nn.Module:
    """Load a model written by :func:`save_detector`, in eval mode."""
    from dataengine.models.detector import build_detector

    model = build_detector(read_config(url, "detector"), read_state_dict(url), seed=None,
                           device="cpu")
    return model.to(pick_device(device))
