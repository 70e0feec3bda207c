"""A tiny synthetic corpus for the latent diffusion tests: image shards with done records,
splits, captions in each image's ``.json`` and round-0 masks with categories.

Written with the foundation contracts (``dataengine.pipeline.core.shards``,
``dataengine.pipeline.core.layout``, ``dataengine.pipeline.core.rounds``,
``dataengine.pipeline.core.splits``) so the tests do not depend on the sharding stage.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
from PIL import Image, ImageDraw

from dataengine.pipeline.core import splits, storage
from dataengine.pipeline.core.layout import Corpus, shard_name
from dataengine.pipeline.core.masks import area, bbox, encode
from dataengine.pipeline.core.rounds import RoundWriter
from dataengine.pipeline.core.shards import write_tar

SHAPES = {1: ("red", "square", (220, 40, 40)), 2: ("blue", "circle", (40, 60, 220))}


def synthetic_image(seed: int, w: int = 80, h: int = 64) -> tuple[bytes, np.ndarray, int, str]:
    """(PNG bytes, HxW bool mask, category id, caption) of one generated picture."""
    rng = np.random.default_rng(seed)
    cat = 1 + seed % 2
    colour, shape, rgb = SHAPES[cat]
    bg = tuple(int(v) for v in rng.integers(60, 200, 3))
    im = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(im)
    s = int(rng.integers(18, 34))
    x, y = int(rng.integers(8, w - s - 8)), int(rng.integers(4, h - s - 4))
    m = Image.new("L", (w, h), 0)
    dm = ImageDraw.Draw(m)
    if shape == "square":
        d.rectangle([x, y, x + s, y + s], fill=rgb)
        dm.rectangle([x, y, x + s, y + s], fill=255)
    else:
        d.ellipse([x, y, x + s, y + s], fill=rgb)
        dm.ellipse([x, y, x + s, y + s], fill=255)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue(), np.asarray(m) > 0, cat, f"a {colour} {shape} on a plain background"


def make_corpus(root: str, shards: int = 3, per_shard: int = 6, holdout_every: int = 4,
                corrupt: tuple[int, int] | None = None, seed0: int = 0) -> dict[str, list[str]]:
    """Write ``shards`` image shards of ``per_shard`` images; every ``holdout_every``-th image is
    held out. ``corrupt=(shard, index)`` replaces that image's bytes with garbage. Returns
    ``shard name -> keys`` in order."""
    corpus = Corpus(root)
    out: dict[str, list[str]] = {}
    split_rows = []
    writer = RoundWriter(corpus, 0, "imported")
    writer.begin()
    n = 0
    for si in range(shards):
        name = shard_name(si)
        samples, records, keys = [], [], []
        for j in range(per_shard):
            data, mask, cat, caption = synthetic_image(seed0 + n)
            if corrupt == (si, j):
                data = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10
            sha = hashlib.sha256(data).hexdigest()
            key = sha[:16]
            split = "holdout" if n % holdout_every == holdout_every - 1 else "train"
            n += 1
            keys.append(key)
            split_rows.append((key, split, "synthetic", "test"))
            meta = {"key": key, "sha256": sha, "width": 80, "height": 64, "split": split,
                    "source": "synthetic", "captions": [caption]}
            samples.append({"__key__": key, "png": data, "json": json.dumps(meta).encode()})
            rle = encode(mask)
            records.append({"image": {"image_id": key, "width": 80, "height": 64},
                            "annotations": [{"id": 1, "segmentation": rle, "bbox": bbox(rle),
                                             "area": area(rle), "stage": "imported", "round": 0,
                                             "category_id": cat,
                                             "category": SHAPES[cat][1]}]})
        write_tar(corpus.image_shard(name), samples)
        writer.write_shard(name, records)
        storage.write_json(corpus.image_done(name), {"shard": name, "ok": len(keys),
                                                     "keys": keys})
        out[name] = keys
    splits.record(corpus, "synthetic", split_rows, {})
    writer.finish({"images": n})
    return out


def publish_random_vae(root: str, name: str = "test-f4", resolution: int = 32) -> str:
    """Publish a random-weight registry VAE as the corpus' next VAE version (no training);
    returns the version."""
    import tempfile

    import torch

    from dataengine.models.ldm import build_vae
    from dataengine.pipeline.ldm.train_vae import TrainVaeConfig, train_vae

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        build_vae(name).save_pretrained(tmp)
        info = train_vae(root, TrainVaeConfig(vae=name, pretrained=tmp, resolution=resolution,
                                              scale_samples=16, psnr_images=4, batch_size=8))
    return info["version"]


def corpus_with_latents(root: str, **corpus_kw) -> dict:
    """A synthetic corpus, a published random VAE and its latents (in-process, no Ray)."""
    from dataengine.pipeline.ldm.latents import LatentsConfig, compute_latents

    keys = make_corpus(root, **corpus_kw)
    version = publish_random_vae(root)
    summary = compute_latents(root, LatentsConfig(resolution=32, batch_size=8, use_ray=False))
    return {"keys": keys, "vae": version, "latents": summary}
