"""Checkpoint formats, with no storage: state dicts from bytes or local files, safetensors out.

A checkpoint is ``model.safetensors`` (+ ``config.json``) in a directory, a single
``.safetensors`` file, or a torch ``.pth`` state dict read with ``weights_only=True`` (never
unpickles code; a ``{"model": state}`` wrapper is unwrapped). Reading from a URL (S3, ...) is the
pipeline's job (:mod:`dataengine.pipeline.core.checkpoints`), which hands the bytes here.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def parse_state_dict(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint bytes; ``name`` (a file name or URL) tells the format."""
    from safetensors.torch import load as st_load

    if name.endswith(".safetensors"):
        return st_load(data)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {name!r} is not a weights-only torch state dict: "
                         f"{exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {name!r} does not hold a state dict")
    return state


def read_local_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local checkpoint file, or of the ``model.safetensors`` in a directory."""
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return parse_state_dict(p.read_bytes(), p.name)


def state_dict_bytes(model: nn.Module) -> bytes:
    """The model's parameters and buffers as safetensors bytes (CPU, contiguous)."""
    from safetensors.torch import save as st_save

    return st_save({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()})


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], mismatch: str) -> nn.Module:
    """Load ``state`` strictly into ``model``; a ValueError starting with ``mismatch`` (what
    does not fit what) when a key or a shape differs."""
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{mismatch}: {str(exc)[:500]}") from exc
    return model


def as_state_dict(checkpoint: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict given as a mapping or as a local checkpoint path."""
    if isinstance(checkpoint, Mapping):
        return dict(checkpoint)
    return read_local_state_dict(checkpoint)


def weights_digest(*modules: nn.Module) -> str:
    """sha256 over the state dicts of ``modules`` (names + fp32 bytes): equal digests mean
    equal weights."""
    import hashlib

    h = hashlib.sha256()
    for module in modules:
        for k, v in sorted(module.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()
