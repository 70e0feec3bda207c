"""Where raw images come from: folders, ``s3://`` prefixes, COCO JSON, YOLO-seg, URL/path lists.

:func:`list_items` turns one ``SRC`` into :class:`Item` s (one per image file, in a stable order)
and reports problems (malformed annotation lines, files a COCO JSON names but that do not
exist) as ``(source, reason)`` pairs instead of raising. The kind of a source is detected:

- ``*.json`` (COCO ``instances_*.json``): images in ``<root>/<name>/``, ``<root>/images/<name>/``
  or next to the JSON, where the JSON is ``<root>/annotations/instances_<name>.json``; captions
  from the sibling ``captions_<name>.json``; licence fields from the JSON. Masks are in the
  file's raw pixel frame.
- a folder with ``images/`` and ``labels/`` (YOLO-seg): ``class x1 y1 x2 y2 ...`` polygons
  normalised to the upright (EXIF-rotated) image, as Ultralytics reads them; class names from a
  ``*.yaml`` with ``names`` next to the folders, else the 80 COCO classes (COCO category ids).
- ``*.txt`` (one path or URL per line, ``#`` comments) or ``*.parquet`` (column ``url``, ``uri``,
  ``path``, ``image`` or ``file``): local paths relative to the list, ``s3://``, ``http(s)://``.
- any other folder or ``s3://`` prefix: every image file under it, recursively.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from dataengine.pipeline.core import coco, storage

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_COLUMNS = ("url", "uri", "path", "image", "file")


@dataclass
class Item:
    """One input image: where it is, which SRC brought it, metadata and imported annotations."""

    uri: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    annotations: list[dict[str, Any]] | None = None  # core.coco annotation dicts
    upright: bool = False  # annotations are relative to the EXIF-rotated image (YOLO)
    annotator: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "source": self.source, "meta": self.meta,
                "annotations": self.annotations, "upright": self.upright,
                "annotator": self.annotator}


def normalize(src: str) -> str:
    """A source's canonical name: absolute local path or the URL without a trailing slash."""
    if "://" in src:
        return src.rstrip("/")
    return os.path.abspath(src)


def _url(fs, path: str, like: str) -> str:
    if "://" not in like:
        return path
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return f"{proto}://{path}"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def _find_images(url: str) -> list[str]:
    fs, path = storage.get_fs(url)
    files = storage.retry(lambda: fs.find(path), what=url)
    images = sorted(_url(fs, f, url) for f in files if _is_image(f))
    skipped = len(files) - len(images)
    if skipped:
        logger.info("%s: %d files without an image extension ignored", url, skipped)
    return images


def kind_of(src: str) -> str:
    """``coco``, ``list``, ``yolo`` or ``folder``; FileNotFoundError when ``src`` is missing."""
    low = src.lower()
    if low.startswith(("http://", "https://")):
        return "list"
    if not storage.exists(src):
        raise FileNotFoundError(f"source {src!r} does not exist")
    if low.endswith(".json"):
        return "coco"
    if low.endswith((".txt", ".parquet")):
        return "list"
    fs, path = storage.get_fs(src)
    if not fs.isdir(path):
        raise ValueError(f"source {src!r} is a file but not a COCO .json, .txt or .parquet list")
    if fs.isdir(f"{path}/images") and fs.isdir(f"{path}/labels"):
        return "yolo"
    return "folder"




def _coco_items(src: str, problems: list[tuple[str, str]]) -> list[Item]:
    images, anns, _ = coco.load_coco(src, problems=problems)
    image_dir = coco.coco_image_dir(src)
    fs, base = storage.get_fs(image_dir)
    present = {f.rsplit("/", 1)[-1] for f in fs.find(base)}
    items = []
    for fname in sorted(images):
        uri = storage.join(image_dir, fname)
        if fname.rsplit("/", 1)[-1] not in present and not storage.exists(uri):
            problems.append((uri, f"missing file: referenced by {src} but does not exist"))
            continue
        info = images[fname]
        meta = {"coco_id": info["id"], "file_name": fname, "captions": info["captions"]}
        for k in ("license", "license_name", "license_url", "coco_url", "flickr_url",
                  "date_captured"):
            if info.get(k) is not None:
                meta[k] = info[k]
        items.append(Item(uri, src, meta, anns.get(fname) or [], False, "import:coco"))
    return items


