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
    bare checkpoint file (built as ``model_config``)."""
    import re

    from dataengine.models.sam import SAM_CONFIGS, build_sam
    from dataengine.pipeline.core.checkpoints import load_sam

    if re.fullmatch(r"v\d{4,}", spec):
        url = corpus.model_dir("sam", spec)
        if not storage.exists(storage.join(url, "version.json")) and not storage.exists(
                storage.join(url, "config.json")):
            raise FileNotFoundError(f"model {spec!r}: {url} is not a published SAM version")
        return load_sam(url, device), spec
    if spec in SAM_CONFIGS:
        return build_sam(spec, seed=seed, device=device), f"{spec}-random-s{seed}"
    if storage.exists(storage.join(spec, "config.json")):
        name = spec.rstrip("/").rsplit("/", 1)[-1]
        return load_sam(spec, device), name
    if storage.exists(spec):
        name = spec.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        return build_sam(model_config, spec, device=device), f"{model_config}-{name}"
    raise FileNotFoundError(f"model {spec!r} is not a version under {corpus.path('models/sam')}, "
                            f"a registry config ({sorted(SAM_CONFIGS)}) or a checkpoint path")
