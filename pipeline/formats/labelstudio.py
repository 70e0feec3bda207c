"""Label Studio tasks JSON: brush masks (Label Studio's RLE, lossless) or polygons, as annotations
or as predictions that carry the model version (pre-annotation).

One task per image: ``data.image`` (``image_prefix`` + the file name, e.g. Label Studio's local
files URL), ``data.dataengine_key``, and either ``annotations: [{result}]`` or ``predictions:
[{model_version, score, result}]`` (one prediction per model version in the image). A region is a
``brushlabels`` result whose ``value.rle`` is Label Studio's brush RLE (the ``rle-pack`` bit
stream of ``@thi.ng/rle-pack`` over the RGBA canvas, mask = 255 in every channel, as
``label_studio_converter.brush`` writes it), or a ``polygonlabels`` result whose points are in
percent of the image size (:mod:`.polygons`: one ring per object). Provenance rides in
``data.dataengine`` per region id, which Label Studio keeps with the task. The labeling config to
paste into the project is :func:`labeling_config`.

Reading takes, per task, the last annotation that was not cancelled, else the predictions; brush
and polygon regions become masks, other region types are reported in ``problems``.
"""

from __future__ import annotations

import json
import logging
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from dataengine.pipeline.core import storage
from dataengine.pipeline.formats.common import FormatImage, FormatMask, check_size
from dataengine.pipeline.formats.polygons import mask_to_ring, ring_to_mask

logger = logging.getLogger(__name__)

KINDS = ("brush", "polygon")
LOCAL_FILES = "/data/local-files/?d="
RLE_SIZES = (3, 4, 8, 16)
WORD = 8


# ---- Label Studio's brush RLE (rle-pack) -------------------------------------------------------

def _bits(value: int, width: int) -> str:
    return format(value, f"0{width}b")


def encode_rle(mask: np.ndarray) -> list[int]:
    """``HxW`` bool -> Label Studio brush RLE bytes (RGBA, 255 where the mask is set)."""
    flat = np.repeat(mask.astype(bool).ravel(), 4)
    n = flat.size
    head = [_bits(n, 32), _bits(WORD - 1, 5), *(_bits(s - 1, 4) for s in RLE_SIZES)]
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [n]])
    out = head
    limit = 1 << RLE_SIZES[-1]
    for s, e in zip(starts.tolist(), ends.tolist()):
        word = _bits(255 if flat[s] else 0, WORD)
        while s < e:
            run = min(e - s, limit)
            size = next(i for i, b in enumerate(RLE_SIZES) if run - 1 < (1 << b))
            out.append("1" + _bits(size, 2) + _bits(run - 1, RLE_SIZES[size]) + word)
            s += run
    bits = "".join(out)
    bits += "0" * (-len(bits) % 8)
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big")) if bits else []


class _BitReader:
    def __init__(self, data: list[int]) -> None:
        self.bits = np.unpackbits(np.asarray(data, dtype=np.uint8))
        self.pos = 0

    def read(self, n: int) -> int:
        if self.pos + n > self.bits.size:
            raise ValueError("brush RLE ends early")
        v = 0
        for b in self.bits[self.pos:self.pos + n]:
            v = (v << 1) | int(b)
        self.pos += n
        return v


