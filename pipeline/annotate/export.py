"""Rounds out and in: COCO JSON and SA-1B-style tars; COCO JSON imported back as a round.

- :func:`export_coco`: masks of some rounds (default: every complete round after round 0) as one
  COCO instances JSON with RLE segmentations, ``score`` = predicted IoU and the provenance under
  ``attributes`` (stage, round, model version, clicks, annotator, seconds, mask id); images carry
  ``dataengine_key`` and are named by :func:`export_names` (the source file's name with the real
  extension of the stored image). Optionally writes the images under those names
  (``images_dir``), which is what CVAT / Label Studio need to open the task with the masks as
  pre-annotations.
- :func:`export_sa1b`: one tar per image shard with ``<key>.jpg`` + ``<key>.json`` (SA-1B's
  per-image schema with our provenance), like SA-1B's own tars.
- :func:`import_coco`: a COCO JSON (people's corrections, or any tool's output) becomes a new
  round: images are matched to corpus keys by ``dataengine_key``, file-name stem or original source
  name; masks must be in the stored image's frame; the file is validated before the round starts
  and bad images or annotations are quarantined with their reason, never stop the import.
  Parsing reuses :func:`dataengine.pipeline.core.coco.load_coco`.
"""

from __future__ import annotations

import logging
from pathlib import PurePosixPath
from typing import Any

from dataengine.pipeline.core import masks as mask_utils
from dataengine.pipeline.core import storage
from dataengine.pipeline.core.imagecodec import IMAGE_EXTS
from dataengine.pipeline.core.layout import STAGES, Corpus
from dataengine.pipeline.core.rounds import (RoundWriter, claim_round, complete_rounds, is_complete,
                                             iter_round_shard, round_info, round_owner,
                                             round_shards)
from dataengine.pipeline.core.shards import iter_tar, write_tar

logger = logging.getLogger(__name__)

UNKNOWN_CATEGORY = {"id": 0, "name": "object", "supercategory": "object"}
PROVENANCE = ("stage", "round", "model_version", "clicks", "annotator", "seconds",
              "predicted_iou", "stability_score", "point_coords", "crop_box", "prefilled")


def _rounds(corpus: Corpus, rounds: list[int] | None, include_imported: bool) -> list[int]:
    if rounds:
        return list(rounds)
    return [n for n in complete_rounds(corpus) if include_imported or n != 0]


def _records(corpus: Corpus, rounds: list[int]) -> dict[str, dict[str, Any]]:
    """key -> merged per-image record over ``rounds`` (image order: shard, then key order)."""
    merged: dict[str, dict[str, Any]] = {}
    for n in rounds:
        for shard in round_shards(corpus, n):
            for rec in iter_round_shard(corpus, n, shard):
                key = rec["image"]["image_id"]
                cur = merged.setdefault(key, {"image": dict(rec["image"]), "annotations": [],
                                              "shard": shard})
                cur["annotations"].extend(rec["annotations"])
    return merged


def _image_bytes(corpus: Corpus, shards: set[str], keys: set[str]) -> dict[str, tuple[str, bytes]]:
    out = {}
    for shard in sorted(shards):
        for s in iter_tar(corpus.image_shard(shard)):
            if s["__key__"] in keys:
                ext = next((e for e in IMAGE_EXTS if e in s), None)
                if ext:
                    out[s["__key__"]] = (ext, s[ext])
    return out


def _stored_files(corpus: Corpus, merged: dict[str, dict[str, Any]]
                  ) -> dict[str, tuple[str | None, str | None]]:
    """key -> (source URI, stored extension): from the image index, else (keys it lacks) from
    the image shards' sample metadata."""
    import json

    from dataengine.pipeline.core.index import load_index

    out: dict[str, tuple[str | None, str | None]] = {}
    for row in load_index(corpus).select(["key", "uri", "format"]).to_pylist():
        if row["key"] in merged:
            out[row["key"]] = (row["uri"], row["format"])
    missing = {k for k in merged if not (out.get(k) or (None, None))[1]}
    for shard in sorted({merged[k]["shard"] for k in missing}):
        for s in iter_tar(corpus.image_shard(shard)):
            if s["__key__"] in missing:
                meta = json.loads(s["json"]) if "json" in s else {}
                ext = next((e for e in IMAGE_EXTS if e in s), None)
                out[s["__key__"]] = (meta.get("uri") or meta.get("file_name"), ext)
    return out


