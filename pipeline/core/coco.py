"""COCO JSON in: instances (polygons / RLE masks with categories), captions and licences.

:func:`load_coco` parses an ``instances_*.json`` (and its ``captions_*.json`` sibling when present)
into per-file image info and per-file annotations; malformed annotations are reported, not raised.
:func:`annotation_mask` rasterises one parsed annotation in the original file's pixel frame; the
sharding stage then moves it into the stored image's frame
(:func:`dataengine.pipeline.ingest.images.apply_to_mask`).

A parsed annotation is a plain JSON-safe dict::

    {"id": int, "category_id": int, "category": str, "iscrowd": 0|1,
     "polygons": [[x1, y1, x2, y2, ...], ...] | None,   # absolute pixels, or
     "rle": {"size": [h, w], "counts": str | list} | None,
     "normalized": bool}                                 # polygons in [0, 1] (YOLO)
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import numpy as np

from dataengine.pipeline.core import masks, storage

logger = logging.getLogger(__name__)

# The usual 80 COCO class names in YOLO order, and their ids in COCO's 91-id space.
COCO80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
COCO80_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)

Problem = tuple[str, str]  # (source, reason)


def _check_segmentation(seg: Any) -> tuple[list[list[float]] | None, dict | None]:
    if isinstance(seg, list):
        polys = []
        for p in seg:
            if not isinstance(p, list) or len(p) < 6 or len(p) % 2:
                raise ValueError("polygon must be a list of at least 3 x,y pairs")
            polys.append([float(v) for v in p])
        if not polys:
            raise ValueError("segmentation has no polygon")
        return polys, None
    if isinstance(seg, dict) and "size" in seg and "counts" in seg:
        size = seg["size"]
        if not (isinstance(size, list) and len(size) == 2):
            raise ValueError("RLE size must be [height, width]")
        return None, {"size": [int(size[0]), int(size[1])], "counts": seg["counts"]}
    raise ValueError("segmentation is neither polygons nor RLE")


def captions_path(instances_json: str) -> str | None:
    """The ``captions_*.json`` next to an ``instances_*.json``, when it exists."""
    base = instances_json.rsplit("/", 1)
    m = re.fullmatch(r"instances_(.+)\.json", base[-1])
    if not m or len(base) < 2:
        return None
    url = storage.join(base[0], f"captions_{m.group(1)}.json")
    return url if storage.exists(url) else None


def load_coco(instances_json: str, captions_json: str | None = None,
              problems: list[Problem] | None = None
              ) -> tuple[dict[str, dict], dict[str, list[dict]], dict[int, str]]:
    """Parse a COCO instances file: ``(images, annotations_by_file, categories)``.

    ``images`` maps ``file_name`` -> image info (``id``, ``width``, ``height``, ``license`` with
    ``license_name``/``license_url``, ``coco_url``, ``flickr_url``, ``captions``);
    ``annotations_by_file`` maps ``file_name`` -> parsed annotations (module docstring);
    ``categories`` maps category id -> name. Captions come from ``captions_json`` or the
    ``captions_*.json`` sibling. Malformed annotations are appended to ``problems`` as
    ``(source, reason)`` and skipped. Raises ValueError when the file is not COCO JSON.
    """
    try:
        data = storage.read_json(instances_json)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{instances_json}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{instances_json}: not COCO JSON (no 'images' list)")
    problems = problems if problems is not None else []
    licences = {lic.get("id"): lic for lic in data.get("licenses") or [] if isinstance(lic, dict)}
    categories = {int(c["id"]): str(c.get("name", c["id"])) for c in data.get("categories") or []
                  if isinstance(c, dict) and "id" in c}
    images: dict[str, dict] = {}
    by_id: dict[Any, str] = {}
    for img in data["images"]:
        if not isinstance(img, dict) or "file_name" not in img or "id" not in img:
            problems.append((instances_json, f"malformed image entry {str(img)[:80]}"))
            continue
        info = {k: img.get(k) for k in ("id", "width", "height", "license", "coco_url",
                                        "flickr_url", "file_name", "date_captured")}
        lic = licences.get(img.get("license"))
        if lic:
            info["license_name"], info["license_url"] = lic.get("name"), lic.get("url")
        info["captions"] = []
        images[img["file_name"]] = info
        by_id[img["id"]] = img["file_name"]
    anns: dict[str, list[dict]] = {f: [] for f in images}
    for ann in data.get("annotations") or []:
        where = f"{instances_json}#annotation={ann.get('id') if isinstance(ann, dict) else '?'}"
        try:
            if not isinstance(ann, dict):
                raise ValueError("annotation is not an object")
            fname = by_id.get(ann.get("image_id"))
            if fname is None:
                raise ValueError(f"image_id {ann.get('image_id')!r} is not in 'images'")
            cid = int(ann["category_id"])
            if categories and cid not in categories:
                raise ValueError(f"category_id {cid} is not in 'categories'")
            polys, rle = _check_segmentation(ann.get("segmentation"))
            anns[fname].append({"id": int(ann["id"]), "category_id": cid,
                                "category": categories.get(cid, str(cid)),
                                "iscrowd": int(ann.get("iscrowd", 0) or 0), "polygons": polys,
                                "rle": rle, "normalized": False})
        except (KeyError, TypeError, ValueError) as exc:
            problems.append((where, f"malformed COCO annotation: {exc}"))
    captions_json = captions_json or captions_path(instances_json)
    if captions_json:
        for cap in storage.read_json(captions_json).get("annotations") or []:
            fname = by_id.get(cap.get("image_id")) if isinstance(cap, dict) else None
            if fname is not None and isinstance(cap.get("caption"), str):
                images[fname]["captions"].append(cap["caption"].strip())
    logger.info("%s: %d images, %d annotations, %d categories", instances_json, len(images),
                sum(len(v) for v in anns.values()), len(categories))
    return images, anns, categories


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """``HxW`` bool mask of a parsed annotation in the frame it was drawn on."""
    if ann.get("rle") is not None:
        rle = ann["rle"]
        if [int(rle["size"][0]), int(rle["size"][1])] != [height, width]:
            raise ValueError(f"RLE size {rle['size']} is not the image's {height}x{width}")
        return masks.decode(rle)
    polys = ann["polygons"]
    if ann.get("normalized"):
        polys = [[v * (width if i % 2 == 0 else height) for i, v in enumerate(p)] for p in polys]
    return masks.decode(masks.from_polygons(polys, height, width))

def coco_image_dir(instances_json: str) -> str:
    """The image folder that belongs to a COCO instances JSON: ``ROOT/annotations/
    instances_NAME.json`` -> ``ROOT/NAME`` (or ``ROOT/images/NAME``, or a folder beside it)."""
    parent, base = instances_json.rsplit("/", 1) if "/" in instances_json else (".", instances_json)
    name = base[: -len(".json")].split("_", 1)[-1]
    root = parent.rsplit("/", 1)[0] if "/" in parent else "."
    candidates = [storage.join(root, name), storage.join(root, "images", name),
                  storage.join(parent, name), storage.join(parent, "images"), parent]
    for c in candidates:
        fs, p = storage.get_fs(c)
        if fs.isdir(p):
            return c
    raise FileNotFoundError(f"{instances_json}: no image folder found (tried {candidates})")
