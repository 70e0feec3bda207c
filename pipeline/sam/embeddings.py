"""Cached SAM image embeddings: ``ROOT/embeddings/<model-version>/shard-NNNNNN.tar``.

A model version encodes each image once, across stages, rounds and the browser annotation tool.
One tar per image shard (same basename; keys a subsequence of the image shard's, in order), each
sample ``__key__`` + ``npy`` (the ``CxSxS`` image embedding as float16, written and read with
``allow_pickle=False``) + ``json`` (``input_size`` and ``original_size`` as SAM's predictor
records them, model version). A shard's tar is published whole, once (append-only); images missing
from it (added later, or failed) are computed on demand and not written.

:class:`EmbeddingCache` is the get-or-compute API: ``cache.ensure_shard(shard, images)`` before
working on a shard, then ``cache(key, image)`` (the callable
:class:`dataengine.pipeline.sam.clicker.SamSegmenter` takes) or ``cache.get(key, image)``.
Embeddings are always rounded to float16, computed or cached, so a cached and a fresh run give the
same masks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.shards import iter_tar, load_npy, npy_bytes, write_tar

logger = logging.getLogger(__name__)



@dataclass
class Embedding:
    """One image's embedding: ``features`` CxSxS float16; sizes as ``(H, W)``."""

    features: np.ndarray
    input_size: tuple[int, int]
    original_size: tuple[int, int]

    def as_tuple(self) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        return self.features, self.input_size, self.original_size






@torch.inference_mode()
def compute_embeddings(model: Any, images: list[np.ndarray], batch_size: int = 4
                       ) -> list[Embedding]:
    """Encode HxWx3 uint8 images with ``model.image_encoder`` (the model's input frame:
    :func:`dataengine.pipeline.sam.predictor.encoder_input`), in batches; float16 ``CxSxS``
    results."""
    from dataengine.models.device import autocast, model_device
    from dataengine.pipeline.sam.predictor import encoder_input

    device = model_device(model)
    out: list[Embedding] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        tensors, in_sizes = [], []
        for img in chunk:
            t, in_size = encoder_input(model, img)
            in_sizes.append(in_size)
            tensors.append(t)
        with autocast(device):
            feats = model.image_encoder(torch.stack(tensors))
        feats = feats.float().cpu().numpy().astype(np.float16)
        for img, f, ins in zip(chunk, feats, in_sizes):
            out.append(Embedding(f, ins, (int(img.shape[0]), int(img.shape[1]))))
    return out


class EmbeddingCache:
    """Get-or-compute image embeddings of one model version under ``ROOT/embeddings/``."""

    def __init__(self, corpus: Corpus | str, model_version: str, model: Any = None, *,
                 batch_size: int = 4, write: bool = True) -> None:
        self.corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
        if not model_version or "/" in model_version:
            raise ValueError(f"model_version {model_version!r} must be a non-empty name")
        self.model_version = model_version
        self.model = model
        self.batch_size = batch_size
        self.write = write
        self.memory: dict[str, Embedding] = {}
        self.computed = 0
        self.hits = 0

    @property
    def dir(self) -> str:
        return self.corpus.embeddings_dir(self.model_version)

    def shard_url(self, shard: str) -> str:
        return storage.join(self.dir, f"{shard}.tar")

    def has_shard(self, shard: str) -> bool:
        return storage.exists(self.shard_url(shard))

    def load_shard(self, shard: str) -> dict[str, Embedding]:
        """Embeddings of a published shard tar (empty when there is none)."""
        url = self.shard_url(shard)
        if not storage.exists(url):
            return {}
        out = {}
        for s in iter_tar(url):
            try:
                meta = json.loads(s["json"])
                out[s["__key__"]] = Embedding(load_npy(s["npy"]), tuple(meta["input_size"]),
                                              tuple(meta["original_size"]))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{url}: bad embedding sample {s.get('__key__')!r}: "
                                 f"{exc}") from exc
        return out

    def ensure_shard(self, shard: str, images: Iterable[tuple[str, np.ndarray]]) -> int:
        """Load the shard's embeddings, computing and publishing them when the tar is absent.

        ``images`` yields ``(key, HxWx3 uint8)`` in the image shard's order. Returns how many
        were computed now."""
        cached = self.load_shard(shard)
        if cached:
            self.memory.update(cached)
            return 0
        items = list(images)
        if not items:
            return 0
        embs = self._compute([img for _, img in items])
        for (key, _), e in zip(items, embs):
            self.memory[key] = e
        if self.write:
            write_tar(self.shard_url(shard), (
                {"__key__": key, "npy": npy_bytes(e.features),
                 "json": {"input_size": list(e.input_size), "original_size":
                          list(e.original_size), "model_version": self.model_version}}
                for (key, _), e in zip(items, embs)))
            logger.info("embeddings %s/%s: %d images", self.model_version, shard, len(items))
        return len(items)

    def _compute(self, images: list[np.ndarray]) -> list[Embedding]:
        if self.model is None:
            raise ValueError(f"embedding cache {self.dir}: image not cached and no model given")
        self.computed += len(images)
        return compute_embeddings(self.model, images, self.batch_size)

    def get(self, key: str, image: np.ndarray | None = None) -> Embedding:
        """The embedding of ``key``: from memory / loaded shards, else computed from ``image``."""
        if key in self.memory:
            self.hits += 1
            return self.memory[key]
        if image is None:
            raise KeyError(f"no cached embedding for {key!r} under {self.dir} and no image")
        e = self._compute([image])[0]
        self.memory[key] = e
        return e

    def __call__(self, key: str, image: np.ndarray | None = None
                 ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """``(features CxSxS, input_size, original_size)`` for :class:`SamSegmenter`."""
        return self.get(key, image).as_tuple()

    def drop_shard(self, keys: Iterable[str]) -> None:
        """Forget in-memory embeddings of ``keys`` (after a shard is done)."""
        for k in keys:
            self.memory.pop(k, None)
