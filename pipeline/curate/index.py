"""Nearest neighbours over the corpus' embeddings, with faiss.

faiss (Meta's similarity-search library, released monthly, CPU wheels for this Python) does
exact inner-product search over a few hundred thousand vectors in one call and switches to an
HNSW graph for larger sets behind the same interface; it also holds the signature windows of
near-duplicate detection. Indexes are built in memory from the stored vectors
(:mod:`dataengine.pipeline.curate.embed`), which are the source of truth: nothing else to keep in
step with the corpus.

Pooled SAM embeddings are standardised per dimension with the corpus' own mean and spread before
they are L2-normalised, so the cosine measures how two images differ from the corpus' typical
image rather than what every image shares (MEASURED: without it, a tiny SAM's vectors of
distinct photos sit at cosine > 0.98 of each other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dataengine.pipeline.core import splits
from dataengine.pipeline.core.index import load_index
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.curate.embed import EmbedConfig, embed_corpus, load_vectors

#: Exact search up to this many vectors; an HNSW graph beyond.
EXACT_LIMIT = 500_000


def normalise(vectors: np.ndarray, mean: np.ndarray | None = None,
              std: np.ndarray | None = None) -> np.ndarray:
    """Standardise each dimension (by ``mean`` / ``std``, default the rows' own) and
    L2-normalise each row; float32."""
    v = np.asarray(vectors, dtype=np.float32)
    mean = v.mean(0) if mean is None else mean
    std = v.std(0) if std is None else std
    v = (v - mean) / (std + 1e-6)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return np.ascontiguousarray(v / np.maximum(n, 1e-9), dtype=np.float32)


def build_ip_index(vectors: np.ndarray):  # -> faiss.Index
    """A faiss inner-product index over ``N x D`` float32 rows (exact up to
    :data:`EXACT_LIMIT`, HNSW beyond)."""
    import faiss

    v = np.ascontiguousarray(vectors, dtype=np.float32)
    d = v.shape[1]
    index = faiss.IndexFlatIP(d) if len(v) <= EXACT_LIMIT else \
        faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    index.add(v)
    return index


@dataclass
class Neighbour:
    """One nearest image: its key and cosine similarity to the query."""

    key: str
    similarity: float


class SimilarityIndex:
    """Cosine nearest neighbours of the corpus' images by their pooled embeddings."""

    def __init__(self, keys: list[str], vectors: np.ndarray) -> None:
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys but {len(vectors)} vectors")
        self.keys = list(keys)
        self.position = {k: i for i, k in enumerate(self.keys)}
        self.vectors = normalise(vectors) if len(keys) else np.zeros((0, 1), np.float32)
        self.index = build_ip_index(self.vectors) if len(keys) else None

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self.position

    def similarity(self, a: str, b: str) -> float:
        """Cosine of two indexed images."""
        return float(self.vectors[self.position[a]] @ self.vectors[self.position[b]])

    def neighbours(self, key: str, k: int = 10) -> list[Neighbour]:
        """The ``k`` most similar other images to ``key``, most similar first."""
        if key not in self.position:
            raise KeyError(f"image {key!r} has no embedding in this index")
        return self.search_many([key], k)[0]

    def search_many(self, keys: list[str], k: int = 10) -> list[list[Neighbour]]:
        """:meth:`neighbours` of several indexed images in one search."""
        if self.index is None or not keys:
            return [[] for _ in keys]
        q = self.vectors[[self.position[key] for key in keys]]
        sims, ids = self.index.search(q, min(k + 1, len(self.keys)))
        out = []
        for key, srow, irow in zip(keys, sims, ids, strict=True):
            found = [Neighbour(self.keys[int(i)], float(s)) for s, i in zip(srow, irow)
                     if i >= 0 and self.keys[int(i)] != key]
            out.append(found[:k])
        return out


def stored_index(corpus: Corpus, model_version: str) -> SimilarityIndex:
    """The similarity index of the pooled embeddings stored for ``model_version`` (nothing is
    computed: a server answers from what the embedding pass wrote)."""
    keys, vectors = load_vectors(corpus, model_version)
    return SimilarityIndex(keys, vectors)


def neighbour_rows(corpus: Corpus, index: SimilarityIndex, key: str, k: int
                   ) -> list[dict[str, Any]]:
    """``[{"key", "similarity", "split", "shard"}]`` of ``key``'s ``k`` nearest images."""
    if key not in index:
        raise ValueError(f"image {key!r} is not an image of {corpus.root} (or it has no "
                         f"embedding yet: run `dataengine embed`); keys are 16 hex digits")
    split_map = splits.load_map(corpus)
    table = load_index(corpus)
    shard_of = dict(zip(table.column("key").to_pylist(), table.column("shard").to_pylist(),
                        strict=True))
    return [{"key": n.key, "similarity": round(n.similarity, 4), "split": split_map.get(n.key),
             "shard": shard_of.get(n.key)} for n in index.neighbours(key, k)]


def similar_images(root: str, key: str, k: int = 10, config: EmbedConfig | None = None
                   ) -> dict[str, Any]:
    """The ``k`` images most like ``key`` by the pooled embeddings of ``config.model`` (the
    embedding pass fills in missing shards first): ``{"key", "model_version", "neighbours":
    [{"key", "similarity", "split", "shard"}]}``."""
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1")
    corpus = Corpus(root)
    summary = embed_corpus(corpus.root, config or EmbedConfig())
    index = stored_index(corpus, summary["model_version"])
    return {"key": key, "model_version": summary["model_version"],
            "neighbours": neighbour_rows(corpus, index, key, k)}
