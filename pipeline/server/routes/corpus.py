"""Read-only views of the corpus (any signed-in role): Overview, Browse, Sample, mask details,
images, thumbnails and overlays, model versions and their files."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import MODEL_KINDS
from dataengine.pipeline.server.config import THUMB_SIZES
from dataengine.pipeline.server.corpus_view import VERSION_RE, BadQuery, BrowseQuery, NotFound
from dataengine.pipeline.server.security import ApiError, require
from dataengine.pipeline.server.state import ServerState, get_state

logger = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require("annotator"))])
FILE_NAME_RE = re.compile(r"(samples/)?[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\.(png|jpg|json|md)")
#: integer query parameters and their ranges (a comma-separated list for ``round``)
INT_PARAMS = {"page": (0, 1_000_000), "per_page": (1, 1_000_000), "round": (0, 999_999),
              "min_area": (0, 1 << 40), "max_area": (0, 1 << 40), "size": (1, 1 << 16)}
FLOAT_PARAMS = ("min_iou", "max_iou", "min_stability", "max_stability")


def bounded_query(params: dict[str, str]) -> dict[str, str]:
    """The query parameters, with every number checked against its range (400 naming the
    parameter, its value and the range) before anything uses it."""
    for name, (lo, hi) in INT_PARAMS.items():
        raw = params.get(name)
        if raw in (None, ""):
            continue
        for part in raw.split(","):
            part = part.strip()
            if not re.fullmatch(r"-?\d{1,20}", part):
                continue  # not an integer: the parser names the problem
            if not lo <= int(part) <= hi:
                raise ApiError(400, f"{name}={part}: allowed {lo}..{hi}")
    for name in FLOAT_PARAMS:
        raw = params.get(name)
        if raw and len(raw) > 32:
            raise ApiError(400, f"{name}={raw[:32]!r}...: not a number")
    return params


def image_source(st: ServerState, key: str) -> str:
    info = st.view.image_info(key)
    shard = info.get("shard")
    if not shard or not re.fullmatch(r"shard-\d+", str(shard)):
        raise ApiError(404, f"image {key!r} has no valid shard in the index")
    return str(shard)


def thumb_size(request: Request) -> int:
    cfg = get_state(request).config
    raw = request.query_params.get("size", str(cfg.thumb_size))
    if not re.fullmatch(r"\d{1,6}", raw):
        raise BadQuery(f"size={raw[:20]!r} is not an integer within 1..999999")
    size = int(raw)
    if size not in THUMB_SIZES:
        raise BadQuery(f"size={size}: allowed {list(THUMB_SIZES)}")
    return size


def image_response(data: bytes, media: str = "image/jpeg") -> Response:
    return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=300"})


def rendered(fn, *args) -> Any:
    try:
        return fn(*args)
    except (KeyError, FileNotFoundError, OSError) as exc:
        raise ApiError(404, f"image unavailable: {exc}") from exc


@router.get("/api/overview")
def overview(request: Request) -> dict:
    return get_state(request).view.overview()


@router.get("/api/browse")
def browse(request: Request) -> dict:
    q = BrowseQuery.parse(bounded_query(dict(request.query_params)))
    return get_state(request).view.browse(q)


@router.get("/api/sample/{key}")
def sample(key: str, request: Request) -> dict:
    return get_state(request).view.sample(key)


@router.get("/api/mask/{mask_id:path}")
def mask_detail(mask_id: str, request: Request) -> dict:
    st = get_state(request)
    row = st.view.mask_row(mask_id)
    record = None
    try:
        url = st.corpus.round_shard(row["round"], row["shard"])
        doc = json.loads(st.renderer.tars.read(url, row["key"], "json"))
        for ann in doc.get("annotations", []):
            if int(ann.get("id", -1)) == row["ann_id"]:
                record = {k: v for k, v in ann.items() if k != "segmentation"}
    except Exception as exc:  # noqa: BLE001 - the manifest row is still worth showing
        logger.warning("mask %s: cannot read its round shard record: %s", mask_id, exc)
    row.pop("rle", None)
    return {"mask": row, "record": record,
            "state": st.view.curation.mask_state(mask_id, row["key"])}


@router.get("/api/image/{key}")
def image(key: str, request: Request) -> Response:
    st = get_state(request)
    data, media = rendered(st.renderer.image_bytes, key, image_source(st, key))
    return image_response(data, media)


@router.get("/api/thumb/{key}")
def thumb(key: str, request: Request) -> Response:
    st = get_state(request)
    size = thumb_size(request)
    return image_response(rendered(st.renderer.thumbnail, key, image_source(st, key), size))


@router.get("/api/overlay/{key}")
def overlay(key: str, request: Request) -> Response:
    """Thumbnail of an image with its masks that are not rejected drawn in."""
    st = get_state(request)
    size = thumb_size(request)
    shard = image_source(st, key)
    rows = st.view.mask_rows(key)
    ids = rows["mask_id"].to_pylist()
    states = {m: st.view.curation.mask_state(m, key) for m in ids}
    rles = [(m, {"size": [h, w], "counts": c}) for m, h, w, c in zip(
        ids, rows["height"].to_pylist(), rows["width"].to_pylist(), rows["rle"].to_pylist(),
        strict=True) if states[m] != "rejected"]
    return image_response(rendered(st.renderer.overlay, key, shard, rles, size))


@router.get("/api/maskthumb/{mask_id:path}")
def mask_thumb(mask_id: str, request: Request) -> Response:
    """A crop around one mask with the mask drawn in."""
    st = get_state(request)
    size = thumb_size(request)
    row = st.view.mask_row(mask_id)
    shard = image_source(st, row["key"])
    x, y, w, h = row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]
    pad = max(16.0, 0.25 * max(w, h))
    side = max(w, h) + 2 * pad
    cx, cy = x + w / 2, y + h / 2
    crop = (cx - side / 2, cy - side / 2, side, side)
    rle = {"size": [row["height"], row["width"]], "counts": row["rle"]}
    return image_response(rendered(st.renderer.overlay, row["key"], shard, [(mask_id, rle)],
                                   size, crop, mask_id))


@router.get("/api/models")
def models(request: Request) -> dict:
    view = get_state(request).view
    return {kind: view.models(kind) for kind in MODEL_KINDS}


@router.get("/api/file/models/{kind}/{version}/{name:path}")
def model_file(kind: str, version: str, name: str, request: Request) -> Response:
    if kind not in MODEL_KINDS:
        raise BadQuery(f"model kind {kind!r}: allowed {list(MODEL_KINDS)}")
    if not VERSION_RE.fullmatch(version):
        raise BadQuery(f"version {version!r} is not of the form vNNNN")
    if not FILE_NAME_RE.fullmatch(name) or ".." in name:
        raise BadQuery(f"file name {name!r} is not allowed (png/jpg/json/md under the version "
                       "folder)")
    url = get_state(request).corpus.path("models", kind, version, *name.split("/"))
    if not storage.exists(url):
        raise NotFound(f"models/{kind}/{version}/{name} does not exist")
    media = {"png": "image/png", "jpg": "image/jpeg", "json": "application/json",
             "md": "text/plain; charset=utf-8"}[name.rsplit(".", 1)[-1]]
    return Response(storage.read_bytes(url), media_type=media)


@router.get("/api/file/engine/{name}/{fname}")
def engine_file(name: str, fname: str, request: Request) -> Response:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise BadQuery(f"engine name {name!r} is malformed")
    if fname not in ("report.png", "report.md", "report.json"):
        raise BadQuery(f"file {fname!r}: allowed report.png, report.md, report.json")
    url = get_state(request).corpus.path("engine", name, fname)
    if not storage.exists(url):
        raise NotFound(f"engine/{name}/{fname} does not exist")
    media = {"png": "image/png", "md": "text/plain; charset=utf-8",
             "json": "application/json"}[fname.rsplit(".", 1)[1]]
    return Response(storage.read_bytes(url), media_type=media)