def decode_rle(data: list[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE bytes -> ``HxW`` bool (the alpha channel > 0), for any rle-pack
    stream (repeat runs and literal chunks)."""
    r = _BitReader(data)
    num = r.read(32)
    word = r.read(5) + 1
    sizes = [r.read(4) + 1 for _ in range(4)]
    if num != height * width * 4:
        raise ValueError(f"brush RLE holds {num} values, the image needs {height}x{width}x4")
    out = np.zeros(num, dtype=np.uint16 if word > 8 else np.uint8)
    i = 0
    while i < num:
        repeat = r.read(1)
        j = i + 1 + r.read(sizes[r.read(2)])
        if repeat:
            out[i:j] = r.read(word)
        else:
            for k in range(i, min(j, num)):
                out[k] = r.read(word)
        i = j
    return out.reshape(height, width, 4)[:, :, 3] > 0


# ---- tasks out ----------------------------------------------------------------------------------

def labeling_config(categories: list[str], kind: str = "brush") -> str:
    """The Label Studio labeling config (XML) the exported tasks fit."""
    tag = "BrushLabels" if kind == "brush" else "PolygonLabels"
    labels = "".join(f'<Label value="{c}"/>' for c in categories)
    return (f'<View><Image name="image" value="$image"/>'
            f'<{tag} name="tag" toName="image">{labels}</{tag}></View>')


def _region(m: FormatMask, rid: str, img: FormatImage, kind: str) -> dict[str, Any]:
    label = m.category or "object"
    item: dict[str, Any] = {"id": rid, "from_name": "tag", "to_name": "image",
                            "original_width": img.width, "original_height": img.height,
                            "image_rotation": 0}
    if kind == "brush":
        item["type"] = "brushlabels"
        item["value"] = {"format": "rle", "rle": encode_rle(m.mask), "brushlabels": [label]}
    else:
        ring = mask_to_ring(m.mask)
        pts = [[float(x) * 100.0 / img.width, float(y) * 100.0 / img.height] for x, y in ring]
        item["type"] = "polygonlabels"
        item["value"] = {"points": pts, "polygonlabels": [label], "closed": True}
    if m.score is not None:
        item["score"] = float(m.score)
    return item


def to_task(img: FormatImage, index: int, *, kind: str = "brush", predictions: bool = False,
            image_prefix: str = LOCAL_FILES) -> dict[str, Any]:
    """One Label Studio task for an image (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: one of {KINDS}")
    provenance, groups = {}, {}
    for j, m in enumerate(img.masks):
        if not m.mask.any():
            continue
        rid = f"m{index}-{j + 1}"
        provenance[rid] = {**m.attributes, "category_id": m.category_id,
                           "model_version": m.model_version}
        groups.setdefault(m.model_version or "", []).append(_region(m, rid, img, kind))
    data = {"image": image_prefix + img.file_name, "dataengine_key": img.key,
            "dataengine": {"file_name": img.file_name, "regions": provenance}}
    task: dict[str, Any] = {"id": index, "data": data}
    if predictions:
        task["predictions"] = [
            {"model_version": version, "result": result,
             "score": float(np.mean([r.get("score", 0.0) for r in result]))}
            for version, result in groups.items()]
    else:
        task["annotations"] = [{"result": [r for rs in groups.values() for r in rs]}]
    return task


def write(images: list[FormatImage], out: str, *, kind: str = "brush", predictions: bool = False,
          image_prefix: str = LOCAL_FILES) -> dict[str, Any]:
    """Write the tasks JSON at ``out`` (a ``.json`` URL); returns a summary."""
    tasks = [to_task(img, i + 1, kind=kind, predictions=predictions, image_prefix=image_prefix)
             for i, img in enumerate(images)]
    storage.write_json(out, tasks)
    return {"tasks": len(tasks), "regions": sum(len(m.masks) for m in images), "kind": kind,
            "predictions": predictions}


# ---- tasks in -----------------------------------------------------------------------------------

def _results(task: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """(regions, model version) of a task: its last live annotation, else its predictions."""
    live = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if live:
        return list(live[-1].get("result") or []), None
    out, version = [], None
    for p in task.get("predictions") or []:
        out += [{**r, "_model_version": p.get("model_version")} for r in p.get("result") or []]
        version = p.get("model_version", version)
    return out, version


def _image_name(data: dict[str, Any]) -> str:
    own = (data.get("dataengine") or {}).get("file_name")
    if own:
        return own
    url = str(data.get("image") or "")
    return PurePosixPath(url.split("?d=")[-1].split("?")[0]).name


def from_task(task: dict[str, Any], problems: list[str]) -> FormatImage | None:
    """One task -> its image and masks (None, with a problem, when it has no image size)."""
    data = task.get("data") or {}
    name = _image_name(data)
    regions, _ = _results(task)
    if not regions:
        return FormatImage(name, 0, 0, [], data.get("dataengine_key"))
    provenance = (data.get("dataengine") or {}).get("regions") or {}
    w, h = int(regions[0].get("original_width", 0)), int(regions[0].get("original_height", 0))
    if not w or not h:
        problems.append(f"task {task.get('id')} ({name}): regions without original_width/height")
        return None
    masks = []
    for r in regions:
        where = f"task {task.get('id')} ({name}) region {r.get('id')}"
        value, kind = r.get("value") or {}, r.get("type")
        try:
            if kind == "brushlabels" and value.get("format") == "rle":
                mask, labels = decode_rle(value["rle"], h, w), value.get("brushlabels") or []
            elif kind == "polygonlabels":
                ring = [[x * w / 100.0, y * h / 100.0] for x, y in value["points"]]
                mask, labels = ring_to_mask(ring, h, w), value.get("polygonlabels") or []
            else:
                problems.append(f"{where}: region type {kind!r} is not a mask; skipped")
                continue
            check_size(where, mask, h, w)
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"{where}: {exc}")
            continue
        attrs = dict(provenance.get(r.get("id"), {}))
        masks.append(FormatMask.from_mask(
            mask, category=labels[0] if labels else None,
            category_id=attrs.pop("category_id", None),
            score=r.get("score"),
            model_version=r.get("_model_version") or attrs.pop("model_version", None),
            attributes=attrs))
    return FormatImage(name, w, h, masks, data.get("dataengine_key"))


def read(path: str, problems: list[str] | None = None) -> list[FormatImage]:
    """Images and masks of a Label Studio JSON export (a list of tasks, or one task)."""
    problems = problems if problems is not None else []
    raw = storage.read_json(path)
    tasks = raw if isinstance(raw, list) else [raw]
    out = []
    for task in tasks:
        if not isinstance(task, dict):
            problems.append(f"{path}: a task is not an object: {json.dumps(task)[:80]}")
            continue
        img = from_task(task, problems)
        if img is not None:
            out.append(img)
    return out
