"""A SAM model from a spec: a published version, a saved folder or URL, a checkpoint file, or a
registry config (random weights)."""

from __future__ import annotations

from typing import Any

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus


def resolve_model(corpus: Corpus, spec: str, *, model_config: str = "tiny", seed: int = 0,
                  device: str | None = None) -> tuple[Any, str]:
    """``(model, model_version)`` for ``spec``: ``vNNNN`` (a published version of ``corpus``),
    a registry config name (random weights from ``seed``), a saved model folder or URL, or a
    checkpoint file on any URL (read weights-only; an official SAM 2 / 2.1 ``.pt`` is built
    with its own config, else as ``model_config``)."""
    import re

    from dataengine.models.sam import MODEL_NAMES, build_sam
    from dataengine.models.sam2 import config_for_state, is_official_state, is_sam2_config
    from dataengine.pipeline.core.checkpoints import load_sam, read_state_dict

    if re.fullmatch(r"v\d{4,}", spec):
        url = corpus.model_dir("sam", spec)
        if not storage.exists(storage.join(url, "version.json")) and not storage.exists(
                storage.join(url, "config.json")):
            raise FileNotFoundError(f"model {spec!r}: {url} is not a published SAM version")
        return load_sam(url, device), spec
    if spec in MODEL_NAMES:
        return build_sam(spec, seed=seed, device=device), f"{spec}-random-s{seed}"
    if storage.exists(storage.join(spec, "config.json")):
        name = spec.rstrip("/").rsplit("/", 1)[-1]
        return load_sam(spec, device), name
    if storage.exists(spec):  # a checkpoint file on any URL, read weights-only
        name = spec.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        state = read_state_dict(spec)
        if is_official_state(state) and not is_sam2_config(model_config):
            model_config = config_for_state(state)  # an official SAM 2 / 2.1 .pt
        return build_sam(model_config, state, device=device), f"{model_config}-{name}"
    raise FileNotFoundError(f"model {spec!r} is not a version under {corpus.path('models/sam')}, "
                            f"a registry config ({sorted(MODEL_NAMES)}) or a checkpoint path")
