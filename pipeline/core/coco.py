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

import logging
import math
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

#: Work bounds for one annotation (pycocotools' rasteriser walks every polygon edge pixel by
#: pixel and trusts its input: NaN, huge or negative values crash or exhaust memory).
MAX_POLYGON_COORDS = 100_000   # x and y values over all polygons of one annotation
COORD_MARGIN = 1.0             # coordinates within [-margin * size, (1 + margin) * size]
MAX_PIXELS = 1 << 30           # RLE / image area


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{what} is a {type(v).__name__}, not a number")
    if not math.isfinite(v):
        raise ValueError(f"{what} is {v!r}, not a finite number")
    return float(v)


def _integer(v: Any, what: str, minimum: int | None = None) -> int:
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{what} is {v!r} ({type(v).__name__}), not an integer")
    if minimum is not None and v < minimum:
        raise ValueError(f"{what} is {v}, below {minimum}")
    return v


def check_polygons(polys: list[list[float]], height: int, width: int) -> None:
    """Raise ValueError when polygons (absolute pixels) would make unbounded work for the
    rasteriser (coordinates far outside the ``height`` x ``width`` image) or lie entirely
    outside it."""
    for i, p in enumerate(polys, 1):
        xs, ys = p[0::2], p[1::2]
        for vals, size, axis in ((xs, width, "x"), (ys, height, "y")):
            lo, hi = min(vals), max(vals)
            if lo < -COORD_MARGIN * size or hi > (1 + COORD_MARGIN) * size:
                bad = lo if lo < -COORD_MARGIN * size else hi
                raise ValueError(f"polygon {i}: coordinate {axis}={bad:g} is far outside the "
                                 f"{width}x{height} image")
        if max(xs) <= 0 or min(xs) >= width or max(ys) <= 0 or min(ys) >= height:
            raise ValueError(f"polygon {i} lies entirely outside the {width}x{height} image")


def _rle_string_total(counts: str) -> int:
    """The sum of the run lengths of COCO's compressed RLE string (pycocotools' decoder,
    ``rleFrString``, in Python: its C version writes past the mask when the sum is wrong)."""
    runs: list[int] = []
    data = counts.encode("ascii", "replace")
    i = 0
    while i < len(data):
        x, k, more = 0, 0, True
        while more:
            if i >= len(data):
                raise ValueError("RLE counts string ends inside a number")
            c = data[i] - 48
            if not 0 <= c < 64:
                raise ValueError("RLE counts string holds a character outside COCO's alphabet")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise ValueError("RLE counts string decodes to a negative run")
        runs.append(x)
    return sum(runs)


def _check_rle(seg: dict[str, Any], height: int | None, width: int | None) -> dict[str, Any]:
    size = seg["size"]
    if not (isinstance(size, list) and len(size) == 2):
        raise ValueError("RLE size must be [height, width]")
    h, w = _integer(size[0], "RLE height", 1), _integer(size[1], "RLE width", 1)
    if h * w > MAX_PIXELS:
        raise ValueError(f"RLE size {h}x{w} is over {MAX_PIXELS} pixels")
    if height is not None and width is not None and (h, w) != (height, width):
        raise ValueError(f"RLE size {h}x{w} is not the image's {height}x{width}")
    counts = seg["counts"]
    if isinstance(counts, list):
        total = sum(_integer(c, "RLE count", 0) for c in counts)
    elif isinstance(counts, str):
        total = _rle_string_total(counts)
    else:
        raise ValueError(f"RLE counts is a {type(counts).__name__}, not a list or string")
    if total != h * w:
        raise ValueError(f"RLE counts cover {total} pixels, not {h}x{w}")
    return {"size": [h, w], "counts": counts}


def _check_segmentation(seg: Any, height: int | None = None, width: int | None = None
                        ) -> tuple[list[list[float]] | None, dict | None]:
    """(polygons, rle) of a COCO segmentation, validated (types, finiteness, work bounds and,
    when the image size is known, placement); ValueError naming the problem otherwise."""
    if isinstance(seg, list):
        polys, n = [], 0
        for p in seg:
            if not isinstance(p, list) or len(p) < 6 or len(p) % 2:
                raise ValueError("polygon must be a list of at least 3 x,y pairs")
            n += len(p)
            if n > MAX_POLYGON_COORDS:
                raise ValueError(f"polygons hold over {MAX_POLYGON_COORDS} coordinates")
            polys.append([_number(v, "polygon coordinate") for v in p])
        if not polys:
            raise ValueError("segmentation has no polygon")
        if height is not None and width is not None:
            check_polygons(polys, height, width)
        return polys, None
    if isinstance(seg, dict) and "size" in seg and "counts" in seg:
        return None, _check_rle(seg, height, width)
    raise ValueError("segmentation is neither polygons nor RLE")