def export_names(corpus: Corpus, merged: dict[str, dict[str, Any]]) -> dict[str, str]:
    """key -> the file name an export gives the image: the source file's name, with the real
    extension of the stored image (the source's own spelling when it is the same format, e.g.
    ``.jpeg``); ``KEY.ext`` without a source name; ``stem-KEY.ext`` when two images would share
    a name."""
    same = {"jpg": {"jpg", "jpeg"}, "jpeg": {"jpg", "jpeg"}}
    files = _stored_files(corpus, merged)
    out: dict[str, str] = {}
    taken: set[str] = set()
    for key in merged:
        uri, ext = files.get(key, (None, None))
        ext = ext or "jpg"
        base = PurePosixPath(str(uri).split("#")[-1].split("?")[0]).name if uri else ""
        stem, _, src_ext = base.rpartition(".") if "." in base else (base, "", "")
        if src_ext.lower() in same.get(ext, {ext}):
            ext = src_ext
        name = f"{stem}.{ext}" if stem else f"{key}.{ext}"
        if name.lower() in taken:
            name = f"{stem or key}-{key}.{ext}"
        taken.add(name.lower())
        out[key] = name
    return out


def export_coco(root: str, out_path: str, *, rounds: list[int] | None = None,
                include_imported: bool = False, images_dir: str | None = None) -> dict[str, Any]:
    """Write rounds as one COCO instances JSON at ``out_path``; returns a summary."""
    from dataengine.pipeline.core.coco import COCO80, COCO80_IDS

    corpus = Corpus(root)
    root = corpus.root
    numbers = _rounds(corpus, rounds, include_imported)
    merged = _records(corpus, numbers)
    names = {cid: name for cid, name in zip(COCO80_IDS, COCO80)}
    cats: dict[int, dict[str, Any]] = {}
    images, anns = [], []
    files = export_names(corpus, merged)
    if images_dir:
        blobs = _image_bytes(corpus, {r["shard"] for r in merged.values()}, set(merged))
        for key, (_ext, data) in blobs.items():
            storage.write_bytes(storage.join(images_dir, files[key]), data)
    for img_id, (key, rec) in enumerate(merged.items(), start=1):
        info = rec["image"]
        images.append({"id": img_id, "file_name": files[key],
                       "width": int(info["width"]), "height": int(info["height"]),
                       "dataengine_key": key, "dataengine_shard": rec["shard"]})
        for ann in rec["annotations"]:
            cid = ann.get("category_id")
            if cid is None or cid < 0:
                cid = UNKNOWN_CATEGORY["id"]
                cats.setdefault(cid, dict(UNKNOWN_CATEGORY))
            else:
                cats.setdefault(int(cid), {"id": int(cid), "name": ann.get("category") or
                                           names.get(int(cid), str(cid)), "supercategory": ""})
            seg = ann["segmentation"]
            attrs = {k: ann.get(k) for k in PROVENANCE if k in ann}
            attrs["mask_id"] = f"round-{int(ann['round']):04d}/{key}/{int(ann['id'])}"
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(cid),
                         "segmentation": {"size": list(seg["size"]), "counts": seg["counts"]},
                         "area": int(ann["area"]), "bbox": [float(v) for v in ann["bbox"]],
                         "iscrowd": int(ann.get("iscrowd", 0) or 0),
                         "score": float(ann.get("predicted_iou") or 0.0), "attributes": attrs})
    coco = {"info": {"description": f"dataengine export of {root}", "rounds": numbers},
            "licenses": [], "images": images, "annotations": anns,
            "categories": sorted(cats.values(), key=lambda c: c["id"])}
    storage.write_json(out_path, coco)
    logger.info("exported %d images, %d masks of rounds %s to %s", len(images), len(anns),
                numbers, out_path)
    return {"rounds": numbers, "images": len(images), "masks": len(anns), "path": out_path}


def export_sa1b(root: str, out_dir: str, *, rounds: list[int] | None = None,
                include_imported: bool = False) -> dict[str, Any]:
    """One SA-1B-style tar per image shard under ``out_dir`` (``<key>.<ext>`` + ``<key>.json``)."""
    corpus = Corpus(root)
    root = corpus.root
    numbers = _rounds(corpus, rounds, include_imported)
    merged = _records(corpus, numbers)
    by_shard: dict[str, list[str]] = {}
    for key, rec in merged.items():
        by_shard.setdefault(rec["shard"], []).append(key)
    n_tars = n_masks = 0
    for shard, keys in sorted(by_shard.items()):
        wanted = set(keys)

        def samples(shard=shard, wanted=wanted):
            nonlocal n_masks
            for s in iter_tar(corpus.image_shard(shard)):  # image-shard key order
                key = s["__key__"]
                if key not in wanted:
                    continue
                ext = next((e for e in IMAGE_EXTS if e in s), "jpg")
                rec = merged[key]
                image = {**rec["image"], "file_name": f"{key}.{ext}"}
                n_masks += len(rec["annotations"])
                yield {"__key__": key, ext: s.get(ext, b""),
                       "json": {"image": image, "annotations": rec["annotations"]}}

        write_tar(storage.join(out_dir, f"{shard}.tar"), samples())
        n_tars += 1
    return {"rounds": numbers, "tars": n_tars, "images": len(merged), "masks": n_masks}