def yolo_names(src: str) -> tuple[list[str], bool]:
    """Class names of a YOLO dataset and whether they are the 80 COCO classes."""
    for url in storage.listdir(src, r".*\.ya?ml"):
        data = yaml.safe_load(storage.read_bytes(url)) or {}
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names)]
        if isinstance(names, list) and names:
            return [str(n) for n in names], tuple(names) == coco.COCO80
    return list(coco.COCO80), True


def parse_yolo_labels(text: str, where: str, names: list[str], coco_ids: bool,
                      problems: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Parse YOLO-seg label text into annotation dicts; bad lines go to ``problems``."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls = int(parts[0])
            if not 0 <= cls < len(names):
                raise ValueError(f"class {cls} is outside 0..{len(names) - 1}")
            if len(parts) - 1 > coco.MAX_POLYGON_COORDS:
                raise ValueError(f"{len(parts) - 1} coordinates: at most "
                                 f"{coco.MAX_POLYGON_COORDS}")
            coords = [float(v) for v in parts[1:]]
            if not all(math.isfinite(v) for v in coords):
                raise ValueError("a coordinate is NaN or infinite")
            if len(coords) == 4:
                raise ValueError("a box (cx cy w h), not a polygon")
            if len(coords) < 6 or len(coords) % 2:
                raise ValueError(f"{len(coords)} coordinates: need an even number >= 6")
            if min(coords) < -0.01 or max(coords) > 1.01:
                raise ValueError("coordinates are not normalised to [0, 1]")
        except ValueError as exc:
            problems.append((f"{where}:{lineno}", f"malformed YOLO label line: {exc}"))
            continue
        out.append({"id": lineno, "category_id": coco.COCO80_IDS[cls] if coco_ids else cls,
                    "category": names[cls], "iscrowd": 0,
                    "polygons": [[min(1.0, max(0.0, v)) for v in coords]], "rle": None,
                    "normalized": True})
    return out


def _yolo_items(src: str, problems: list[tuple[str, str]]) -> list[Item]:
    names, coco_ids = yolo_names(src)
    images_dir = storage.join(src, "images")
    items = []
    for uri in _find_images(images_dir):
        rel = uri[len(images_dir) + 1:]
        label = storage.join(src, "labels", rel.rsplit(".", 1)[0] + ".txt")
        anns: list[dict[str, Any]] = []
        if storage.exists(label):
            try:
                text = storage.read_bytes(label).decode("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                problems.append((label, f"unreadable YOLO label file: {exc}"))
            else:
                anns = parse_yolo_labels(text, label, names, coco_ids, problems)
        items.append(Item(uri, src, {"file_name": rel}, anns, True, "import:yolo"))
    return items


def _list_items(src: str) -> list[str]:
    base = src.rsplit("/", 1)[0] if "/" in src else "."
    if src.lower().endswith(".parquet"):
        table = storage.read_table(src)
        col = next((c for c in LIST_COLUMNS if c in table.column_names), None)
        if col is None:
            raise ValueError(f"{src}: no column named one of {LIST_COLUMNS}")
        entries = [str(v) for v in table.column(col).to_pylist() if v]
    else:
        text = storage.read_bytes(src).decode("utf-8")
        entries = [ln.strip() for ln in text.splitlines()
                   if ln.strip() and not ln.strip().startswith("#")]
    out = []
    for e in entries:
        if "://" in e or os.path.isabs(e) or "://" in base:
            out.append(e if "://" in e or os.path.isabs(e) else storage.join(base, e))
        else:
            out.append(os.path.normpath(os.path.join(base, e)))
    return out


def list_items(src: str, problems: list[tuple[str, str]]) -> list[Item]:
    """The images of one source, in a stable order; problems are appended, not raised."""
    src = normalize(src)
    kind = kind_of(src)
    if kind == "coco":
        items = _coco_items(src, problems)
    elif kind == "yolo":
        items = _yolo_items(src, problems)
    elif kind == "list":
        uris = [src] if src.lower().startswith(("http://", "https://")) and not \
            src.lower().endswith((".txt", ".parquet")) else _list_items(src)
        items = [Item(u, src) for u in uris]
    else:
        items = [Item(u, src) for u in _find_images(src)]
    logger.info("source %s (%s): %d images", src, kind, len(items))
    return items


def matches(item: Item, holdout_source: str) -> bool:
    """Whether ``item`` belongs to ``holdout_source`` (the same SRC, or a folder holding it)."""
    h = normalize(holdout_source)
    return item.source == h or item.uri == h or item.uri.startswith(h + "/")
