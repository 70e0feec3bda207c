"""``dataengine latents``: precompute VAE latents into shards aligned with the image shards.

A Ray actor pool (each actor loads the VAE once; ``actor_cpus`` fractional, ``num_gpus``
configurable) takes one image shard at a time: images are resized (shorter side) and
center-cropped to ``resolution``, encoded in batches, and written to
``ROOT/latents/<vae-version>-<resolution>-r<round>/shard-NNNNNN.tar`` (same basename and key
order as the image shard) with, per image:

- ``mean.npy`` / ``logvar.npy``: the posterior N(mean, exp(logvar)), fp16, ``Cxhxw``, unscaled
  (sampling and the scale factor are applied at training time); read with ``allow_pickle=False``;
- ``layout.npy``: uint8 ``hxw`` category map at latent size from the newest accepted masks
  (0 background, 1..254 category id, 255 object without category); absent without masks;
- ``json``: ``classes`` (category ids present), ``captions``, ``split``, ``mask_ids`` used, and
  provenance: ``sha256`` of the image, ``vae_version``, ``round`` of the masks, ``resolution``.

Masks come from the newest complete round that has masks for the image (round 0 imports count
when ``train_on_imported``); curation-rejected masks are left out and images curation leaves out
(rejected, leaking held-out near-copies, near-duplicates) are not
encoded. ``<round>`` in the folder name is the newest complete round the run considered.
A shard is done when ``done/shard-NNNNNN.json`` exists (created after the tar), so a re-run
encodes only missing shards; a corrupt image is recorded (done record + ``quarantine/``) and
skipped. The tar is created only if absent: of two runs encoding one shard the first tar wins,
and a tar left without its done record (a crash between) gets its done record from the tar.
``dataset.json`` summarises the folder after each run (re-derived until stable).

The module also holds the image readers the VAE and LDM trainers share (:func:`image_stream`,
:func:`image_batches`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dataengine.pipeline.core import publish, quarantine, rounds, storage
from dataengine.pipeline.core.imagecodec import image_bytes
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.shards import create_tar, iter_tar, npy_bytes
from dataengine.pipeline.ldm.images import crop_box, decode_square, to_tensor

logger = logging.getLogger(__name__)



@dataclass
class LatentsConfig:
    """Settings of ``dataengine latents``."""

    vae: str = ""                  # VAE version vNNNN (default: the newest)
    resolution: int = 64
    round: int = -1                # newest complete round to take masks from (-1: newest)
    train_on_imported: bool = True  # round-0 imported masks may give the layout / classes
    batch_size: int = 16
    actors: int = 2
    actor_cpus: float = 0.5
    num_gpus: float = 0.0
    use_ray: bool = True
    retries: int = 1

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution={self.resolution}: a multiple of 8, >= 8")
        if self.batch_size < 1 or self.actors < 1:
            raise ValueError(f"batch_size={self.batch_size}, actors={self.actors}: must be >= 1")
        if self.actor_cpus <= 0 or self.num_gpus < 0:
            raise ValueError(f"actor_cpus={self.actor_cpus} must be > 0, num_gpus="
                             f"{self.num_gpus} >= 0")
        if self.vae:
            from dataengine.pipeline.core.layout import parse_version
            parse_version(self.vae)


# ----------------------------------------------------------------------------- masks in
def layout_map(masks: list[dict[str, Any]], width: int, height: int, size: int) -> np.ndarray:
    """Rasterise ``masks`` (manifest rows: ``rle``, ``height``, ``width``, ``category_id``,
    ``area``) into a uint8 category map, cropped like the image and downsampled (nearest) to
    ``size`` x ``size``. Larger masks are drawn first so small objects stay visible."""
    from PIL import Image

    from dataengine.pipeline.core.masks import decode

    label = np.zeros((height, width), np.uint8)
    for m in sorted(masks, key=lambda r: -int(r["area"])):
        mask = decode({"size": [int(m["height"]), int(m["width"])], "counts": m["rle"]})
        if mask.shape != label.shape:
            raise ValueError(f"mask {m['mask_id']} is {mask.shape}, image is {label.shape}")
        cat = int(m["category_id"])
        label[mask.astype(bool)] = cat if 1 <= cat <= 254 else 255
    im = Image.fromarray(label).crop(crop_box(width, height)).resize((size, size), Image.NEAREST)
    return np.asarray(im, dtype=np.uint8)


def mask_sources(corpus: Corpus, cfg: LatentsConfig) -> tuple[int, dict[str, list[dict]]]:
    """(round number for the folder name, ``shard -> mask rows`` of the newest accepted masks
    per image, curation rejections removed)."""
    from dataengine.pipeline.core.curation import excluded_image_keys, rejected_mask_ids

    done = rounds.complete_rounds(corpus, include_imported=cfg.train_on_imported)
    if cfg.round >= 0:
        done = [n for n in done if n <= cfg.round]
    number = max(done, default=0) if cfg.round < 0 else cfg.round
    table = rounds.load_manifest(corpus, done)
    if table.num_rows == 0:
        return number, {}
    bad_masks, bad_images = rejected_mask_ids(corpus), excluded_image_keys(corpus)
    cols = ["mask_id", "key", "shard", "round", "category_id", "area", "height", "width", "rle"]
    rows = table.select(cols).to_pylist()
    newest: dict[str, int] = {}
    for r in rows:
        if r["mask_id"] not in bad_masks and r["key"] not in bad_images:
            newest[r["key"]] = max(newest.get(r["key"], -1), r["round"])
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["mask_id"] in bad_masks or newest.get(r["key"]) != r["round"]:
            continue
        out.setdefault(r["shard"], []).append(r)
    return number, out


# ----------------------------------------------------------------------------- one shard


def _provenance(task: dict[str, Any], key: str, meta: dict[str, Any], masks: list[dict],
                scale: float | None) -> dict[str, Any]:
    """A latent's JSON: its image, VAE version, round, and the conditioning taken from masks."""
    caps = meta.get("captions") or ([meta["caption"]] if meta.get("caption") else [])
    return {"key": key, "sha256": meta.get("sha256", ""), "split": meta.get("split", "train"),
            "vae_version": task["vae_version"], "round": int(task["round"]),
            "resolution": int(task["resolution"]), "scale_factor": scale,
            "image_shard": task["shard"],
            "classes": sorted({int(m["category_id"]) for m in masks
                               if int(m["category_id"]) >= 0}),
            "captions": [c for c in caps if isinstance(c, str)],
            "mask_ids": [m["mask_id"] for m in masks],
            "mask_rounds": sorted({int(m["round"]) for m in masks})}


