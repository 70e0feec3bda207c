"""CVAT: "CVAT for images 1.1" XML with RLE masks, and CVAT's "COCO 1.0" layout. Both lossless.

**CVAT for images 1.1** (``annotations.xml`` + ``images/``, the layout CVAT's export zip has and its
loader takes): one ``<image name width height>`` per image, one ``<mask>`` per object with CVAT's
mask RLE: run lengths over the object's tight box (``left``, ``top``, ``width``, ``height``, both
ends inclusive), row by row, alternating background / foreground, starting with background.
Provenance (``model_version``, ``score``, ``stage``, ``round``, ``mask_id``) goes into text
``<attribute>`` s that the labels declare in ``<meta>``, so CVAT keeps them; ``source`` is ``auto``
for model masks and ``manual`` for people's.

**COCO 1.0** (``annotations/instances_default.json`` + ``images/``): CVAT's COCO import layout; the
JSON is :mod:`dataengine.pipeline.annotate.export`'s COCO (RLE segmentations, ``score``,
``attributes``), written by the corpus side.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import numpy as np

from dataengine.pipeline.core import storage
from dataengine.pipeline.formats.common import FormatImage, FormatMask, category_names, check_size

XML_FILE = "annotations.xml"
COCO_FILE = "annotations/instances_default.json"
IMAGES_DIR = "images"
TEXT_ATTRIBUTES = ("model_version", "score", "stage", "round", "mask_id", "annotator")
MAX_XML_BYTES = 2 * 1024 ** 3


def mask_to_rle(mask: np.ndarray) -> tuple[list[int], tuple[int, int, int, int]]:
    """``HxW`` bool -> (CVAT run lengths over the tight box, ``(left, top, width, height)``)."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        raise ValueError("an empty mask has no CVAT box")
    left, top = int(xs.min()), int(ys.min())
    width, height = int(xs.max()) - left + 1, int(ys.max()) - top + 1
    flat = mask[top:top + height, left:left + width].ravel().astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0, *runs]
    return [int(r) for r in runs], (left, top, width, height)


def rle_to_mask(runs: list[int], box: tuple[int, int, int, int], height: int,
                width: int) -> np.ndarray:
    """CVAT run lengths over ``box`` -> ``HxW`` bool."""
    left, top, bw, bh = box
    if sum(runs) != bw * bh:
        raise ValueError(f"mask RLE covers {sum(runs)} pixels, its box {bw}x{bh} has {bw * bh}")
    if left < 0 or top < 0 or left + bw > width or top + bh > height:
        raise ValueError(f"mask box {box} is outside the {width}x{height} image")
    values = np.arange(len(runs)) % 2
    crop = np.repeat(values, runs).astype(bool).reshape(bh, bw)
    out = np.zeros((height, width), dtype=bool)
    out[top:top + bh, left:left + bw] = crop
    return out


def _meta(root: ET.Element, images: list[FormatImage]) -> None:
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    ET.SubElement(task, "name").text = "dataengine export"
    ET.SubElement(task, "size").text = str(len(images))
    ET.SubElement(task, "mode").text = "annotation"
    labels = ET.SubElement(task, "labels")
    for name in category_names(images):
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "type").text = "mask"
        attrs = ET.SubElement(label, "attributes")
        for a in TEXT_ATTRIBUTES:
            el = ET.SubElement(attrs, "attribute")
            ET.SubElement(el, "name").text = a
            ET.SubElement(el, "mutable").text = "False"
            ET.SubElement(el, "input_type").text = "text"
            ET.SubElement(el, "default_value").text = ""
            ET.SubElement(el, "values").text = ""


def _mask_element(parent: ET.Element, m: FormatMask, z: int) -> None:
    mask = m.mask
    if not mask.any():
        return
    runs, (left, top, w, h) = mask_to_rle(mask)
    auto = m.attributes.get("annotator") == "model"
    el = ET.SubElement(parent, "mask", {
        "label": m.category or "object", "source": "auto" if auto else "manual",
        "occluded": "0", "rle": ", ".join(map(str, runs)), "left": str(left), "top": str(top),
        "width": str(w), "height": str(h), "z_order": str(z)})
    values = {**{k: m.attributes.get(k) for k in TEXT_ATTRIBUTES}, "score": m.score,
              "model_version": m.model_version}
    for name in TEXT_ATTRIBUTES:
        if values.get(name) is not None:
            ET.SubElement(el, "attribute", {"name": name}).text = str(values[name])


def write(images: list[FormatImage], out_dir: str) -> dict[str, Any]:
    """Write ``out_dir/annotations.xml`` (CVAT for images 1.1); returns a summary."""
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    _meta(root, images)
    n = 0
    for i, img in enumerate(images):
        el = ET.SubElement(root, "image", {"id": str(i), "name": img.file_name,
                                           "width": str(img.width), "height": str(img.height)})
        for z, m in enumerate(img.masks):
            _mask_element(el, m, z)
            n += 1
    ET.indent(root)
    data = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    storage.write_bytes(storage.join(out_dir, XML_FILE), data)
    return {"images": len(images), "masks": n, "path": storage.join(out_dir, XML_FILE)}


def _image(el: ET.Element, problems: list[str]) -> FormatImage:
    name = el.get("name", "")
    w, h = int(el.get("width", 0)), int(el.get("height", 0))
    masks = []
    for shape in el:
        where = f"image {name} {shape.tag} {shape.get('label')!r}"
        if shape.tag != "mask":
            problems.append(f"{where}: not a mask; skipped")
            continue
        try:
            runs = [int(v) for v in shape.get("rle", "").split(",") if v.strip()]
            box = tuple(int(float(shape.get(k, "nan"))) for k in ("left", "top", "width",
                                                                   "height"))
            mask = rle_to_mask(runs, box, h, w)  # type: ignore[arg-type]
            check_size(where, mask, h, w)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        attrs: dict[str, Any] = {a.get("name"): a.text for a in shape.findall("attribute")}
        score = attrs.pop("score", None)
        version = attrs.pop("model_version", None)
        masks.append(FormatMask.from_mask(mask, category=shape.get("label"),
                                          score=float(score) if score else None,
                                          model_version=version or None, attributes=attrs))
    return FormatImage(name, w, h, masks)


def read(path: str, problems: list[str] | None = None) -> list[FormatImage]:
    """Images and masks of a CVAT for images 1.1 XML (a file, or a directory holding
    ``annotations.xml``)."""
    problems = problems if problems is not None else []
    if not path.endswith(".xml"):
        path = storage.join(path, XML_FILE)
    data = storage.read_bytes(path)
    if len(data) > MAX_XML_BYTES:
        raise ValueError(f"{path}: {len(data)} bytes, more than the {MAX_XML_BYTES} allowed")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"{path}: not XML: {exc}") from exc
    if root.tag != "annotations":
        raise ValueError(f"{path}: root element <{root.tag}>, expected <annotations>")
    return [_image(el, problems) for el in root.findall("image")]
