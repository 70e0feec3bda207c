"""SAM behind the annotate page: model versions, image embeddings, one decoder call per prompt.

Embeddings come, in order, from memory, from the corpus embedding cache
(``ROOT/embeddings/<model-version>/``, filled ahead of time by the annotation stage's Ray actor
pool when a round is opened for people, see :func:`precompute`), or from the encoder in this
process as a last resort (then kept in memory; the next queued images are encoded in the
background so a person rarely waits).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.layout import Corpus

logger = logging.getLogger(__name__)

Embedding = tuple[Any, tuple[int, int], tuple[int, int]]  # features 1xCxSxS, input, original


def _cache_lookup(corpus: Corpus, version: str) -> Callable[[str, np.ndarray | None], Any] | None:
    """The corpus embedding cache of issue 3 (``pipeline.embeddings``), when installed."""
    try:
        from pipeline import embeddings as emb
    except ImportError:
        return None
    for name in ("EmbeddingCache", "EmbeddingStore"):
        cls = getattr(emb, name, None)
        if cls is None:
            continue
        try:
            return cls(corpus, version)
        except TypeError:
            try:
                return cls(corpus=corpus, model_version=version)
            except Exception as exc:  # noqa: BLE001 - fall back to encoding here
                logger.warning("embedding cache %s unusable: %s", name, exc)
                return None
    return None


class SamService:
    """Loads SAM versions and answers prompts for one image at a time (thread-safe)."""

    def __init__(self, corpus: Corpus, device: str | None = None, max_models: int = 2,
                 max_embeddings: int = 24) -> None:
        self.corpus = corpus
        self.device = device or None
        self.max_models = max_models
        self.max_embeddings = max_embeddings
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._emb: OrderedDict[tuple[str, str], Embedding] = OrderedDict()
        self._caches: dict[str, Any] = {}
        self._lock = threading.RLock()
        self._encode_lock = threading.Lock()
        self._pending: set[tuple[str, str]] = set()
        self.stats = {"embeddings_from_cache": 0, "embeddings_encoded": 0, "encoder_ms": 0.0}

    def model(self, version: str) -> Any:
        """The SAM model of ``version`` (``ROOT/models/sam/<version>``), loaded once."""
        with self._lock:
            if version in self._models:
                self._models.move_to_end(version)
                return self._models[version]
        from models.sam import load_sam

        model = load_sam(self.corpus.model_dir("sam", version), device=self.device)
        model.eval()
        with self._lock:
            self._models[version] = model
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        return model

    def embedding(self, version: str, key: str, image_fn: Callable[[], np.ndarray]) -> Embedding:
        """Image embedding of ``key`` under ``version`` (memory, corpus cache, or encoder)."""
        k = (version, key)
        with self._lock:
            if k in self._emb:
                self._emb.move_to_end(k)
                return self._emb[k]
        emb = self._from_cache(version, key)
        if emb is None:
            emb = self._encode(version, key, image_fn)
        with self._lock:
            self._emb[k] = emb
            while len(self._emb) > self.max_embeddings:
                self._emb.popitem(last=False)
        return emb

    def _from_cache(self, version: str, key: str) -> Embedding | None:
        if version not in self._caches:
            self._caches[version] = _cache_lookup(self.corpus, version)
        cache = self._caches[version]
        if cache is None:
            return None
        getter = getattr(cache, "get", None)
        try:
            found = getter(key) if getter else None
        except Exception as exc:  # noqa: BLE001 - a cache miss or a bad entry: encode instead
            logger.debug("embedding cache miss for %s/%s: %s", version, key, exc)
            return None
        if found is None:
            return None
        import torch

        feats, input_size, original_size = found
        feats = torch.as_tensor(np.asarray(feats, dtype=np.float32))
        if feats.ndim == 3:
            feats = feats[None]
        self.stats["embeddings_from_cache"] += 1
        return feats, tuple(int(v) for v in input_size), tuple(int(v) for v in original_size)

    def _encode(self, version: str, key: str, image_fn: Callable[[], np.ndarray]) -> Embedding:
        import torch
        from segment_anything import SamPredictor

        from models.sam import autocast

        model = self.model(version)
        image = image_fn()
        with self._encode_lock:  # one encoder pass at a time: the CPU has few cores
            t0 = time.perf_counter()
            p = SamPredictor(model)
            with torch.inference_mode(), autocast(p.device):
                p.set_image(image)
            ms = (time.perf_counter() - t0) * 1000
        self.stats["embeddings_encoded"] += 1
        self.stats["encoder_ms"] += ms
        logger.info("encoded %s with %s in %.0f ms", key, version, ms)
        return p.features.float(), tuple(p.input_size), tuple(p.original_size)

    def prefetch(self, version: str, items: list[tuple[str, Callable[[], np.ndarray]]]) -> None:
        """Encode these images in a background thread (skipping ones already known)."""
        todo = []
        with self._lock:
            for key, fn in items:
                k = (version, key)
                if k not in self._emb and k not in self._pending:
                    self._pending.add(k)
                    todo.append((key, fn))
        if not todo:
            return

        def run() -> None:
            for key, fn in todo:
                try:
                    self.embedding(version, key, fn)
                except Exception as exc:  # noqa: BLE001 - the foreground path will retry
                    logger.warning("prefetch of %s failed: %s", key, exc)
                finally:
                    with self._lock:
                        self._pending.discard((version, key))

        threading.Thread(target=run, daemon=True, name="sam-prefetch").start()

    def predict(self, version: str, key: str, image_fn: Callable[[], np.ndarray],
                points: np.ndarray | None, labels: np.ndarray | None,
                box: np.ndarray | None, mask_input: np.ndarray | None,
                multimask: bool) -> list[dict[str, Any]]:
        """Masks for one prompt: a list (3 with ``multimask``) of ``{"mask": HxW bool,
        "score": predicted IoU, "stability": float, "low_res": 1x256x256 float32 logits}``."""
        import torch
        from segment_anything import SamPredictor
        from segment_anything.utils.amg import calculate_stability_score

        from models.sam import autocast

        feats, input_size, original_size = self.embedding(version, key, image_fn)
        model = self.model(version)
        p = SamPredictor(model)
        p.features = feats.to(p.device)
        p.input_size, p.original_size = input_size, original_size
        p.is_image_set = True
        with torch.inference_mode(), autocast(p.device):
            logits, scores, low_res = p.predict(point_coords=points, point_labels=labels, box=box,
                                                mask_input=mask_input,
                                                multimask_output=multimask, return_logits=True)
        thr = model.mask_threshold
        stab = calculate_stability_score(torch.from_numpy(logits), thr, 1.0).numpy()
        return [{"mask": logits[i] > thr, "score": float(scores[i]),
                 "stability": float(stab[i]), "low_res": low_res[i:i + 1].astype(np.float32)}
                for i in range(len(scores))]


def precompute(corpus: Corpus, version: str, shards: list[str]) -> dict[str, Any] | None:
    """Fill ``ROOT/embeddings/<version>/`` for these image shards with the annotation stage's
    Ray actor pool (issue 3's ``pipeline.embeddings``); None when that module is not present."""
    try:
        from pipeline import embeddings as emb
    except ImportError:
        logger.warning("pipeline.embeddings is not installed: embeddings will be computed by "
                       "the server on demand")
        return None
    fn = getattr(emb, "precompute_embeddings", None) or getattr(emb, "compute_embeddings", None)
    if fn is None:
        logger.warning("pipeline.embeddings has no precompute function")
        return None
    return fn(corpus, version, shards=shards)
