"""SAM behind the annotate page: model versions, image embeddings, one decoder call per prompt.

Embeddings come, in order, from memory, from the corpus embedding cache
(``ROOT/embeddings/<model-version>/``, filled ahead of time by the annotation stage's Ray actor
pool when a round is opened for people, see :func:`precompute`), or from the encoder in this
process as a last resort (then kept in memory; the next queued images are encoded in the
background so a person rarely waits).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from dataengine.models.checkpoint import weights_digest
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.sam.predictor import make_predictor, onnx_exportable, set_features
from dataengine.pipeline.server.private_cache import PrivateCache

logger = logging.getLogger(__name__)

Embedding = tuple[Any, tuple[int, int], tuple[int, int]]  # features 1xCxSxS, input, original
DECODERS = ("auto", "onnx", "torch")


def decoder_threads(requested: int = 0) -> int:
    """Threads of one decoder call: ``requested``, else half the cores (at most 4).

    A vit_b click is ~50 ms of one core. The other half of the cores serves HTTP, the prefetch
    thread and a second decoder call; a decoder thread that shares a core with them stalls
    every parallel op it is part of (MEASURED on 2 cores: p95 per click 64 ms on one thread,
    73 ms on two)."""
    return requested if requested > 0 else max(1, min(4, (os.cpu_count() or 1) // 2))


def decoder_slots(requested: int = 0) -> int:
    """Decoder calls at once: as many as the cores hold at :func:`decoder_threads` each, so
    that one person's click runs beside another's instead of waiting for it."""
    return max(1, (os.cpu_count() or 1) // decoder_threads(requested))


class OnnxDecoder:
    """The prompt encoder + mask decoder of one SAM version as ONNX Runtime sessions (exported
    once by :func:`dataengine.models.sam.export_onnx_decoder`, Meta's export without its upsampling,
    into the local cache).

    Two graphs: ``multi`` returns all four mask tokens (for a first click's three choices and
    for a box alone, token 0), ``single`` lets the graph pick one (SAM's own rule: the
    single-mask token once there are several clicks). Both stop at the low-res logits; only the
    masks sent back are upsampled to the image (:func:`dataengine.models.sam.upscale_logits`)."""

    # part of the cache entry name: a changed export never reuses old files
    GRAPH_VERSION = "lowres3"

    def __init__(self, model: Any, version: str, cache: PrivateCache | str,
                 threads: int = 0) -> None:
        import onnxruntime as ort

        cache = PrivateCache(cache) if isinstance(cache, str) else cache
        self.cache = cache
        self.sessions = {}
        self.entries: dict[str, str] = {}
        so = ort.SessionOptions()
        # no spin-waiting threads: they would steal the cores HTTP and the prefetch thread need
        so.intra_op_num_threads = decoder_threads(threads)
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # same weights -> same graphs, whatever the corpus
        digest = weights_digest(model.prompt_encoder, model.mask_decoder)[:24]
        for name, single in (("multi", False), ("single", True)):
            entry = f"onnx/{digest}-{name}-{self.GRAPH_VERSION}.onnx"
            data = cache.get(entry)  # verified against its SHA-256 before it is used
            if data is None:
                data = _export_graph(model, cache, single)
                cache.put(entry, data)
            self.entries[name] = entry
            self.sessions[name] = ort.InferenceSession(data, so,
                                                       providers=["CPUExecutionProvider"])
        from segment_anything.utils.transforms import ResizeLongestSide

        self.img_size = model.image_encoder.img_size
        self.transform = ResizeLongestSide(self.img_size)
        self.low_res = 4 * model.prompt_encoder.image_embedding_size[0]
        self.embedding_shape = [1, model.prompt_encoder.embed_dim,
                                *model.prompt_encoder.image_embedding_size]
        self.threshold = float(model.mask_threshold)

    def graph(self, kind: str) -> bytes:
        """The ONNX graph ``multi`` or ``single`` as stored in the cache (checked again)."""
        data = self.cache.get(self.entries[kind])
        if data is None:
            raise FileNotFoundError(f"decoder graph {self.entries[kind]} left the cache")
        return data

    def predict(self, feats: Any, original_size: tuple[int, int], points: np.ndarray | None,
                labels: np.ndarray | None, box: np.ndarray | None,
                mask_input: np.ndarray | None, multimask: bool, lowres_only: bool = False
                ) -> list[tuple[np.ndarray | None, float, np.ndarray]]:
        """``[(logits HxW, score, low-res 1xSxS)]``: three for ``multimask``, else one
        (logits None with ``lowres_only``)."""
        from dataengine.models.sam import upscale_logits

        coords = np.zeros((0, 2), np.float32) if points is None else points.astype(np.float32)
        labs = np.zeros((0,), np.float32) if labels is None else labels.astype(np.float32)
        if box is not None:
            coords = np.concatenate([coords, box.reshape(2, 2).astype(np.float32)])
            labs = np.concatenate([labs, np.array([2, 3], np.float32)])
        else:
            coords = np.concatenate([coords, np.zeros((1, 2), np.float32)])
            labs = np.concatenate([labs, np.array([-1], np.float32)])
        coords = self.transform.apply_coords(coords, original_size).astype(np.float32)
        has_mask = mask_input is not None
        feed = {
            "image_embeddings": np.ascontiguousarray(feats.numpy(), dtype=np.float32),
            "point_coords": coords[None], "point_labels": labs[None],
            "mask_input": (np.asarray(mask_input, np.float32).reshape(1, 1, self.low_res,
                                                                     self.low_res)
                           if has_mask else np.zeros((1, 1, self.low_res, self.low_res),
                                                     np.float32)),
            "has_mask_input": np.array([1.0 if has_mask else 0.0], np.float32),
        }
        box_only = box is not None and (points is None or not len(points)) and not has_mask
        if multimask or box_only:
            scores, low = self.sessions["multi"].run(None, feed)
            idx = [1, 2, 3] if multimask else [0]
        else:
            scores, low = self.sessions["single"].run(None, feed)
            idx = [0]
        input_size = self.transform.get_preprocess_shape(original_size[0], original_size[1],
                                                         self.img_size)
        return [(None if lowres_only else
                 upscale_logits(low[0, i], input_size, original_size, self.img_size),
                 float(scores[0, i]), low[0, i][None]) for i in idx]


def _export_graph(model: Any, cache: PrivateCache, single: bool) -> bytes:
    """Export one decoder graph into a private temporary folder and return its bytes."""
    import shutil
    import tempfile

    from dataengine.models.sam import export_onnx_decoder

    d = tempfile.mkdtemp(dir=cache.root, prefix="export-")
    try:
        path = f"{d}/graph.onnx"
        export_onnx_decoder(model, path, return_single_mask=single, upscale=False)
        with open(path, "rb") as f:
            return f.read()
    finally:
        shutil.rmtree(d, ignore_errors=True)




def _stability(logits: np.ndarray, threshold: float, offset: float = 1.0) -> float:
    hi = np.count_nonzero(logits > threshold + offset)
    lo = np.count_nonzero(logits > threshold - offset)
    return float(hi / lo) if lo else 0.0


class SamService:
    """Loads SAM versions and answers prompts for one image at a time (thread-safe)."""

    def __init__(self, corpus: Corpus, device: str | None = None, max_models: int = 2,
                 max_embeddings: int = 24, threads: int = 0, tars: Any = None,
                 decoder: str = "auto", cache: PrivateCache | None = None) -> None:
        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r}: allowed {DECODERS}")
        self.corpus = corpus
        self.threads = threads
        self.decoder = decoder
        self.cache = cache
        self._onnx: dict[str, OnnxDecoder | None] = {}
        self._onnx_lock = threading.Lock()
        self.device = device or None
        self.max_models = max_models
        self.max_embeddings = max_embeddings
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._emb: OrderedDict[tuple[str, str], Embedding] = OrderedDict()
        self.tars = tars
        self._lock = threading.RLock()
        self._encode_lock = threading.Lock()
        self._pending: set[tuple[str, str]] = set()
        self._inflight: dict[tuple[str, str], threading.Event] = {}
        self.stats = {"embeddings_from_cache": 0, "embeddings_encoded": 0, "encoder_ms": 0.0,
                      "decoder_calls": 0}

    def model(self, version: str) -> Any:
        """The SAM model of ``version`` (``ROOT/models/sam/<version>``), loaded once."""
        with self._lock:
            if version in self._models:
                self._models.move_to_end(version)
                return self._models[version]
        from dataengine.pipeline.core.checkpoints import load_sam

        if self.threads > 0:
            import torch

            torch.set_num_threads(self.threads)
        model = load_sam(self.corpus.model_dir("sam", version), device=self.device)
        model.eval()
        with self._lock:
            self._models[version] = model
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        return model

    def embedding(self, version: str, key: str, image_fn: Callable[[], np.ndarray],
                  shard: str | None = None) -> Embedding:
        """Image embedding of ``key`` under ``version`` (memory, corpus cache, or encoder)."""
        k = (version, key)
        while True:
            with self._lock:
                if k in self._emb:
                    self._emb.move_to_end(k)
                    return self._emb[k]
                event = self._inflight.get(k)
                if event is None:  # nobody computes it: we do
                    event = self._inflight[k] = threading.Event()
                    break
            event.wait()  # another thread (e.g. the prefetch) is computing it
        try:
            emb = self._from_cache(version, key, shard)
            if emb is None:
                emb = self._encode(version, key, image_fn)
            with self._lock:
                self._emb[k] = emb
                while len(self._emb) > self.max_embeddings:
                    self._emb.popitem(last=False)
            return emb
        finally:
            with self._lock:
                self._inflight.pop(k, None)
            event.set()

    def _from_cache(self, version: str, key: str, shard: str | None) -> Embedding | None:
        """One sample of ``ROOT/embeddings/<version>/<shard>.tar`` (format: ``npy``
        CxSxS float16 + ``json`` sizes), read with a ranged read, never the whole tar."""
        if shard is None or self.tars is None:
            return None
        from dataengine.pipeline.core import storage

        url = storage.join(self.corpus.embeddings_dir(version), f"{shard}.tar")
        try:
            if not storage.exists(url):
                return None
            members = self.tars.sample_members(url, key)
            if "npy" not in members or "json" not in members:
                return None
            import json

            import torch

            from dataengine.pipeline.core.shards import load_npy

            feats = load_npy(self.tars.read(url, key, "npy"))
            meta = json.loads(self.tars.read(url, key, "json"))
        except Exception as exc:  # noqa: BLE001 - a bad cache entry: encode instead
            logger.warning("embedding cache %s: cannot use %s: %s", url, key, exc)
            return None
        feats = torch.as_tensor(np.asarray(feats, dtype=np.float32))
        if feats.ndim == 3:
            feats = feats[None]
        self.stats["embeddings_from_cache"] += 1
        return (feats, tuple(int(v) for v in meta["input_size"]),
                tuple(int(v) for v in meta["original_size"]))

    def _encode(self, version: str, key: str, image_fn: Callable[[], np.ndarray]) -> Embedding:
        import torch

        from dataengine.models.device import autocast

        model = self.model(version)
        image = image_fn()
        with self._encode_lock:  # one encoder pass at a time: the CPU has few cores
            t0 = time.perf_counter()
            p = make_predictor(model)
            with torch.inference_mode(), autocast(p.device):
                p.set_image(image)
            ms = (time.perf_counter() - t0) * 1000
        self.stats["embeddings_encoded"] += 1
        self.stats["encoder_ms"] += ms
        logger.info("encoded %s with %s in %.0f ms", key, version, ms)
        return p.features.float(), tuple(p.input_size), tuple(p.original_size)

    def _onnx_decoder(self, version: str, model: Any) -> OnnxDecoder | None:
        if self.decoder == "torch" or self.device not in (None, "cpu"):
            return None
        if not onnx_exportable(model):  # SAM 2: its torch decoder (make_predictor)
            return None
        with self._onnx_lock:  # not self._lock: an export takes seconds
            if version in self._onnx:
                return self._onnx[version]
            try:
                if self.cache is None:
                    raise ImportError("no private cache for the decoder graphs")
                dec: OnnxDecoder | None = OnnxDecoder(model, version, self.cache, self.threads)
            except ImportError as exc:
                if self.decoder == "onnx":
                    raise
                logger.info("onnxruntime unavailable (%s): torch decoder", exc)
                dec = None
            except Exception as exc:  # noqa: BLE001 - export can fail on exotic configs
                if self.decoder == "onnx":
                    raise
                logger.warning("ONNX decoder for %s unavailable: %s; torch decoder", version, exc)
                dec = None
            self._onnx[version] = dec
            return dec

    def browser_decoder(self, version: str) -> OnnxDecoder | None:
        """The ONNX decoder of ``version``, whose graphs a browser can run; None when the server
        uses the torch decoder (configured, on a GPU, or ONNX Runtime unavailable)."""
        return self._onnx_decoder(version, self.model(version))

    def embedding_payload(self, version: str, key: str, image_fn: Callable[[], np.ndarray],
                          shard: str | None = None) -> tuple[bytes, dict[str, Any]]:
        """The image embedding as little-endian float16 bytes (1xCxSxS) and its sizes, for a
        decoder running in the browser."""
        feats, input_size, original_size = self.embedding(version, key, image_fn, shard)
        arr = np.ascontiguousarray(feats.numpy(), dtype="<f2")
        return arr.tobytes(), {"shape": list(arr.shape), "input_size": list(input_size),
                               "original_size": list(original_size)}

    def prefetch(self, version: str,
                 items: list[tuple[str, Callable[[], np.ndarray], str | None]]) -> None:
        """Load the model and its decoder, and encode these images (unless cached), in a
        background thread, so the first click finds everything ready."""
        todo = []
        with self._lock:
            warm = version not in self._onnx and (version, "warm") not in self._pending
            if warm:
                self._pending.add((version, "warm"))
            for key, fn, shard in items:
                k = (version, key)
                if k not in self._emb and k not in self._pending:
                    self._pending.add(k)
                    todo.append((key, fn, shard))
        if not todo and not warm:
            return

        def run() -> None:
            if warm:
                try:
                    self._onnx_decoder(version, self.model(version))
                except Exception as exc:  # noqa: BLE001 - the foreground path reports it
                    logger.warning("warming SAM %s failed: %s", version, exc)
            for key, fn, shard in todo:
                try:
                    self.embedding(version, key, fn, shard)
                except Exception as exc:  # noqa: BLE001 - the foreground path will retry
                    logger.warning("prefetch of %s failed: %s", key, exc)
                finally:
                    with self._lock:
                        self._pending.discard((version, key))

        # not a daemon: torch / ONNX Runtime work killed at interpreter exit aborts the process
        threading.Thread(target=run, daemon=False, name="sam-prefetch").start()

    def predict(self, version: str, key: str, image_fn: Callable[[], np.ndarray],
                points: np.ndarray | None, labels: np.ndarray | None,
                box: np.ndarray | None, mask_input: np.ndarray | None,
                multimask: bool, shard: str | None = None, lowres_only: bool = False
                ) -> list[dict[str, Any]]:
        """Masks for one prompt: a list (3 with ``multimask``) of ``{"mask": HxW bool,
        "score": predicted IoU, "stability": float, "low_res": 1x256x256 float32 logits}``
        (with ``lowres_only`` and the ONNX decoder, ``mask`` is None and ``stability`` 0)."""
        import torch
        from segment_anything.utils.amg import calculate_stability_score

        from dataengine.models.device import autocast

        feats, input_size, original_size = self.embedding(version, key, image_fn, shard)
        model = self.model(version)
        self.stats["decoder_calls"] += 1
        onnx = self._onnx_decoder(version, model)
        if onnx is not None:
            out = onnx.predict(feats, original_size, points, labels, box, mask_input, multimask,
                               lowres_only)
            return [{"mask": None if lg is None else lg > onnx.threshold, "score": sc,
                     "stability": 0.0 if lg is None else _stability(lg, onnx.threshold),
                     "low_res": low.astype(np.float32)} for lg, sc, low in out]
        p = make_predictor(model)
        set_features(p, feats, original_size, input_size)
        with torch.inference_mode(), autocast(p.device):
            logits, scores, low_res = p.predict(point_coords=points, point_labels=labels, box=box,
                                                mask_input=mask_input,
                                                multimask_output=multimask, return_logits=True)
        thr = model.mask_threshold
        stab = calculate_stability_score(torch.from_numpy(logits), thr, 1.0).numpy()
        return [{"mask": logits[i] > thr, "score": float(scores[i]),
                 "stability": float(stab[i]), "low_res": low_res[i:i + 1].astype(np.float32)}
                for i in range(len(scores))]


class EmbeddingWorker:
    """Computes one image shard's embeddings into the corpus cache; holds the model (loaded once:
    a Ray actor wraps it, like the annotation stage's ``ShardAnnotator``)."""

    def __init__(self, root: str, version: str, torch_threads: int = 0) -> None:
        from dataengine.pipeline.sam.embeddings import EmbeddingCache

        if torch_threads > 0:
            import torch

            torch.set_num_threads(torch_threads)
        self.corpus = Corpus(root)
        self.version = version
        self.cache = EmbeddingCache(self.corpus, version)

    def __call__(self, item: tuple[str, list[str]]) -> dict[str, Any]:
        from dataengine.pipeline.core.checkpoints import load_sam
        from dataengine.pipeline.core.imagecodec import sample_image
        from dataengine.pipeline.core.shards import iter_tar

        shard, keys = item
        try:
            if self.cache.has_shard(shard):  # published once (append-only); keys missing there
                return {"shard": shard, "computed": 0, "cached": True}  # are encoded on demand
            if self.cache.model is None:
                self.cache.model = load_sam(self.corpus.model_dir("sam", self.version))
            wanted = set(keys)
            images = [(s["__key__"], sample_image(s))
                      for s in iter_tar(self.corpus.image_shard(shard)) if s["__key__"] in wanted]
            n = self.cache.ensure_shard(shard, images)
            self.cache.drop_shard(keys)
            return {"shard": shard, "computed": n}
        except Exception as exc:  # noqa: BLE001 - failures are data; the server encodes instead
            return {"shard": shard, "error": f"{type(exc).__name__}: {exc}"}


