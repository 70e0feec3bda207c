"""Round-trip loss of every export format on real masks: export, import, IoU per mask.

One command: ``python benchmarks/bench_formats.py [--split val2017] [--limit 60]``.

Set-up: coco-mini's images (``../shared/data``) sharded by the real shard stage, their COCO masks
(polygons, several-part objects, crowd RLE regions) as round 0. Each format of ``dataengine export
--format X`` is written and read back by ``dataengine import --format X``; each imported mask is
compared with its original (same image, same order). Masks are grouped by shape: ``simple`` (one
part, no hole), ``parts`` (several parts), ``holes``. For the polygon formats the rings are also
rasterised as Ultralytics' data loader does (``cv2.fillPoly``), the view of a YOLO trainer.

Prints one table (format, masks, min / p1 / p5 / median IoU, share >= 0.99, per-group minimum).
Last line: ``RESULT <format>_min_iou=... <format>_p1_iou=... ... yolo_fillpoly_p5_iou=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("DATAENGINE_SHARED_DATA", REPO.parent / "shared" / "data"))

CASES = [("labelstudio (brush)", "labelstudio", {}),
         ("labelstudio (polygons)", "labelstudio", {"labelstudio_kind": "polygon"}),
         ("cvat (XML, RLE)", "cvat", {}), ("cvat-coco", "cvat-coco", {}),
         ("fiftyone", "fiftyone", {}), ("yolo", "yolo", {})]


def _subset(split: str, limit: int, out: Path) -> str:
    src = json.loads((SHARED / f"coco-mini/annotations/instances_{split}.json").read_text())
    ids = sorted({a["image_id"] for a in src["annotations"]})[:limit]
    imgs = [i for i in src["images"] if i["id"] in set(ids)]
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / split).mkdir(parents=True, exist_ok=True)
    for i in imgs:
        shutil.copy(SHARED / f"coco-mini/{split}" / i["file_name"], out / split / i["file_name"])
    sub = {**src, "images": imgs,
           "annotations": [a for a in src["annotations"] if a["image_id"] in set(ids)]}
    path = out / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(sub))
    return str(path)


def shape_group(mask: np.ndarray) -> str:
    """simple | parts | holes."""
    import cv2

    m = mask.astype(np.uint8)
    n_parts = cv2.connectedComponents(m, connectivity=8)[0] - 1
    n_bg = cv2.connectedComponents(np.pad(1 - m, 1, constant_values=1), connectivity=4)[0] - 1
    if n_bg > 1:
        return "holes"
    return "parts" if n_parts > 1 else "simple"


def _round(root: str, number: int) -> dict[str, list[dict]]:
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.core.rounds import iter_round_shard, round_shards

    corpus = Corpus(root)
    return {r["image"]["image_id"]: r["annotations"] for s in round_shards(corpus, number)
            for r in iter_round_shard(corpus, number, s)}


def _stats(ious: list[float]) -> dict[str, float]:
    a = np.asarray(ious)
    return {"min": float(a.min()), "p1": float(np.percentile(a, 1)),
            "p5": float(np.percentile(a, 5)), "median": float(np.median(a)),
            "ge99": float((a >= 0.99).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--split", default="val2017")
    ap.add_argument("--limit", type=int, default=60, help="images")
    a = ap.parse_args()

    from dataengine.pipeline.annotate.interchange import export_format, import_format
    from dataengine.pipeline.core import masks as mask_utils
    from dataengine.pipeline.formats.polygons import mask_to_ring, ring_to_mask_fillpoly
    from dataengine.pipeline.ingest.shard import ShardConfig, shard

    tmp = Path(tempfile.mkdtemp(prefix="bench-formats-"))
    try:
        root = str(tmp / "root")
        shard([_subset(a.split, a.limit, tmp / "src")], root, ShardConfig(use_ray=False))
        before = _round(root, 0)
        originals = {k: [mask_utils.decode(x["segmentation"]) for x in v]
                     for k, v in before.items()}
        groups = {k: [shape_group(m) for m in v] for k, v in originals.items()}
        rows, result = [], {}
        for label, fmt, kw in CASES:
            out = str(tmp / "out" / label.replace(" ", "_"))
            export_format(root, out, fmt, rounds=[0], **kw)
            back = _round(root, import_format(root, out, fmt)["round"])
            ious, by_group = [], {}
            for key, anns in before.items():  # each original against its best import
                got = [g["segmentation"] for g in back.get(key, [])]
                m = mask_utils.iou_matrix([x["segmentation"] for x in anns], got)
                for i in range(len(anns)):
                    v = float(m[i].max()) if got else 0.0
                    ious.append(v)
                    by_group.setdefault(groups[key][i], []).append(v)
            rows.append((label, _stats(ious), {g: min(v) for g, v in by_group.items()},
                         len(ious)))
        # what a cv2.fillPoly reader (Ultralytics) makes of the same rings
        ious, by_group = [], {}
        for key, ms in originals.items():
            for m, g in zip(ms, groups[key]):
                if not m.any():
                    continue
                f = ring_to_mask_fillpoly(mask_to_ring(m), *m.shape)
                v = float((f & m).sum() / max((f | m).sum(), 1))
                ious.append(v)
                by_group.setdefault(g, []).append(v)
        rows.append(("yolo read by cv2.fillPoly", _stats(ious),
                     {g: min(v) for g, v in by_group.items()}, len(ious)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    counts = {g: sum(x == g for v in groups.values() for x in v) for g in
              ("simple", "parts", "holes")}
    print(f"coco-mini {a.split}: {len(before)} images, masks by shape {counts}")
    print(f"{'format':28s} {'masks':>5s} {'min':>7s} {'p1':>7s} {'p5':>7s} {'median':>7s} "
          f"{'>=.99':>6s}  min by shape")
    for label, s, g, n in rows:
        print(f"{label:28s} {n:5d} {s['min']:7.4f} {s['p1']:7.4f} {s['p5']:7.4f} "
              f"{s['median']:7.4f} {s['ge99']:6.1%}  " +
              " ".join(f"{k}={v:.4f}" for k, v in sorted(g.items())))
        key = label.split(" (")[0].replace(" ", "_").replace("-", "_")
        key += "_polygons" if "polygons" in label else ""
        key = "yolo_fillpoly" if "fillPoly" in label else key
        result[f"{key}_min_iou"] = s["min"]
        result[f"{key}_p5_iou"] = s["p5"]
    print("RESULT " + " ".join(f"{k}={v:.4f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