def captions_path(instances_json: str) -> str | None:
    """The ``captions_*.json`` next to an ``instances_*.json``, when it exists."""
    base = instances_json.rsplit("/", 1)
    m = re.fullmatch(r"instances_(.+)\.json", base[-1])
    if not m or len(base) < 2:
        return None
    url = storage.join(base[0], f"captions_{m.group(1)}.json")
    return url if storage.exists(url) else None


def check_file_name(name: Any) -> str:
    """A COCO ``file_name``: a relative path inside the image folder; ValueError otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"file_name {name!r} is not a non-empty string")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or "://" in name or \
            ".." in parts or "\0" in name:
        raise ValueError(f"file_name {name!r} points outside the image folder")
    return name


def _parse_categories(data: dict[str, Any], where: str, problems: list[Problem]
                      ) -> dict[int, str]:
    cats: dict[int, str] = {}
    raw = data.get("categories") or []
    if not isinstance(raw, list):
        problems.append((where, f"'categories' is a {type(raw).__name__}, not a list"))
        return cats
    for c in raw:
        try:
            if not isinstance(c, dict):
                raise ValueError("category is not an object")
            cid = _integer(c.get("id"), "category id")
            cats[cid] = str(c.get("name", cid))
        except ValueError as exc:
            problems.append((where, f"malformed COCO category {str(c)[:80]}: {exc}"))
    return cats


def _image_info(img: Any) -> dict[str, Any]:
    if not isinstance(img, dict) or "file_name" not in img or "id" not in img:
        raise ValueError(f"malformed image entry {str(img)[:80]}")
    info = {k: img.get(k) for k in ("license", "coco_url", "flickr_url", "date_captured")}
    info["id"] = _integer(img["id"], "image id")
    info["file_name"] = check_file_name(img["file_name"])
    for k in ("width", "height"):
        info[k] = None if img.get(k) is None else _integer(img[k], f"image {k}", 1)
    return info


def _parse_images(data: dict[str, Any], where: str, problems: list[Problem]
                  ) -> tuple[dict[str, dict], dict[int, str], set[int]]:
    """(file_name -> info, image id -> file_name, ambiguous ids). Entries whose id appears
    more than once are all refused (their annotations would be ambiguous); a file name given
    twice keeps its first entry."""
    infos = []
    for img in data["images"]:
        try:
            infos.append(_image_info(img))
        except ValueError as exc:
            problems.append((f"{where}#image={img.get('id') if isinstance(img, dict) else '?'}",
                             f"malformed COCO image: {exc}"))
    seen_ids: dict[int, int] = {}
    for info in infos:
        seen_ids[info["id"]] = seen_ids.get(info["id"], 0) + 1
    dup_ids = {i for i, n in seen_ids.items() if n > 1}
    images: dict[str, dict] = {}
    by_id: dict[int, str] = {}
    for info in infos:
        fname = info["file_name"]
        if info["id"] in dup_ids:
            problems.append((f"{where}#image={info['id']}",
                             f"duplicate image id {info['id']} ({seen_ids[info['id']]} entries, "
                             f"one is {fname}): ambiguous, not imported"))
        elif fname in images:
            problems.append((f"{where}#image={info['id']}",
                             f"duplicate file_name {fname!r} (first given as image id "
                             f"{images[fname]['id']}): this entry is not imported"))
        else:
            images[fname] = {**info, "captions": []}
            by_id[info["id"]] = fname
    return images, by_id, dup_ids


def _parse_annotation(ann: Any, images: dict[str, dict], by_id: dict[int, str],
                      dup_ids: set[int], categories: dict[int, str]
                      ) -> tuple[str, dict[str, Any]]:
    if not isinstance(ann, dict):
        raise ValueError("annotation is not an object")
    image_id = ann.get("image_id")
    if isinstance(image_id, int) and image_id in dup_ids:
        raise ValueError(f"image_id {image_id} is duplicated in 'images' (ambiguous)")
    fname = by_id.get(image_id) if isinstance(image_id, int) and \
        not isinstance(image_id, bool) else None
    if fname is None:
        raise ValueError(f"image_id {image_id!r} is not in 'images'")
    cid = _integer(ann.get("category_id"), "category_id")
    if categories and cid not in categories:
        raise ValueError(f"category_id {cid} is not in 'categories'")
    iscrowd = _integer(ann.get("iscrowd", 0) or 0, "iscrowd", 0)
    if iscrowd > 1:
        raise ValueError(f"iscrowd is {iscrowd}, not 0 or 1")
    info = images[fname]
    polys, rle = _check_segmentation(ann.get("segmentation"), info["height"], info["width"])
    return fname, {"id": _integer(ann.get("id"), "annotation id"), "category_id": cid,
                   "category": categories.get(cid, str(cid)), "iscrowd": iscrowd,
                   "polygons": polys, "rle": rle, "normalized": False}


def _add_captions(captions_json: str, images: dict[str, dict], by_id: dict[int, str],
                  problems: list[Problem]) -> None:
    try:
        caps = storage.read_json(captions_json)
    except ValueError as exc:
        problems.append((captions_json, f"captions file not read: {exc}"))
        return
    raw = caps.get("annotations") if isinstance(caps, dict) else None
    for cap in raw if isinstance(raw, list) else []:
        image_id = cap.get("image_id") if isinstance(cap, dict) else None
        fname = by_id.get(image_id) if isinstance(image_id, int) else None
        if fname is not None and isinstance(cap.get("caption"), str):
            images[fname]["captions"].append(cap["caption"].strip())


def load_coco(instances_json: str, captions_json: str | None = None,
              problems: list[Problem] | None = None
              ) -> tuple[dict[str, dict], dict[str, list[dict]], dict[int, str]]:
    """Parse a COCO instances file: ``(images, annotations_by_file, categories)``.

    ``images`` maps ``file_name`` -> image info (``id``, ``width``, ``height``, ``license`` with
    ``license_name``/``license_url``, ``coco_url``, ``flickr_url``, ``captions``);
    ``annotations_by_file`` maps ``file_name`` -> parsed annotations (module docstring);
    ``categories`` maps category id -> name. Captions come from ``captions_json`` or the
    ``captions_*.json`` sibling. Everything is validated before it is used: malformed or
    ambiguous entries (wrong JSON types, NaN/Infinity, coordinates far outside or polygons
    entirely outside the image, file names leaving the image folder, duplicate ids or file
    names) are appended to ``problems`` as ``(source, reason)`` and skipped. Raises ValueError
    when the file is not COCO JSON.
    """
    data = storage.read_json(instances_json)  # UnreadableFile (a ValueError) names the file
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{instances_json}: not COCO JSON (no 'images' list)")
    problems = problems if problems is not None else []
    licences = {lic.get("id"): lic for lic in data.get("licenses") or [] if isinstance(lic, dict)
                and isinstance(lic.get("id"), (int, str))} \
        if isinstance(data.get("licenses") or [], list) else {}
    categories = _parse_categories(data, instances_json, problems)
    images, by_id, dup_ids = _parse_images(data, instances_json, problems)
    for info in images.values():
        lic = licences.get(info.get("license")) if isinstance(info.get("license"),
                                                              (int, str)) else None
        if lic:
            info["license_name"], info["license_url"] = lic.get("name"), lic.get("url")
    anns: dict[str, list[dict]] = {f: [] for f in images}
    raw_anns = data.get("annotations") or []
    if not isinstance(raw_anns, list):
        problems.append((instances_json, f"'annotations' is a {type(raw_anns).__name__}, "
                                         "not a list: no annotation imported"))
        raw_anns = []
    for ann in raw_anns:
        where = f"{instances_json}#annotation={ann.get('id') if isinstance(ann, dict) else '?'}"
        try:
            fname, parsed = _parse_annotation(ann, images, by_id, dup_ids, categories)
            anns[fname].append(parsed)
        except (KeyError, TypeError, ValueError) as exc:
            problems.append((where, f"malformed COCO annotation: {exc}"))
    captions_json = captions_json or captions_path(instances_json)
    if captions_json:
        _add_captions(captions_json, images, by_id, problems)
    logger.info("%s: %d images, %d annotations, %d categories", instances_json, len(images),
                sum(len(v) for v in anns.values()), len(categories))
    return images, anns, categories


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """``HxW`` bool mask of a parsed annotation in the frame it was drawn on; ValueError when
    it does not fit that frame (checked before pycocotools sees it)."""
    if height * width > MAX_PIXELS:
        raise ValueError(f"image {width}x{height} is over {MAX_PIXELS} pixels")
    if ann.get("rle") is not None:
        rle = _check_rle(ann["rle"], height, width)
        return masks.decode(rle)
    polys = ann["polygons"]
    if ann.get("normalized"):
        polys = [[v * (width if i % 2 == 0 else height) for i, v in enumerate(p)] for p in polys]
    polys = [[_number(v, "polygon coordinate") for v in p] for p in polys]
    check_polygons(polys, height, width)
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
