"""Rounds out to the annotation tools' formats and back in as rounds (``dataengine export
--format X`` / ``dataengine import --format X``).

Out: the masks of some rounds (default: every complete round after round 0) become
:class:`dataengine.pipeline.formats.common.FormatImage` s named by
:func:`dataengine.pipeline.annotate.export.export_names` (source file name, real extension), and
one module of :mod:`dataengine.pipeline.formats` writes them into a directory, with the images
under the name the tool expects (unless ``with_images`` is off). The COCO-based layouts (CVAT's
COCO 1.0, FiftyOne) are :func:`dataengine.pipeline.annotate.export.export_coco` at the layout's
paths, and come back through its ``import_coco``.

In: a format's images are matched to corpus keys (the key the export carried, else the file name
or stem, else a ``stem-KEY`` name), checked against the stored image's size, and written as a new
round through :class:`dataengine.pipeline.core.rounds.RoundWriter`; a problem with one image or
one region is recorded in its shard's done record (``failures``, ``problems``) and never stops the
import.
"""

from __future__ import annotations

import logging
import re
from pathlib import PurePosixPath
from typing import Any

from dataengine.pipeline.annotate.export import (PROVENANCE, _key_lookup, _records, _rounds,
                                                 export_coco, export_names, import_coco)
from dataengine.pipeline.core import masks as mask_utils
from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import STAGES, Corpus
from dataengine.pipeline.core.rounds import RoundWriter, next_round
from dataengine.pipeline.core.shards import iter_tar
from dataengine.pipeline.formats import cvat, fiftyone, labelstudio, yolo
from dataengine.pipeline.formats.common import FormatImage, FormatMask

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("labelstudio", "cvat", "cvat-coco", "yolo", "fiftyone")
IMPORT_FORMATS = EXPORT_FORMATS
LABELSTUDIO_TASKS = "tasks.json"
KEY_SUFFIX = re.compile(r"-([0-9a-f]{16})$")


def format_images(corpus: Corpus, merged: dict[str, dict[str, Any]]) -> list[FormatImage]:
    """The merged round records as format images, named by :func:`export_names`."""
    names = export_names(corpus, merged)
    out = []
    for key, rec in merged.items():
        masks = []
        for ann in rec["annotations"]:
            attrs = {k: ann.get(k) for k in PROVENANCE if k in ann}
            attrs["mask_id"] = f"round-{int(ann['round']):04d}/{key}/{int(ann['id'])}"
            masks.append(FormatMask(ann["segmentation"], category=ann.get("category"),
                                    category_id=ann.get("category_id"),
                                    score=ann.get("predicted_iou"),
                                    model_version=ann.get("model_version") or None,
                                    attributes=attrs))
        info = rec["image"]
        out.append(FormatImage(names[key], int(info["width"]), int(info["height"]), masks, key))
    return out


def _write_images(corpus: Corpus, merged: dict[str, dict[str, Any]], images: list[FormatImage],
                  images_dir: str) -> None:
    names = {img.key: img.file_name for img in images}
    for shard in sorted({r["shard"] for r in merged.values()}):
        for s in iter_tar(corpus.image_shard(shard)):
            key = s["__key__"]
            if key in names:
                ext = next(e for e in ("jpg", "jpeg", "png", "webp") if e in s)
                storage.write_bytes(storage.join(images_dir, names[key]), s[ext])


