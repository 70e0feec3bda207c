"""A small synthetic corpus for the SAM training, evaluation and engine tests.

Image shards (PNG images of coloured shapes on noise), their done records and index, the
train/held-out splits and round 0 (the shapes as imported ground truth) written directly through
the foundation modules, plus :func:`add_round` for annotation rounds made of the same masks.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
from PIL import Image

from dataengine.pipeline.core import splits, storage
from dataengine.pipeline.core.layout import Corpus, shard_name
from dataengine.pipeline.core.masks import area, bbox, encode
from dataengine.pipeline.core.rounds import RoundWriter
from dataengine.pipeline.core.shards import write_tar


def _image(rng: np.random.Generator, h: int, w: int, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    img = rng.normal(110, 25, (h, w, 3))
    yy, xx = np.mgrid[0:h, 0:w]
    masks: list[np.ndarray] = []
    for i in range(n):
        cx, cy = rng.integers(w // 6, w - w // 6), rng.integers(h // 6, h - h // 6)
        rx, ry = rng.integers(w // 10, w // 4), rng.integers(h // 10, h // 4)
        shape = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1) if i % 2 else \
            ((abs(xx - cx) <= rx) & (abs(yy - cy) <= ry))
        masks = [m & ~shape for m in masks]
        masks.append(shape)
        img[shape] = rng.integers(0, 255, 3) + rng.normal(0, 8, (int(shape.sum()), 3))
    masks = [m for m in masks if m.sum() > 40]
    return np.clip(img, 0, 255).astype(np.uint8), masks


def build_corpus(root: str, *, shards: int = 4, per_shard: int = 4, holdout_every: int = 4,
                 h: int = 96, w: int = 128, objects: int = 3, seed: int = 0) -> dict:
    """Write the corpus; returns ``{"train": [...keys], "holdout": [...keys], "masks": {key:
    [HxW bool]}}``. Every ``holdout_every``-th image is held out."""
    corpus = Corpus(root)
    rng = np.random.default_rng(seed)
    out: dict = {"train": [], "holdout": [], "masks": {}, "shards": []}
    writer0 = RoundWriter(corpus, 0, "imported", config={"source": "synthetic"})
    writer0.begin()
    split_rows = []
    n = 0
    for s in range(shards):
        name = shard_name(s)
        samples, records, keys = [], [], []
        for _ in range(per_shard):
            img, masks = _image(rng, h, w, objects)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            data = buf.getvalue()
            key = hashlib.sha256(data).hexdigest()[:16]
            split = "holdout" if n % holdout_every == holdout_every - 1 else "train"
            n += 1
            out[split].append(key)
            out["masks"][key] = masks
            keys.append(key)
            split_rows.append((key, split, "synthetic", "test"))
            samples.append({"__key__": key, "png": data,
                            "json": json.dumps({"key": key, "width": w, "height": h}).encode()})
            anns = []
            for i, m in enumerate(masks):
                rle = encode(m)
                anns.append({"id": i + 1, "segmentation": rle, "bbox": bbox(rle),
                             "area": area(rle), "predicted_iou": 1.0, "stability_score": 1.0,
                             "point_coords": [], "crop_box": [0, 0, w, h], "stage": "imported",
                             "round": 0, "model_version": "", "clicks": [], "annotator": "gt",
                             "seconds": 0.0, "category_id": 1, "category": "shape"})
            records.append({"image": {"image_id": key, "width": w, "height": h},
                            "annotations": anns})
        write_tar(corpus.image_shard(name), samples)
        storage.write_json(corpus.image_done(name), {"shard": name, "keys": keys,
                                                     "ok": len(keys)})
        writer0.write_shard(name, records)
        out["shards"].append(name)
    splits.record(corpus, "test", split_rows, {})
    writer0.finish({"images": n})
    return out


def add_round(root: str, number: int, info: dict, keys: list[str], *, stage: str = "manual",
              model_version: str = "v0001") -> None:
    """A complete annotation round whose masks are the ground truth of ``keys``."""
    corpus = Corpus(root)
    w = RoundWriter(corpus, number, stage, model_version=model_version)
    w.begin()
    wanted = set(keys)
    from dataengine.pipeline.core.rounds import iter_round_shard

    for shard in info["shards"]:
        recs = []
        for rec in iter_round_shard(corpus, 0, shard):
            key = rec["image"]["image_id"]
            if key not in wanted:
                continue
            anns = [{**a, "stage": stage, "round": number, "model_version": model_version,
                     "clicks": [{"x": 1, "y": 1, "label": 1}], "annotator": "simulated",
                     "seconds": 2.0} for a in rec["annotations"]]
            recs.append({"image": rec["image"], "annotations": anns})
        if recs:
            w.write_shard(shard, recs)
    w.finish({"images": len(keys)})