PRECOMPUTE_MODES = ("ray", "local", "off")


def precompute(corpus: Corpus, version: str, shard_keys: dict[str, list[str]],
               mode: str = "ray", num_cpus: float = 1.0, num_gpus: float = 0.0,
               num_actors: int = 2) -> list[dict[str, Any]]:
    """Fill ``ROOT/embeddings/<version>/`` for the queued images of a people round, one image
    shard per work unit: on a Ray actor pool of :class:`EmbeddingWorker` (``ray``), in this
    process (``local``) or not at all (``off``: the server encodes on demand)."""
    if mode not in PRECOMPUTE_MODES:
        raise ValueError(f"precompute mode {mode!r}: allowed {PRECOMPUTE_MODES}")
    items = sorted(shard_keys.items())
    if mode == "off" or not items:
        return []
    if mode == "local":
        worker = EmbeddingWorker(corpus.root, version)
        return [worker(i) for i in items]
    from dataengine.pipeline.core.distribute import map_actors

    results = map_actors(EmbeddingWorker, (corpus.root, version), items, num_actors=num_actors,
                         num_cpus=num_cpus, num_gpus=num_gpus, retries=1,
                         failed=lambda r: "error" in r,
                         failure=lambda item, msg: {"shard": item[0], "error": msg})
    for r in results:
        if "error" in r:
            logger.warning("embedding precompute failed for %s: %s", r["shard"], r["error"])
    return sorted(results, key=lambda r: r["shard"])