def _key_lookup(corpus: Corpus) -> tuple[dict[str, str], dict[str, tuple[int, int]],
                                          dict[str, str]]:
    """(key -> shard, key -> (h, w), name -> key) from the image shards' metadata."""
    import json

    shard_of, size, by_name = {}, {}, {}
    for shard in corpus.image_shards():
        for s in iter_tar(corpus.image_shard(shard)):
            key = s["__key__"]
            shard_of[key] = shard
            meta = json.loads(s["json"]) if "json" in s else {}
            if "height" in meta and "width" in meta:
                size[key] = (int(meta["height"]), int(meta["width"]))
            by_name[key] = key
            for field in ("source", "uri", "source_uri", "file_name", "original_name"):
                v = meta.get(field)
                if isinstance(v, str) and v:
                    by_name.setdefault(PurePosixPath(v.split("#")[0]).name, key)
                    by_name.setdefault(PurePosixPath(v.split("#")[0]).stem, key)
    return shard_of, size, by_name


def _imported_annotation(ann: dict[str, Any], raw: dict[str, Any], h: int, w: int, stage: str,
                         model_version: str, annotator: str) -> dict[str, Any]:
    """One parsed COCO annotation as a round annotation (round number set when writing)."""
    from dataengine.pipeline.core.coco import annotation_mask

    rle = mask_utils.encode(annotation_mask(ann, h, w))
    attrs = raw.get("attributes") if isinstance(raw.get("attributes"), dict) else {}
    score = raw.get("score") if isinstance(raw.get("score"), (int, float)) else None

    def num(v: Any, default: float = 0.0) -> float:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default

    def listed(v: Any) -> list:
        return v if isinstance(v, list) else []

    return {"id": 0, "segmentation": rle, "bbox": mask_utils.bbox(rle),
            "area": mask_utils.area(rle),
            "predicted_iou": num(attrs.get("predicted_iou"), num(score)),
            "stability_score": num(attrs.get("stability_score")),
            "point_coords": listed(attrs.get("point_coords")),
            "crop_box": listed(attrs.get("crop_box")) or [0, 0, w, h],
            "stage": stage, "round": -1,
            "model_version": attrs.get("model_version") if isinstance(
                attrs.get("model_version"), str) and attrs.get("model_version") else model_version,
            "clicks": listed(attrs.get("clicks")),
            "annotator": attrs["annotator"] if stage == attrs.get("stage") and isinstance(
                attrs.get("annotator"), str) else annotator,
            "seconds": num(attrs.get("seconds")),
            "category_id": ann["category_id"] or None, "category": ann["category"],
            "iscrowd": ann.get("iscrowd", 0), "source_id": ann["id"]}


