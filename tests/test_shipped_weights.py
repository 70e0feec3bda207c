"""Shipped starting checkpoints (models/weights.py): written as float16 safetensors with a
provenance record, loaded only when the sha256 matches; every checkpoint in models/weights/
loads into its registry config and stays within 8 MB."""

from __future__ import annotations

import pytest
import torch

from dataengine.models.sam import build_sam
from dataengine.models.weights import (
    WEIGHTS_DIR,
    file_sha256,
    load_shipped,
    shipped_names,
    write_shipped,
)


def test_written_checkpoint_loads_and_a_changed_file_is_refused(tmp_path):
    model = build_sam("tiny-hq-test", seed=1, device="cpu")
    path = write_shipped(model, "start", {"model": "tiny-hq-test", "seed": 1, "steps": 0},
                         tmp_path)
    assert shipped_names(tmp_path) == ["start"]
    name, state, info = load_shipped("start", tmp_path)
    assert name == "tiny-hq-test" and info["sha256"] == file_sha256(path)
    loaded = build_sam(name, state, seed=None, device="cpu")
    for k, v in model.state_dict().items():
        w = loaded.state_dict()[k]
        assert w.dtype == v.dtype
        if v.is_floating_point():
            assert torch.allclose(w, v.half().float())
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_shipped("start", tmp_path)


@pytest.mark.parametrize("name", shipped_names())
def test_shipped_checkpoint_loads_and_matches_its_provenance(name):
    model_name, state, info = load_shipped(name)
    assert (WEIGHTS_DIR / f"{name}.safetensors").stat().st_size <= 8 * 1024 * 1024
    for key in ("seed", "steps", "data", "wall_seconds", "command", "recipe"):
        assert key in info, key
    build_sam(model_name, state, seed=None, device="cpu")