def export_format(root: str, out_dir: str, fmt: str, *, rounds: list[int] | None = None,
                  include_imported: bool = False, with_images: bool = True,
                  labelstudio_kind: str = "brush", predictions: bool = False,
                  image_prefix: str = labelstudio.LOCAL_FILES + "images/") -> dict[str, Any]:
    """Export rounds of the corpus at ``root`` to ``out_dir`` in format ``fmt``; a summary."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {EXPORT_FORMATS}")
    corpus = Corpus(root)
    if fmt in ("cvat-coco", "fiftyone"):
        json_path, img_dir = ((cvat.COCO_FILE, cvat.IMAGES_DIR) if fmt == "cvat-coco"
                              else (fiftyone.LABELS_FILE, fiftyone.DATA_DIR))
        summary = export_coco(corpus.root, storage.join(out_dir, json_path), rounds=rounds,
                              include_imported=include_imported,
                              images_dir=storage.join(out_dir, img_dir) if with_images else None)
        if fmt == "fiftyone":
            fiftyone.write_readme(out_dir)
        return {"format": fmt, **summary}
    numbers = _rounds(corpus, rounds, include_imported)
    merged = _records(corpus, numbers)
    images = format_images(corpus, merged)
    if fmt == "labelstudio":
        summary = labelstudio.write(images, storage.join(out_dir, LABELSTUDIO_TASKS),
                                    kind=labelstudio_kind, predictions=predictions,
                                    image_prefix=image_prefix)
        from dataengine.pipeline.formats.common import category_names

        storage.write_bytes(storage.join(out_dir, "labeling_config.xml"),
                            labelstudio.labeling_config(category_names(images),
                                                        labelstudio_kind).encode())
    elif fmt == "cvat":
        summary = cvat.write(images, out_dir)
    else:
        summary = yolo.write(images, out_dir)
    if with_images:
        _write_images(corpus, merged, images, storage.join(out_dir, "images"))
    logger.info("exported %d images of rounds %s as %s to %s", len(images), numbers, fmt,
                out_dir)
    return {"format": fmt, "rounds": numbers, "images": len(images), "out": out_dir, **summary}


def read_format(path: str, fmt: str, problems: list[str],
                sizes: dict[str, tuple[int, int]] | None = None) -> list[FormatImage]:
    """The images and masks of an export in format ``fmt`` (LS, CVAT XML, YOLO)."""
    if fmt == "labelstudio":
        if not path.endswith(".json"):
            path = storage.join(path, LABELSTUDIO_TASKS)
        return labelstudio.read(path, problems)
    if fmt == "cvat":
        return cvat.read(path, problems)
    if fmt == "yolo":
        return yolo.read(path, problems, sizes)
    raise ValueError(f"format {fmt!r} is not read by read_format")


def _match(img: FormatImage, shard_of: dict[str, str], by_name: dict[str, str]) -> str | None:
    name = PurePosixPath(img.file_name)
    for cand in (img.key, by_name.get(img.file_name), by_name.get(name.name),
                 by_name.get(name.stem)):
        if cand in shard_of:
            return cand
    m = KEY_SUFFIX.search(name.stem)
    return m.group(1) if m and m.group(1) in shard_of else None


def _annotation(m: FormatMask, i: int, number: int, stage: str, model_version: str,
                annotator: str, w: int, h: int) -> dict[str, Any]:
    attrs = m.attributes
    rle = m.rle
    return {"id": i, "segmentation": rle, "bbox": mask_utils.bbox(rle),
            "area": mask_utils.area(rle),
            "predicted_iou": float(m.score if m.score is not None else 0.0),
            "stability_score": float(attrs.get("stability_score") or 0.0),
            "point_coords": attrs.get("point_coords") or [],
            "crop_box": attrs.get("crop_box") or [0, 0, w, h], "stage": stage, "round": number,
            "model_version": m.model_version or model_version,
            "clicks": attrs.get("clicks") or [],
            "annotator": attrs.get("annotator") if attrs.get("stage") == stage and
            attrs.get("annotator") else annotator,
            "seconds": float(attrs.get("seconds") or 0.0),
            "category_id": m.category_id, "category": m.category,
            "source_mask": attrs.get("mask_id")}


def import_images(root: str, images: list[FormatImage], *, source: str, stage: str = "manual",
                  round_number: int | None = None, model_version: str = "",
                  annotator: str = "human", problems: list[str] | None = None
                  ) -> dict[str, Any]:
    """Write ``images`` (matched to corpus keys) as a new round; returns a summary."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    problems = problems if problems is not None else []
    corpus = Corpus(root)
    shard_of, size, by_name = _key_lookup(corpus)
    number = round_number if round_number is not None else next_round(corpus)
    writer = RoundWriter(corpus, number, stage, model_version,
                         config={"imported_from": source, "annotator": annotator})
    writer.begin()
    per_shard: dict[str, dict[str, dict[str, Any]]] = {}
    failures: dict[str, list[dict[str, str]]] = {}
    unmatched = []
    for img in images:
        key = _match(img, shard_of, by_name)
        if key is None:
            unmatched.append(img.file_name)
            continue
        shard = shard_of[key]
        h, w = size.get(key, (img.height, img.width))
        bad = [m for m in img.masks if list(m.rle["size"]) != [h, w]]
        if bad:
            failures.setdefault(shard, []).append({"key": key, "reason": (
                f"{img.file_name}: masks are {bad[0].rle['size'][0]}x{bad[0].rle['size'][1]}, "
                f"the stored image {key} is {h}x{w}")})
            continue
        anns = [_annotation(m, i + 1, number, stage, model_version, annotator, w, h)
                for i, m in enumerate(img.masks)]
        per_shard.setdefault(shard, {})[key] = {
            "image": {"image_id": key, "width": w, "height": h, "file_name": img.file_name},
            "annotations": anns}
    n_masks = 0
    for shard in corpus.image_shards():
        recs = per_shard.get(shard, {})
        if (not recs and shard not in failures) or writer.shard_done(shard):
            continue
        order = [s["__key__"] for s in iter_tar(corpus.image_shard(shard))]
        records = [recs[k] for k in order if k in recs]
        n_masks += writer.write_shard(shard, records, {
            "images": len(records), "failures": failures.get(shard, []),
            "problems": problems[:1000]})
    summary = {"round": number, "images": sum(len(v) for v in per_shard.values()),
               "masks": n_masks, "unmatched_images": unmatched[:1000],
               "failed_images": sum(len(v) for v in failures.values()),
               "problems": len(problems)}
    writer.finish({"stage": stage, "imported_from": source, **summary})
    return summary


def import_format(root: str, path: str, fmt: str, *, stage: str = "manual",
                  round_number: int | None = None, model_version: str = "",
                  annotator: str = "human") -> dict[str, Any]:
    """Import an export in format ``fmt`` (a file or directory at ``path``) as a new round."""
    if fmt not in IMPORT_FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {IMPORT_FORMATS}")
    kw = {"stage": stage, "round_number": round_number, "model_version": model_version,
          "annotator": annotator}
    if fmt in ("cvat-coco", "fiftyone"):
        name = cvat.COCO_FILE if fmt == "cvat-coco" else fiftyone.LABELS_FILE
        coco_json = path if path.endswith(".json") else storage.join(path, name)
        return {"format": fmt, **import_coco(root, coco_json, **kw)}
    problems: list[str] = []
    sizes = None
    if fmt == "yolo":  # label files without their image: the stored sizes, by name
        _, size, by_name = _key_lookup(Corpus(root))
        sizes = {name: size[k] for name, k in by_name.items() if k in size}
    images = read_format(path, fmt, problems, sizes)
    for p in problems[:20]:
        logger.warning("import %s: %s", fmt, p)
    return {"format": fmt, **import_images(root, images, source=path, problems=problems, **kw)}
