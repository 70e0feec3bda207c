"""What a corpus already holds, read from the stages' own done records (no Prefect, no cache).

Flows use it to skip finished work and to summarise a run: image shards with a done record,
complete rounds (``metrics.json``), published model versions (``version.json``), latent datasets.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline import rounds, storage
from pipeline.layout import MODEL_KINDS, Corpus

logger = logging.getLogger(__name__)


def corpus_state(root: str) -> dict[str, Any]:
    """Counts and names of what is done in corpus ``root`` (JSON-safe)."""
    corpus = Corpus(root)
    state: dict[str, Any] = {
        "root": corpus.root,
        "image_shards": corpus.image_shards(),
        "index": storage.exists(corpus.index),
        "rounds_complete": rounds.complete_rounds(corpus),
        "rounds_started": corpus.rounds(),
        "models": {kind: corpus.model_versions(kind) for kind in MODEL_KINDS},
        "latents": sorted(u.rsplit("/", 1)[-1]
                          for u in storage.listdir(corpus.path("latents"))),
    }
    return state


def latest_version(root: str, kind: str) -> str | None:
    """The newest published version of model ``kind`` in ``root``, or None."""
    versions = Corpus(root).model_versions(kind)
    return versions[-1] if versions else None


def round_metrics(root: str, number: int) -> dict[str, Any]:
    """The ``metrics.json`` of a complete round ({} when absent)."""
    url = storage.join(Corpus(root).round_dir(number), "metrics.json")
    return storage.read_json(url) if storage.exists(url) else {}


def version_info(root: str, kind: str, version: str) -> dict[str, Any]:
    """A model version's ``version.json`` merged with its ``training.json`` and ``metrics.json``."""
    d = Corpus(root).model_dir(kind, version)
    info: dict[str, Any] = {}
    for name in ("version.json", "training.json", "metrics.json"):
        url = storage.join(d, name)
        if storage.exists(url):
            data = storage.read_json(url)
            if isinstance(data, dict):
                info.update(data)
    return info