def _import_records(corpus: Corpus, coco_path: str, stage: str, model_version: str,
                    annotator: str, problems: list[tuple[str, str]]
                    ) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """(shard -> key -> record, unmatched file names) of a COCO file, every mask validated and
    rasterised; bad images and annotations are appended to ``problems``."""
    from dataengine.pipeline.core.coco import load_coco

    images, anns_by_file, _ = load_coco(coco_path, captions_json=None, problems=problems)
    raw = storage.read_json(coco_path)
    extra = {a.get("id"): a for a in raw.get("annotations") or [] if isinstance(a, dict)
             and isinstance(a.get("id"), int)}
    raw_images = {i.get("file_name"): i for i in raw["images"] if isinstance(i, dict)
                  and isinstance(i.get("file_name"), str)}
    shard_of, size, by_name = _key_lookup(corpus)
    per_shard: dict[str, dict[str, dict[str, Any]]] = {}
    unmatched = []
    for fname, info in images.items():
        key = raw_images.get(fname, {}).get("dataengine_key")
        key = key if isinstance(key, str) else None
        key = key or by_name.get(fname) or by_name.get(PurePosixPath(fname).name) or \
            by_name.get(PurePosixPath(fname).stem)
        if key not in shard_of:
            unmatched.append(fname)
            continue
        if key in per_shard.get(shard_of[key], {}):
            problems.append((f"{coco_path}#image={info['id']}",
                             f"COCO image {fname} is the corpus image {key}, as is "
                             f"{per_shard[shard_of[key]][key]['image']['file_name']}: "
                             f"not imported twice"))
            continue
        h, w = size.get(key, (info["height"], info["width"]))
        if (info["height"], info["width"]) != (h, w):
            problems.append((f"{coco_path}#image={info['id']}",
                             f"COCO image {fname} is {info['width']}x{info['height']} but the "
                             f"stored image {key} is {w}x{h}"))
            continue
        out = []
        for ann in anns_by_file.get(fname, []):
            try:
                out.append(_imported_annotation(ann, extra.get(ann["id"]) or {}, h, w, stage,
                                                model_version, annotator))
            except (ValueError, KeyError, TypeError) as exc:
                problems.append((f"{coco_path}#annotation={ann['id']}",
                                 f"bad annotation: {exc}"))
        for i, a in enumerate(out, 1):
            a["id"] = i
        per_shard.setdefault(shard_of[key], {})[key] = {
            "image": {"image_id": key, "width": w, "height": h, "file_name": fname},
            "annotations": out}
    return per_shard, unmatched


def _quarantine_problems(corpus: Corpus, coco_path: str, problems: list[tuple[str, str]]
                         ) -> None:
    from dataengine.pipeline.core import quarantine

    rows = [quarantine.record(coco_path, where, reason, "annotation")
            for where, reason in problems]
    quarantine.write(corpus, quarantine.content_name("import", rows), rows)


def _unfinished_import(corpus: Corpus, coco_path: str, stage: str, model_version: str
                       ) -> int | None:
    """An unfinished round importing the same file (a crashed import: resume it), or None."""
    for n in reversed(corpus.rounds()):
        info = round_info(corpus, n) or {}
        if n and not is_complete(corpus, n) and round_owner(corpus, n) == "import" and \
                (info.get("config") or {}).get("imported_from") == coco_path and \
                info.get("stage") == stage and info.get("model_version") == model_version:
            return n
    return None


def import_coco(root: str, coco_path: str, *, stage: str = "manual",
                round_number: int | None = None, model_version: str = "",
                annotator: str = "human") -> dict[str, Any]:
    """Import a COCO instances JSON as round ``round_number`` (default: a new round).

    The whole file is validated and every mask rasterised before the round is started: bad
    images and annotations are quarantined with their reason (``ROOT/quarantine/``), and a file
    with nothing to import starts no round (ValueError). Annotations keep the provenance found
    under ``attributes`` (our export) and otherwise get ``stage`` / ``annotator`` /
    ``model_version`` given here. Returns a summary.
    """
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    corpus = Corpus(root)
    problems: list[tuple[str, str]] = []
    per_shard, unmatched = _import_records(corpus, coco_path, stage, model_version, annotator,
                                           problems)
    _quarantine_problems(corpus, coco_path, problems)
    if not per_shard:
        raise ValueError(f"{coco_path}: no image matches the corpus and passes validation "
                         f"({len(unmatched)} unmatched, {len(problems)} quarantined); "
                         f"no round was started")
    config = {"imported_from": coco_path, "annotator": annotator}
    number = round_number if round_number is not None else _unfinished_import(
        corpus, coco_path, stage, model_version)
    if number is None:
        number = claim_round(corpus, stage, model_version, owner="import", config=config)
    writer = RoundWriter(corpus, number, stage, model_version, config=config, owner="import")
    writer.begin()
    n_masks = 0
    for shard in corpus.image_shards():
        recs = per_shard.get(shard)
        if not recs:
            continue  # (a shard done before a crash is counted, not rewritten)
        order = [s["__key__"] for s in iter_tar(corpus.image_shard(shard))]
        records = [recs[k] for k in order if k in recs]
        for rec in records:
            for a in rec["annotations"]:
                a["round"] = number
        n_masks += writer.write_shard(shard, records, {
            "images": len(records), "problems": [f"{w_}: {r}" for w_, r in problems][:1000]})
    summary = {"round": number, "images": sum(len(v) for v in per_shard.values()),
               "masks": n_masks, "unmatched_images": unmatched[:1000],
               "failed_images": sum("#image=" in w_ for w_, _ in problems),
               "quarantined": len(problems), "problems": len(problems)}
    writer.finish({"stage": stage, "imported_from": coco_path, **summary})
    return summary
