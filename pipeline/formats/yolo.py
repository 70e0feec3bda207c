"""Ultralytics YOLO-seg: ``data.yaml``, ``images/<name>``, ``labels/<stem>.txt``.

One line per object: ``class x1 y1 x2 y2 ...``, coordinates normalised by the image width and
height (6 decimals). Each object is one ring (:mod:`.polygons`): the outer boundaries of all its
parts and the boundaries of its holes joined by zero-width bridges, Ultralytics'
``merge_multi_segment`` convention. Classes are the sorted category names (``data.yaml``
``names``).

What YOLO-seg loses: scores, model versions and every other provenance field (the format has no
place for them; the corpus keeps them); category ids (only the names' order survives). Geometry:
read back with pycocotools' rasteriser (:func:`read`), nothing; read by Ultralytics' own loader
(``cv2.fillPoly``), each bridge adds a 1-pixel line across a hole or between two parts (measured
by ``benchmarks/bench_formats.py``).
"""

from __future__ import annotations

import io
from pathlib import PurePosixPath
from typing import Any

from dataengine.pipeline.core import storage
from dataengine.pipeline.formats.common import FormatImage, FormatMask, category_names
from dataengine.pipeline.formats.polygons import mask_to_ring, ring_to_mask

IMAGES_DIR = "images"
LABELS_DIR = "labels"
DATA_YAML = "data.yaml"


def label_path(file_name: str) -> str:
    """``labels/<same relative path>.txt`` for an image ``file_name`` (Ultralytics' rule)."""
    return str(PurePosixPath(LABELS_DIR) / PurePosixPath(file_name).with_suffix(".txt"))


def _line(cls: int, ring: Any, width: int, height: int) -> str:
    coords = " ".join(f"{x / width:.6f} {y / height:.6f}" for x, y in ring)
    return f"{cls} {coords}"


def write(images: list[FormatImage], out_dir: str) -> dict[str, Any]:
    """Write ``data.yaml`` and one label file per image under ``out_dir``."""
    import yaml

    names = category_names(images)
    index = {n: i for i, n in enumerate(names)}
    n = 0
    for img in images:
        lines = []
        for m in img.masks:
            ring = mask_to_ring(m.mask)
            if len(ring) >= 3:
                lines.append(_line(index[m.category or "object"], ring, img.width, img.height))
        n += len(lines)
        storage.write_bytes(storage.join(out_dir, label_path(img.file_name)),
                            ("\n".join(lines) + ("\n" if lines else "")).encode())
    data = {"path": ".", "train": IMAGES_DIR, "val": IMAGES_DIR,
            "names": dict(enumerate(names))}
    storage.write_bytes(storage.join(out_dir, DATA_YAML),
                        yaml.safe_dump(data, sort_keys=False).encode())
    return {"images": len(images), "masks": n, "classes": len(names)}


def _names(out_dir: str) -> dict[int, str]:
    import yaml

    url = storage.join(out_dir, DATA_YAML)
    if not storage.exists(url):
        return {}
    names = (yaml.safe_load(storage.read_bytes(url)) or {}).get("names") or {}
    return dict(enumerate(names)) if isinstance(names, list) else \
        {int(k): str(v) for k, v in names.items()}


def _image_size(out_dir: str, file_name: str) -> tuple[int, int] | None:
    from PIL import Image

    url = storage.join(out_dir, IMAGES_DIR, file_name)
    if not storage.exists(url):
        return None
    with Image.open(io.BytesIO(storage.read_bytes(url))) as im:
        return im.height, im.width


def _images(out_dir: str) -> dict[str, str]:
    """label stem path -> image file name (relative to ``images/``)."""
    fs, base = storage.get_fs(storage.join(out_dir, IMAGES_DIR))
    if not fs.isdir(base):
        return {}
    out = {}
    for p in fs.find(base):
        rel = PurePosixPath(p).relative_to(PurePosixPath(base))
        out[str(rel.with_suffix(""))] = str(rel)
    return out


def read(out_dir: str, problems: list[str] | None = None,
         sizes: dict[str, tuple[int, int]] | None = None) -> list[FormatImage]:
    """Images and masks of a YOLO-seg directory. An image's size comes from its file under
    ``images/``, else from ``sizes`` (file stem -> (h, w), e.g. the corpus' stored sizes)."""
    problems = problems if problems is not None else []
    names, files = _names(out_dir), _images(out_dir)
    fs, base = storage.get_fs(storage.join(out_dir, LABELS_DIR))
    if not fs.isdir(base):
        raise FileNotFoundError(f"{out_dir}: no {LABELS_DIR}/ directory (not a YOLO-seg dataset)")
    out = []
    for p in sorted(fs.find(base)):
        rel = str(PurePosixPath(p).relative_to(PurePosixPath(base)).with_suffix(""))
        file_name = files.get(rel, f"{rel}.jpg")
        hw = _image_size(out_dir, file_name) if rel in files else None
        hw = hw or (sizes or {}).get(PurePosixPath(rel).name)
        if hw is None:
            problems.append(f"{rel}: no image under {IMAGES_DIR}/ and no known size; skipped")
            continue
        h, w = hw
        masks = []
        for i, line in enumerate(fs.cat_file(p).decode().splitlines()):
            vals = line.split()
            if not vals:
                continue
            try:
                cls = int(vals[0])
                xy = [float(v) for v in vals[1:]]
                if len(xy) % 2 or len(xy) < 6:
                    raise ValueError(f"{len(xy)} coordinates, need an even number >= 6")
                ring = [[xy[k] * w, xy[k + 1] * h] for k in range(0, len(xy), 2)]
                masks.append(FormatMask.from_mask(ring_to_mask(ring, h, w),
                                                  category=names.get(cls, str(cls))))
            except ValueError as exc:
                problems.append(f"{rel}.txt line {i + 1}: {exc}")
        out.append(FormatImage(file_name, w, h, masks))
    return out
