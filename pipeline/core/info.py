"""What a corpus holds, read from the stages' own published records (no cache).

:func:`corpus_state` names what is done (image shards with a done record, rounds started and
complete, published model versions, latent datasets); flows use it to skip finished work and to
report a run. :func:`corpus_info` adds the counts (images per split and source, quarantine,
masks per round, stage and split) that ``dataengine info --root ROOT`` prints.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from dataengine.pipeline.core import quarantine, rounds, storage
from dataengine.pipeline.core.index import load_index
from dataengine.pipeline.core.layout import MODEL_KINDS, Corpus

logger = logging.getLogger(__name__)


def corpus_state(root: str | Corpus) -> dict[str, Any]:
    """Names of what is done in the corpus (JSON-safe)."""
    corpus = root if isinstance(root, Corpus) else Corpus(root)
    return {
        "root": corpus.root,
        "image_shards": corpus.image_shards(),
        "index": storage.exists(corpus.index),
        "rounds_complete": rounds.complete_rounds(corpus),
        "rounds_started": corpus.rounds(),
        "models": {kind: corpus.model_versions(kind) for kind in MODEL_KINDS},
        "latents": sorted(u.rsplit("/", 1)[-1] for u in storage.listdir(corpus.path("latents"))),
    }


def corpus_info(root: str) -> dict[str, Any]:
    """Counts per area: images (per split and source), quarantine (per stage), rounds (per
    stage: images and masks, complete or not), models (versions per kind), latents and
    embeddings (directories)."""
    corpus = Corpus(root)
    root = corpus.root
    if not storage.exists(root):
        raise FileNotFoundError(f"corpus root {root!r} does not exist")
    index = load_index(corpus)
    shards = corpus.image_shards()
    q = quarantine.load(corpus)
    info: dict[str, Any] = {
        "root": root,
        "images": {"shards": len(shards), "indexed": index.num_rows,
                   "bytes": int(sum(index.column("bytes").to_pylist())) if index.num_rows else 0,
                   "per_split": dict(Counter(index.column("split").to_pylist())),
                   "per_source": dict(Counter(index.column("source").to_pylist()))},
        "quarantine": {"total": q.num_rows, "per_stage": dict(Counter(q.column("stage")
                                                                      .to_pylist()))},
        "rounds": [],
        "models": {k: corpus.model_versions(k) for k in MODEL_KINDS},
        "latents": [u.rsplit("/", 1)[-1] for u in storage.listdir(corpus.path("latents"))],
        "embeddings": [u.rsplit("/", 1)[-1] for u in storage.listdir(corpus.path("embeddings"))],
    }
    split_of = dict(zip(index.column("key").to_pylist(), index.column("split").to_pylist(),
                        strict=True)) if index.num_rows else {}
    for number in corpus.rounds():
        meta = rounds.round_info(corpus, number) or {}
        table = rounds.read_round_manifest(corpus, number)
        keys = table.column("key").to_pylist()
        info["rounds"].append({
            "round": number, "stage": meta.get("stage", "?"),
            "model_version": meta.get("model_version", ""),
            "complete": rounds.is_complete(corpus, number), "masks": table.num_rows,
            "images": len(set(keys)),
            "masks_per_split": dict(Counter(split_of.get(k, "unindexed") for k in keys)),
            "masks_per_stage": dict(Counter(table.column("stage").to_pylist())),
        })
    return info
