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
from dataengine.pipeline.core.index import has_index, iter_index
from dataengine.pipeline.core.layout import MODEL_KINDS, Corpus

logger = logging.getLogger(__name__)


def corpus_state(root: str | Corpus) -> dict[str, Any]:
    """Names of what is done in the corpus (JSON-safe)."""
    corpus = root if isinstance(root, Corpus) else Corpus(root)
    return {
        "root": corpus.root,
        "image_shards": corpus.image_shards(),
        "index": has_index(corpus),
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
    shards = corpus.image_shards()
    q = quarantine.load(corpus)
    split_of: dict[str, str] = {}
    per_source: Counter = Counter()
    nbytes = 0
    for batch in iter_index(corpus, ["key", "split", "source", "bytes"]):
        split_of.update(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(),
                            strict=True))
        per_source.update(batch.column(2).to_pylist())
        nbytes += sum(v or 0 for v in batch.column(3).to_pylist())
    info: dict[str, Any] = {
        "root": root,
        "images": {"shards": len(shards), "indexed": len(split_of), "bytes": nbytes,
                   "per_split": dict(Counter(split_of.values())),
                   "per_source": dict(per_source)},
        "quarantine": {"total": q.num_rows, "per_stage": dict(Counter(q.column("stage")
                                                                      .to_pylist()))},
        "rounds": [],
        "models": {k: corpus.model_versions(k) for k in MODEL_KINDS},
        "latents": [u.rsplit("/", 1)[-1] for u in storage.listdir(corpus.path("latents"))],
        "embeddings": [u.rsplit("/", 1)[-1] for u in storage.listdir(corpus.path("embeddings"))],
    }
    for number in corpus.rounds():
        meta = rounds.round_info(corpus, number) or {}
        table = rounds.read_round_manifest(corpus, number, ["key", "stage"])
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
