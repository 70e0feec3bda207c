"""Starting checkpoints shipped with the package (``models/weights/``), checked against their
provenance before use.

A shipped checkpoint is ``<name>.safetensors`` (float16 tensors, loaded into the float32 model)
beside ``<name>.json``, its provenance: ``sha256`` of the weights file, the registry ``model``
config, the ``prompting`` it was trained with (``disc_radius``, ``paint_first``), and how it was
made (``seed``, ``steps``, ``data``, ``wall_seconds``, ``command``). :func:`load_shipped` refuses
weights whose sha256 does not match (a truncated or replaced file never loads silently).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def shipped_names(directory: Path = WEIGHTS_DIR) -> list[str]:
    """Names of the shipped checkpoints (those with both files)."""
    return sorted(p.stem for p in directory.glob("*.json")
                  if p.with_suffix(".safetensors").exists())


def provenance(name: str, directory: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """The provenance record of shipped checkpoint ``name``."""
    path = directory / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no shipped checkpoint {name!r} in {directory} (have "
                                f"{shipped_names(directory)})")
    return json.loads(path.read_text())


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_shipped(name: str, directory: Path = WEIGHTS_DIR
                 ) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """``(registry model config, float32 state dict, provenance)`` of shipped checkpoint
    ``name``; raises ValueError when the weights' sha256 differs from the provenance."""
    from safetensors.torch import load_file

    info = provenance(name, directory)
    path = directory / f"{name}.safetensors"
    digest = file_sha256(path)
    if digest != info["sha256"]:
        raise ValueError(f"{path}: sha256 {digest} does not match its provenance "
                         f"{info['sha256']} ({path.with_suffix('.json')})")
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    return info["model"], state, info


def write_shipped(model: torch.nn.Module, name: str, info: dict[str, Any],
                  directory: Path = WEIGHTS_DIR) -> Path:
    """Write ``model``'s weights as float16 safetensors + the provenance ``info`` (its
    ``sha256`` filled in) under ``directory``; returns the weights path."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.safetensors"
    state = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(path))
    record = {**info, "sha256": file_sha256(path), "bytes": path.stat().st_size}
    (directory / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path
