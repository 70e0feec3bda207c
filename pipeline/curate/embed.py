"""The embedding pass: per image, a pooled SAM image embedding and a perceptual signature.

Both are derived datasets, one parquet file per image shard (same basename, keys in the shard's
order), published whole once (a second writer racing for a shard loses harmlessly):

- ``ROOT/embeddings/<model-version>/pooled/shard-NNNNNN.parquet``: ``key``, ``vector`` — the
  model's image-encoder output (``CxSxS``) averaged and its standard deviation taken over the
  image's own (unpadded) area, ``2C`` float32. Versioned per model: a new SAM version gets its
  own vectors. When the version's full embeddings are cached (``ROOT/embeddings/<version>/
  shard-NNNNNN.tar``, written by annotation rounds), they are pooled instead of re-encoding.
- ``ROOT/embeddings/signature-<id>/shard-NNNNNN.parquet``: ``key``, ``signature`` (the
  ``windows x dims`` float16 bytes of :func:`dataengine.pipeline.curate.signature.signature`).

:func:`embed_corpus` fills in the missing shards (in-process, or on a Ray actor pool with
``use_ray``) and returns a summary with the pass's images per second;
:func:`load_vectors` / :func:`load_signatures` read them back in corpus order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import promotion, storage
from dataengine.pipeline.core.imagecodec import sample_image
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.shards import iter_tar
from dataengine.pipeline.curate.signature import SignatureConfig, signature

logger = logging.getLogger(__name__)


@dataclass
class EmbedConfig:
    """The embedding pass (``dataengine embed``; ``similar`` and ``dedup`` run it first)."""

    model: str = "promoted"   # promoted | vNNNN | registry config (random weights) | checkpoint
    model_config: str = "tiny"   # registry config of a bare checkpoint file
    seed: int = 0
    signature: SignatureConfig = field(default_factory=SignatureConfig)
    batch_size: int = 8
    shards: list[str] = field(default_factory=list)   # only these image shards (default all)
    use_ray: bool = False
    num_actors: int = 2
    num_cpus: float = 1.0
    torch_threads: int = 0    # 0 = torch's default

    def __post_init__(self) -> None:
        if isinstance(self.signature, dict):
            self.signature = config_mod.from_dict(SignatureConfig, self.signature,
                                                  where="signature")
        if not self.model:
            raise ValueError("model: give promoted, a vNNNN, a registry config or a checkpoint")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        if self.num_actors < 1:
            raise ValueError(f"num_actors={self.num_actors}: must be >= 1")
        if not 0 < self.num_cpus <= 64:
            raise ValueError(f"num_cpus={self.num_cpus}: must be in (0, 64]")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads={self.torch_threads}: must be >= 0")


def model_spec(corpus: Corpus, spec: str) -> str:
    """``promoted`` -> the promoted SAM version (an error naming the way out when there is none);
    any other spec unchanged."""
    if spec != "promoted":
        return spec
    current = promotion.current_version(corpus)
    if current is None:
        raise ValueError(f"{corpus.root}: no SAM version is promoted; pass --model (a vNNNN, a "
                         f"registry config such as tiny-conv for random weights, or a checkpoint)")
    return current


def pooled_url(corpus: Corpus, model_version: str, shard: str) -> str:
    return storage.join(corpus.embeddings_dir(model_version), "pooled", f"{shard}.parquet")


def signature_url(corpus: Corpus, cfg: SignatureConfig, shard: str) -> str:
    return corpus.path("embeddings", cfg.name, f"{shard}.parquet")


def pool(features: np.ndarray, input_size: tuple[int, int], img_size: int) -> np.ndarray:
    """``CxSxS`` encoder output -> ``2C`` float32: mean and standard deviation over the
    positions covering the image (``input_size`` of the model's ``img_size`` frame)."""
    f = np.asarray(features, dtype=np.float32)
    scale = f.shape[-1] / img_size
    h = max(1, int(np.ceil(input_size[0] * scale)))
    w = max(1, int(np.ceil(input_size[1] * scale)))
    f = f[:, :h, :w]
    return np.concatenate([f.mean((1, 2)), f.std((1, 2))]).astype(np.float32)


class ShardEmbedder:
    """Fills in one image shard's pooled embeddings and signatures (a Ray actor wraps it)."""

    def __init__(self, root: str, cfg: EmbedConfig | dict[str, Any], spec: str,
                 model_version: str, model: Any = None) -> None:
        import torch

        self.cfg = cfg if isinstance(cfg, EmbedConfig) else config_mod.from_dict(EmbedConfig, cfg)
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        self.corpus = Corpus(root)
        self.spec = spec
        self.model_version = model_version
        self._model = model

    @property
    def model(self) -> Any:
        """The SAM model, loaded on first use (a shard whose parts all exist never needs it)."""
        if self._model is None:
            from dataengine.pipeline.sam.resolve import resolve_model

            self._model = resolve_model(self.corpus, self.spec, model_config=self.cfg.model_config,
                                        seed=self.cfg.seed)[0]
        return self._model

    def __call__(self, shard: str) -> dict[str, Any]:
        """Embed one shard's missing parts; returns its stats."""
        t0 = time.time()
        sig_url = signature_url(self.corpus, self.cfg.signature, shard)
        emb_url = pooled_url(self.corpus, self.model_version, shard)
        need_sig, need_emb = not storage.exists(sig_url), not storage.exists(emb_url)
        out: dict[str, Any] = {"shard": shard, "images": 0, "signatures": 0, "embeddings": 0,
                               "failures": []}
        if not need_sig and not need_emb:
            return {**out, "skipped": True, "seconds": 0.0}
        images: list[tuple[str, np.ndarray]] = []
        for sample in iter_tar(self.corpus.image_shard(shard)):
            try:
                images.append((sample["__key__"], sample_image(sample)))
            except Exception as exc:  # noqa: BLE001 - a bad image is recorded, the rest goes on
                out["failures"].append({"key": sample.get("__key__"), "reason": str(exc)})
        out["images"] = len(images)
        if need_sig:
            rows = [{"key": k, "signature": signature(img, self.cfg.signature)
                     .astype(np.float16).tobytes()} for k, img in images]
            storage.create_bytes(sig_url, _parquet(pa.Table.from_pylist(
                rows, schema=pa.schema([("key", pa.string()), ("signature", pa.binary())]))))
            out["signatures"] = len(rows)
        if need_emb:
            vectors = self._vectors(shard, images)
            table = pa.table({"key": [k for k, _ in images],
                              "vector": pa.array([v.tolist() for v in vectors],
                                                 pa.list_(pa.float32()))})
            storage.create_bytes(emb_url, _parquet(table))
            out["embeddings"] = len(images)
        out["seconds"] = round(time.time() - t0, 3)
        return out

    def _vectors(self, shard: str, images: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        from dataengine.pipeline.sam.embeddings import EmbeddingCache, compute_embeddings

        cached = EmbeddingCache(self.corpus, self.model_version, write=False).load_shard(shard)
        todo = [(k, img) for k, img in images if k not in cached]
        if todo:
            computed = compute_embeddings(self.model, [img for _, img in todo],
                                          self.cfg.batch_size)
            cached.update({k: e for (k, _), e in zip(todo, computed, strict=True)})
        size = int(self.model.image_encoder.img_size)
        return [pool(cached[k].features, cached[k].input_size, size) for k, _ in images]


def _parquet(table: pa.Table) -> bytes:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def embed_corpus(root: str, config: EmbedConfig | None = None) -> dict[str, Any]:
    """Fill in the pooled embeddings and signatures of every image shard; returns a summary
    (model version, signature version, shards done / skipped / failed, images, images/s)."""
    cfg = config or EmbedConfig()
    corpus = Corpus(root)
    shards = corpus.image_shards()
    if not shards:
        raise FileNotFoundError(f"{corpus.images}: no image shards; run `dataengine shard` first")
    unknown = sorted(set(cfg.shards) - set(shards))
    if unknown:
        raise ValueError(f"shards {unknown} are not image shards of {corpus.root}")
    shards = [s for s in shards if not cfg.shards or s in set(cfg.shards)]
    spec = model_spec(corpus, cfg.model)
    from dataengine.pipeline.sam.resolve import resolve_model

    model, version = resolve_model(corpus, spec, model_config=cfg.model_config, seed=cfg.seed)
    if version.startswith("signature-"):
        raise ValueError(f"model version {version!r} would collide with the signatures' folder")
    todo = [s for s in shards if not (storage.exists(pooled_url(corpus, version, s)) and
                                      storage.exists(signature_url(corpus, cfg.signature, s)))]
    t0 = time.time()
    results: list[dict[str, Any]] = []
    if todo and cfg.use_ray:
        from dataengine.pipeline.core.distribute import map_actors

        results = map_actors(ShardEmbedder, (corpus.root, config_mod.to_dict(cfg), spec, version),
                             todo, num_actors=cfg.num_actors, num_cpus=cfg.num_cpus,
                             failure=lambda shard, msg: {"shard": shard, "error": msg})
    elif todo:
        worker = ShardEmbedder(corpus.root, cfg, spec, version, model)
        for shard in todo:
            try:
                results.append(worker(shard))
            except Exception as exc:  # noqa: BLE001 - recorded; the other shards go on
                logger.exception("embed: shard %s failed", shard)
                results.append({"shard": shard, "error": f"{type(exc).__name__}: {exc}"})
    seconds = time.time() - t0
    images = sum(r.get("images", 0) for r in results)
    failed = [r for r in results if "error" in r]
    summary = {"model_version": version, "signature": cfg.signature.name,
               "shards": len(shards), "computed_shards": len(todo) - len(failed),
               "failed_shards": failed, "images": images,
               "failed_images": [f for r in results for f in r.get("failures", [])],
               "seconds": round(seconds, 3),
               "images_per_second": round(images / seconds, 2) if images and seconds else None}
    if failed:
        logger.error("embed: %d shard(s) failed: %s", len(failed), failed)
    return summary


def _read_shards(urls: list[str], column: str) -> tuple[list[str], list[Any]]:
    keys: list[str] = []
    values: list[Any] = []
    for u in urls:
        t = storage.read_table(u)
        keys += t.column("key").to_pylist()
        values += t.column(column).to_pylist()
    return keys, values


def load_vectors(corpus: Corpus, model_version: str) -> tuple[list[str], np.ndarray]:
    """Keys (corpus order) and their pooled embeddings ``N x D`` float32."""
    urls = [pooled_url(corpus, model_version, s) for s in corpus.image_shards()]
    keys, values = _read_shards([u for u in urls if storage.exists(u)], "vector")
    if not keys:
        return [], np.zeros((0, 0), np.float32)
    return keys, np.asarray(values, dtype=np.float32)


def load_signatures(corpus: Corpus, cfg: SignatureConfig) -> tuple[list[str], np.ndarray]:
    """Keys (corpus order) and their signatures ``N x windows x dims`` float32."""
    urls = [signature_url(corpus, cfg, s) for s in corpus.image_shards()]
    keys, values = _read_shards([u for u in urls if storage.exists(u)], "signature")
    sigs = np.stack([np.frombuffer(v, np.float16).reshape(cfg.windows, cfg.dims)
                     for v in values]).astype(np.float32) if values else \
        np.zeros((0, cfg.windows, cfg.dims), np.float32)
    return keys, sigs


def read_images(corpus: Corpus, keys: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, HxWx3 uint8)`` of ``keys`` in corpus order (an unreadable image is logged and
    skipped)."""
    wanted = set(keys)
    for shard in corpus.image_shards():
        if not wanted:
            return
        done = storage.read_json(corpus.image_done(shard))
        if not wanted & set(done.get("keys", [])):
            continue
        for sample in iter_tar(corpus.image_shard(shard)):
            key = sample["__key__"]
            if key not in wanted:
                continue
            wanted.discard(key)
            try:
                yield key, sample_image(sample)
            except Exception as exc:  # noqa: BLE001 - a bad image is skipped, named
                logger.error("%s/%s: unreadable image skipped: %s", shard, key, exc)
