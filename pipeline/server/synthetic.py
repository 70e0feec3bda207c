"""Small corpora in the documented layout for dashboard tests, benchmarks and demos.

:func:`build_corpus` writes image shards (+ done records, ``images/index/`` entries) from given
image files or generated pictures, and annotation rounds through
:class:`dataengine.pipeline.core.rounds.RoundWriter`: masks from YOLO-seg polygons (round 0,
``imported``) and/or ``masks_per_image`` synthetic ellipses (an ``auto`` round with random scores).
It is not the shard stage: it writes only what the dashboard reads, in the same format.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dataengine.pipeline.core import masks as masklib
from dataengine.pipeline.core import storage
from dataengine.pipeline.core.index import write_index
from dataengine.pipeline.core.layout import Corpus, shard_name
from dataengine.pipeline.core.rounds import RoundWriter
from dataengine.pipeline.core.shards import write_tar


def generated_jpeg(i: int, width: int = 640, height: int = 480) -> bytes:
    """A distinct picture (gradients + blocks) as JPEG bytes."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([(x * 255 // width + i * 7) % 256, (y * 255 // height + i * 13) % 256,
                    np.full_like(x, (i * 31) % 256)], -1).astype(np.uint8)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        img[y0:y0 + rng.integers(20, 120), x0:x0 + rng.integers(20, 160)] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def ellipse_masks(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """``n`` random ellipse masks as one HxWxN uint8 Fortran-ordered array (pycocotools')."""
    out = np.zeros((height, width, n), np.uint8, order="F")
    for i in range(n):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        ax, ay = rng.uniform(4, width / 5), rng.uniform(4, height / 5)
        x0, x1 = int(max(0, cx - ax)), int(min(width, cx + ax + 1))
        y0, y1 = int(max(0, cy - ay)), int(min(height, cy + ay + 1))
        yy, xx = np.ogrid[y0:y1, x0:x1]
        out[y0:y1, x0:x1, i] = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1
        if not out[:, :, i].any():
            out[min(int(cy), height - 1), min(int(cx), width - 1), i] = 1
    return out


def _encode_all(ms: np.ndarray) -> list[dict]:
    from pycocotools import mask as mask_utils

    rles = mask_utils.encode(ms)
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode()}
            for r in rles]


def _yolo_masks(label: Path, height: int, width: int) -> list[tuple[int, dict]]:
    out = []
    if not label.exists():
        return out
    for line in label.read_text().splitlines():
        parts = line.split()
        if len(parts) < 7:
            continue
        cls = int(parts[0])
        pts = [float(v) for v in parts[1:]]
        poly = [v * (width if j % 2 == 0 else height) for j, v in enumerate(pts)]
        try:
            out.append((cls, masklib.from_polygons([poly], height, width)))
        except ValueError:
            continue
    return out


def build_corpus(root: str, *, images: Sequence[Path] | None = None, n_generated: int = 0,
                 images_per_shard: int = 100, masks_per_image: int = 0, auto_round: int = 1,
                 yolo_labels: Path | None = None, holdout_every: int = 0,
                 seed: int = 0) -> Corpus:
    """Write a corpus at ``root``; returns it. See the module docstring."""
    corpus = Corpus(root)
    rng = np.random.default_rng(seed)
    payloads: list[tuple[bytes, str]] = [(Path(p).read_bytes(), str(p)) for p in images or []]
    payloads += [(generated_jpeg(i), f"generated://{i}") for i in range(n_generated)]
    index_rows = []
    imported: dict[str, list[dict]] = {}
    auto: dict[str, list[dict]] = {}
    for s in range(0, len(payloads), images_per_shard):
        shard = shard_name(s // images_per_shard)
        samples, keys = [], []
        for j, (data, source) in enumerate(payloads[s:s + images_per_shard]):
            digest = hashlib.sha256(data).hexdigest()
            key = digest[:16]
            w, h = Image.open(io.BytesIO(data)).size
            split = "holdout" if holdout_every and (s + j) % holdout_every == 0 else "train"
            meta = {"source": source, "width": w, "height": h, "sha256": digest}
            samples.append({"__key__": key, "jpg": data, "json": meta})
            keys.append(key)
            index_rows.append({"key": key, "shard": shard, "width": w, "height": h,
                               "bytes": len(data), "sha256": digest, "source": source,
                               "split": split})
            image = {"image_id": key, "width": w, "height": h, "file_name": f"{key}.jpg"}
            if yolo_labels is not None and not source.startswith("generated://"):
                anns = []
                for a, (cls, rle) in enumerate(_yolo_masks(
                        yolo_labels / (Path(source).stem + ".txt"), h, w), start=1):
                    anns.append(_ann(a, rle, 0, "imported", "", category_id=cls))
                imported.setdefault(shard, []).append({"image": image, "annotations": anns})
            if masks_per_image:
                anns = []
                for a, rle in enumerate(_encode_all(ellipse_masks(rng, masks_per_image, h, w)),
                                        start=1):
                    anns.append(_ann(a, rle, auto_round, "auto", "v0001",
                                     predicted_iou=float(rng.uniform(0.5, 1.0)),
                                     stability_score=float(rng.uniform(0.6, 1.0))))
                auto.setdefault(shard, []).append({"image": image, "annotations": anns})
        write_tar(corpus.image_shard(shard), samples)
        storage.write_json(corpus.image_done(shard), {"shard": shard, "keys": keys,
                                                      "ok": len(keys)})
    write_index(corpus, index_rows, sorted({r["shard"] for r in index_rows}))
    from dataengine.pipeline.core import splits

    splits.record(corpus, "synthetic", ((r["key"], r["split"], r["source"], "synthetic")
                                        for r in index_rows), splits.load_map(corpus))
    for number, stage, per_shard, version in ((0, "imported", imported, ""),
                                              (auto_round, "auto", auto, "v0001")):
        if not per_shard:
            continue
        writer = RoundWriter(corpus, number, stage, model_version=version)
        writer.begin()
        for shard, records in sorted(per_shard.items()):
            writer.write_shard(shard, records)
        n_img = sum(len(r) for r in per_shard.values())
        writer.finish({"images": n_img})
    return corpus


def _ann(ann_id: int, rle: dict, number: int, stage: str, version: str,
         category_id: int | None = None, predicted_iou: float = 1.0,
         stability_score: float = 1.0) -> dict:
    bbox = masklib.bbox(rle)
    return {"id": ann_id, "segmentation": rle, "bbox": bbox, "area": masklib.area(rle),
            "predicted_iou": predicted_iou, "stability_score": stability_score,
            "point_coords": [], "crop_box": [0, 0, rle["size"][1], rle["size"][0]],
            "stage": stage, "round": number, "model_version": version, "clicks": [],
            "annotator": "", "seconds": 0.0, "category_id": category_id}