def encode_shard(task: dict[str, Any], vae, scale: float | None = None) -> dict[str, Any]:
    """Encode image shard ``task["shard"]`` and publish its latent tar, then its done record.

    ``task``: root, shard, out (latents folder URL), resolution, batch_size, vae_version,
    round, masks (manifest rows of this shard), rejected (image keys). Returns stats."""
    t0 = time.time()
    corpus = Corpus(task["root"])
    name, out, res = task["shard"], task["out"], int(task["resolution"])
    done_url = storage.join(out, "done", f"{name}.json")
    if storage.exists(done_url):
        return {"shard": name, "status": "skipped"}
    if storage.exists(storage.join(out, f"{name}.tar")):
        return _done_from_tar(out, name, done_url, t0)
    by_key: dict[str, list[dict]] = {}
    for m in task.get("masks") or []:
        by_key.setdefault(m["key"], []).append(m)
    rejected = set(task.get("rejected") or [])
    device = next(vae.parameters()).device
    samples: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    pending: list[tuple[dict[str, Any], np.ndarray]] = []
    skipped = 0

    def flush() -> None:
        if not pending:
            return
        with torch.inference_mode():
            dist = vae.encode(to_tensor([p[1] for p in pending]).to(device)).latent_dist
            mean, logvar = dist.mean.float().cpu().numpy(), dist.logvar.float().cpu().numpy()
        for i, (s, _) in enumerate(pending):
            s["mean.npy"] = npy_bytes(mean[i].astype(np.float16))
            s["logvar.npy"] = npy_bytes(logvar[i].astype(np.float16))
            samples.append(s)
        pending.clear()

    lat = None
    for s in iter_tar(corpus.image_shard(name)):
        key = s["__key__"]
        if key in rejected:
            skipped += 1
            continue
        try:
            meta = json.loads(s.get("json", b"{}"))
            img, (w, h) = decode_square(image_bytes(s), res)
            masks = by_key.get(key, [])
            lat = lat or res // _factor(vae)
            layout = layout_map(masks, w, h, lat) if masks else None
        except Exception as exc:  # noqa: BLE001 - a corrupt sample is data
            failures.append({"key": key, "reason": f"{type(exc).__name__}: {exc}"})
            continue
        info = _provenance(task, key, meta, masks, scale)
        sample: dict[str, Any] = {"__key__": key, "json": json.dumps(info).encode()}
        if layout is not None:
            sample["layout.npy"] = npy_bytes(layout)
        pending.append((sample, img))
        if len(pending) >= int(task["batch_size"]):
            flush()
    flush()
    if failures:
        quarantine.write(corpus, f"latents-{out.rstrip('/').rsplit('/', 1)[-1]}-{name}",
                         [quarantine.record(corpus.image_shard(name), f"{name}/{f['key']}",
                                            f["reason"], "latents", f["key"], name)
                          for f in failures])
    created, n = create_tar(storage.join(out, f"{name}.tar"), samples)
    if not created:  # another run published this shard first
        return _done_from_tar(out, name, done_url, t0)
    publish.fault("latents-tar")
    stats = {"shard": name, "status": "written", "samples": n, "failures": failures,
             "rejected_skipped": skipped, "with_layout": sum("layout.npy" in s for s in samples),
             "seconds": round(time.time() - t0, 3),
             "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not storage.create_json(done_url, stats):  # another attempt finished first
        stats["status"] = "skipped"
    return stats


def _done_from_tar(out: str, name: str, done_url: str, t0: float) -> dict[str, Any]:
    """The done record of a latent shard whose tar is published, derived from the tar."""
    samples = list(iter_tar(storage.join(out, f"{name}.tar")))
    stats = {"shard": name, "status": "written", "samples": len(samples), "failures": [],
             "rejected_skipped": 0, "with_layout": sum("layout.npy" in s for s in samples),
             "seconds": round(time.time() - t0, 3), "derived_from_tar": True,
             "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not storage.create_json(done_url, stats):
        stats["status"] = "skipped"
    return stats



def _factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


class LatentEncoder:
    """Ray actor: loads the VAE version once, then encodes one image shard per call."""

    def __init__(self, root: str, vae_version: str) -> None:
        from dataengine.models.device import pick_device
        from dataengine.pipeline.ldm.train_vae import load_vae_version

        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.vae, info = load_vae_version(root, vae_version)
        self.vae.to(pick_device())
        self.scale = float(info.get("scale_factor") or self.vae.config.scaling_factor)

    def __call__(self, task: dict[str, Any]) -> dict[str, Any]:
        try:
            return encode_shard(task, self.vae, self.scale)
        except Exception as exc:  # noqa: BLE001 - failures are data
            logger.exception("latents for %s failed", task["shard"])
            return {"shard": task["shard"], "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}"}


# ----------------------------------------------------------------------------- driver
def compute_latents(root: str, config: LatentsConfig | None = None,
                    progress: Any = None) -> dict[str, Any]:
    """Precompute latent shards for every image shard of ``root``; returns the summary
    (``dataset`` folder name, shards written / skipped / failed, samples, failures)."""
    from dataengine.pipeline.core.curation import excluded_image_keys

    cfg = config or LatentsConfig()
    corpus = Corpus(root)
    root = corpus.root
    names = corpus.image_shards()
    if not names:
        raise FileNotFoundError(f"{corpus.root}: no image shards; run `dataengine shard` first")
    versions = corpus.model_versions("vae")
    vae_version = cfg.vae or (versions[-1] if versions else "")
    if vae_version not in versions:
        raise FileNotFoundError(f"{corpus.root}: VAE version {vae_version or '(none)'!r} is not "
                                f"published (have {versions}); run `dataengine train-vae`")
    number, masks = mask_sources(corpus, cfg)
    out = corpus.latents_dir(vae_version, cfg.resolution, number)
    rejected = sorted(excluded_image_keys(corpus))
    tasks = [{"root": root, "shard": n, "out": out, "resolution": cfg.resolution,
              "batch_size": cfg.batch_size, "vae_version": vae_version, "round": number,
              "masks": masks.get(n, []), "rejected": rejected}
             for n in names if not storage.exists(storage.join(out, "done", f"{n}.json"))]
    t0 = time.time()
    results: list[dict[str, Any]] = []
    if tasks and cfg.use_ray and not root.startswith("memory://"):
        results = _run_pool(tasks, root, vae_version, cfg, progress)
    else:
        enc = LatentEncoder(root, vae_version) if tasks else None
        for t in tasks:
            results.append(enc(t))  # type: ignore[misc]
            if progress:
                progress(results[-1])
    written = [r for r in results if r.get("status") == "written"]
    failed = [r for r in results if r.get("status") == "failed"]
    summary = {
        "dataset": out.rstrip("/").rsplit("/", 1)[-1], "url": out, "vae_version": vae_version,
        "round": number, "resolution": cfg.resolution, "image_shards": len(names),
        "shards_written": len(written), "shards_skipped": len(names) - len(tasks)
        + sum(r.get("status") == "skipped" for r in results), "failed_shards": failed,
        "samples_written": sum(r["samples"] for r in written),
        "failures": [f for r in written for f in r["failures"]],
        "seconds": round(time.time() - t0, 2)}
    summary["images_per_s"] = summary["samples_written"] / max(summary["seconds"], 1e-9)
    publish_dataset(out, {"vae_version": vae_version, "round": number,
                          "resolution": cfg.resolution}, len(names))
    logger.info("latents %s: %d shards written, %d skipped, %d failed, %.1f img/s",
                summary["dataset"], len(written), summary["shards_skipped"], len(failed),
                summary["images_per_s"])
    return summary


def publish_dataset(out: str, info: dict[str, Any], image_shards: int) -> None:
    """Re-derive ``dataset.json`` (info, finished shards, samples) from the done records until
    no new done record appears."""
    def listing() -> tuple[str, ...]:
        return tuple(storage.listdir(storage.join(out, "done"), r"shard-\d+\.json"))

    def write(urls: tuple[str, ...]) -> None:
        done = [storage.read_json(u) for u in urls]
        storage.write_json(storage.join(out, "dataset.json"), {
            **info, "shards": sorted(d["shard"] for d in done),
            "samples": sum(d["samples"] for d in done), "complete": len(done) == image_shards})

    publish.publish_derived(listing, write)


def _run_pool(tasks: list[dict[str, Any]], root: str, vae_version: str, cfg: LatentsConfig,
              progress: Any) -> list[dict[str, Any]]:
    from dataengine.pipeline.core.distribute import map_actors

    return map_actors(LatentEncoder, (root, vae_version), tasks, num_actors=cfg.actors,
                      num_cpus=cfg.actor_cpus, num_gpus=cfg.num_gpus, retries=cfg.retries,
                      failed=lambda r: r.get("status") == "failed",
                      failure=lambda t, msg: {"shard": t["shard"], "status": "failed",
                                              "error": msg},
                      progress=progress)
