"""Annotation work (any role, as the request's identity): the image queue, prompts, accepted masks.

    POST /api/annotate/{round}/lease                 my image (my live lease, or the next)
    POST /api/annotate/{round}/renew|release         {lease_id, key}
    POST /api/annotate/{round}/predict               {lease_id, key, object, points, box}
    POST /api/annotate/{round}/accept                {lease_id, key, object, points, box, choice,
                                                      seconds, idempotency_key}
    POST /api/annotate/{round}/remove                {lease_id, key, uid}
    POST /api/annotate/{round}/submit|skip           {lease_id, key[, reason]}
    GET  /api/annotate/{round}/embedding?lease_id=&key=   float16 embedding (browser decoder)
    GET  /api/annotate/{round}/decoder                    browser decoder description
    GET  /api/annotate/decoder/{version}/{multi|single}   ONNX graph (from the private cache)

Every id and coordinate is validated; leases must be live and the caller's; an object id is
below ``max_objects_per_lease``; predicts are rate-limited per identity and decoded off the
event loop, a few at once, the least busy identity first; a repeated accept is answered
without decoding.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from contextlib import asynccontextmanager
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from dataengine.pipeline.core import masks as masklib
from dataengine.pipeline.server import auth, people
from dataengine.pipeline.server.prompts import decode, int_field, parse_box, parse_points
from dataengine.pipeline.server.routes.pages import browser_decoder_available
from dataengine.pipeline.server.security import ApiError, json_body, require
from dataengine.pipeline.server.state import ServerState, get_state

router = APIRouter(dependencies=[Depends(require("annotator"))])
Me = Depends(require("annotator"))


def round_of(st: ServerState, number: str) -> people.PeopleRound:
    if not re.fullmatch(r"\d{1,6}", number):
        raise ApiError(400, f"round {number!r} is not a round number")
    return st.round(int(number))


def leased(r: people.PeopleRound, body: dict[str, Any], ident: auth.Identity
           ) -> people.ImageState:
    """The image of the body's lease, which must be live and the caller's (400 / 409)."""
    lease_id, key = body.get("lease_id"), body.get("key")
    if not isinstance(lease_id, str):
        raise ApiError(400, "lease_id is required")
    try:
        return r.check(lease_id, ident.name, key if isinstance(key, str) else None)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    except people.Conflict as exc:
        raise ApiError(409, str(exc)) from None


def _lease_payload(st: ServerState, r: people.PeopleRound, lease: people.Lease | None
                   ) -> dict[str, Any]:
    if lease is None:
        return {"round": r.number, "lease": None, "done": True, "progress": r.progress()}
    img = r.images[lease.key]
    # embeddings of this and the next queued images, ahead of the first click
    nxt = [k for k in r.order if not r.images[k].final]
    i = nxt.index(lease.key) if lease.key in nxt else 0
    st.sam.prefetch(r.model_version, [(k, st.image_fn(k, r.images[k].shard), r.images[k].shard)
                                      for k in nxt[i:i + 3]])
    browser = st.config.browser_decoder and browser_decoder_available()
    return {"round": r.number, "stage": r.stage, "model_version": r.model_version,
            "lease": {"lease_id": lease.lease_id, "key": lease.key,
                      "expires_in": lease.expires - time.time()},
            "image": r.view(img.key), "image_url": f"/api/image/{img.key}",
            "decoder_url": f"/api/annotate/{r.number}/decoder" if browser else None,
            "max_objects": st.config.max_objects_per_lease, "progress": r.progress()}


def _conflicts(fn, *args, **kw) -> Any:
    try:
        return fn(*args, **kw)
    except people.Conflict as exc:
        raise ApiError(409, str(exc)) from None
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    except KeyError as exc:
        raise ApiError(404, str(exc.args[0])) from None


# queue --------------------------------------------------------------------------------------
@router.post("/api/annotate/{number}/lease")
async def lease(number: str, request: Request, ident: auth.Identity = Me) -> dict:
    st = get_state(request)
    r = round_of(st, number)
    await json_body(request)
    got = None if r.complete else await anyio.to_thread.run_sync(r.lease, ident.name)
    return await anyio.to_thread.run_sync(_lease_payload, st, r, got)


@router.post("/api/annotate/{number}/renew")
async def renew(number: str, request: Request, ident: auth.Identity = Me) -> dict:
    r = round_of(get_state(request), number)
    body = await json_body(request)
    img = leased(r, body, ident)
    got = await anyio.to_thread.run_sync(
        lambda: _conflicts(r.renew, body["lease_id"], ident.name, img.key))
    return {"expires_in": got.expires - time.time()}


@router.post("/api/annotate/{number}/release")
async def release(number: str, request: Request, ident: auth.Identity = Me) -> dict:
    st = get_state(request)
    r = round_of(st, number)
    body = await json_body(request)
    img = leased(r, body, ident)
    await anyio.to_thread.run_sync(
        lambda: _conflicts(r.release, body["lease_id"], ident.name, img.key))
    st.sessions.drop(body["lease_id"])
    return {"released": True}


# prompts ------------------------------------------------------------------------------------
def _parsed(st: ServerState, img: people.ImageState, body: dict[str, Any]
            ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
    """The prompt of a body: object id, points, labels, box (400 naming what is wrong)."""
    obj = int_field(body, "object", 0, st.config.max_objects_per_lease - 1, default=0)
    points, labels = parse_points(body, img.width, img.height)
    box = parse_box(body, img.width, img.height)
    if not len(points) and box is None:
        raise ApiError(400, "a prompt needs at least one point or a box")
    return obj, points, labels, box


def prompt_digest(who: str, points: np.ndarray, labels: np.ndarray, box: np.ndarray | None,
                  choice: Any) -> str:
    """What identifies one person's accept of one prompt: the same digest, the same mask."""
    sig = [who, np.round(points, 3).tolist(), labels.tolist(),
           None if box is None else np.round(box, 3).tolist(), repr(choice)[:20]]
    return hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:32]


@asynccontextmanager
async def _admitted(st: ServerState, ident: auth.Identity, kind: str):
    """Admission of one prompt request: rate-limited per identity and kind (predict, accept),
    one in flight (429 otherwise)."""
    name = f"{ident.name}/{kind}"
    st.predicts.acquire(name)
    try:
        yield
    finally:
        st.predicts.release(name)


async def _decode(st: ServerState, r: people.PeopleRound, img: people.ImageState,
                  lease_id: str, ident: auth.Identity, obj: int, points: np.ndarray,
                  labels: np.ndarray, box: np.ndarray | None) -> list[dict[str, Any]]:
    """The masks of a prompt, decoded off the event loop: a few decoder calls at once
    (``decoder_slots``), the least busy identity first."""
    def predict(pts, labs, bx, mask_input, multimask, lowres_only):
        return st.sam.predict(r.model_version, img.key, st.image_fn(img.key, img.shard), pts,
                              labs, bx, mask_input, multimask, img.shard, lowres_only)

    started = await st.decoder_slots.acquire(ident.name)
    try:
        return await anyio.to_thread.run_sync(
            decode, predict, st.sessions, lease_id, obj, points, labels, box)
    finally:
        st.decoder_slots.release(ident.name, started)


@router.post("/api/annotate/{number}/predict")
async def predict(number: str, request: Request, ident: auth.Identity = Me) -> dict:
    t0 = time.perf_counter()
    st = get_state(request)
    r = round_of(st, number)
    body = await json_body(request)
    img = leased(r, body, ident)
    obj, points, labels, box = _parsed(st, img, body)
    async with _admitted(st, ident, "predict"):
        preds = await _decode(st, r, img, body["lease_id"], ident, obj, points, labels, box)
    await anyio.to_thread.run_sync(
        lambda: _conflicts(r.touch, img, body["lease_id"], ident.name))
    best = int(np.argmax([p["score"] for p in preds]))
    out = [{"rle": masklib.encode(p["mask"])["counts"], "score": p["score"],
            "stability": p["stability"], "area": int(p["mask"].sum())} for p in preds]
    return {"masks": out, "best": best, "height": img.height, "width": img.width,
            "server_ms": (time.perf_counter() - t0) * 1000}


def _annotation(r: people.PeopleRound, img: people.ImageState, body: dict[str, Any],
                preds: list[dict[str, Any]], points: np.ndarray, labels: np.ndarray,
                box: np.ndarray | None, who: str) -> dict[str, Any]:
    choice = int_field(body, "choice", 0, len(preds) - 1,
                       default=int(np.argmax([p["score"] for p in preds])))
    seconds = body.get("seconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or \
            not math.isfinite(seconds) or not 0 <= seconds <= 3600:
        raise ApiError(400, f"seconds={seconds!r} must be within 0..3600")
    p = preds[choice]
    if not p["mask"].any():
        raise ApiError(400, "the chosen mask is empty; add a positive click")
    rle = masklib.encode(p["mask"])
    clicks = [{"x": float(x), "y": float(y), "label": int(lab)}
              for (x, y), lab in zip(points.tolist(), labels.tolist(), strict=True)]
    ann = {"segmentation": rle, "bbox": masklib.bbox(rle), "area": masklib.area(rle),
           "predicted_iou": p["score"], "stability_score": p["stability"],
           "point_coords": [[c["x"], c["y"]] for c in clicks[:1]],
           "crop_box": [0, 0, img.width, img.height], "stage": r.stage, "round": r.number,
           "model_version": r.model_version, "clicks": clicks,
           "box": None if box is None else [float(v) for v in box], "annotator": who,
           "seconds": float(seconds), "prefilled": False, "multimask_choice": choice}
    if body.get("replaces") is not None:
        ann["replaces"] = str(body["replaces"])[:40]
    return ann


@router.post("/api/annotate/{number}/accept")
async def accept(number: str, request: Request, ident: auth.Identity = Me) -> dict:
    st = get_state(request)
    r = round_of(st, number)
    body = await json_body(request)
    img = leased(r, body, ident)
    idem = body.get("idempotency_key")
    if idem is not None and not isinstance(idem, str):
        raise ApiError(400, "idempotency_key must be text")

    def answer(uid: str, ann: dict[str, Any]) -> dict[str, Any]:
        return {"uid": uid, "area": ann["area"], "bbox": ann["bbox"],
                "rle": ann["segmentation"]["counts"], "clicks": len(ann["clicks"])}

    obj, points, labels, box = _parsed(st, img, body)
    prompt = prompt_digest(ident.name, points, labels, box, body.get("choice"))
    async with _admitted(st, ident, "accept"):
        # a repeated accept: the first one's answer, without decoding
        seen = await anyio.to_thread.run_sync(
            lambda: _conflicts(r.repeated, body["lease_id"], ident.name, idem, prompt, img.key))
        if seen is not None:
            return answer(*seen)
        preds = await _decode(st, r, img, body["lease_id"], ident, obj, points, labels, box)
    ann = _annotation(r, img, body, preds, points, labels, box, ident.name)
    uid = await anyio.to_thread.run_sync(
        lambda: _conflicts(r.accept, body["lease_id"], ident.name, ann, idem, img.key, prompt))
    st.sessions.drop(body["lease_id"], obj)
    return answer(uid, ann)


@router.post("/api/annotate/{number}/remove")
async def remove(number: str, request: Request, ident: auth.Identity = Me) -> dict:
    r = round_of(get_state(request), number)
    body = await json_body(request)
    img = leased(r, body, ident)
    await anyio.to_thread.run_sync(
        lambda: _conflicts(r.remove, body["lease_id"], ident.name, body.get("uid"), img.key))
    return {"removed": body.get("uid")}


async def _finish(number: str, request: Request, ident: auth.Identity, skip: bool) -> dict:
    st = get_state(request)
    r = round_of(st, number)
    body = await json_body(request)
    img = leased(r, body, ident)
    reason = body.get("reason", "")
    if not isinstance(reason, str):
        raise ApiError(400, "reason must be text")
    res = await anyio.to_thread.run_sync(
        lambda: _conflicts(r.finish_image, body["lease_id"], ident.name, skip=skip,
                           reason=reason, key=img.key))
    st.sessions.drop(body["lease_id"])
    if res["shard_written"]:
        st.view.refresh(force=True)
    return res


@router.post("/api/annotate/{number}/submit")
async def submit(number: str, request: Request, ident: auth.Identity = Me) -> dict:
    return await _finish(number, request, ident, skip=False)


@router.post("/api/annotate/{number}/skip")
async def skip(number: str, request: Request, ident: auth.Identity = Me) -> dict:
    return await _finish(number, request, ident, skip=True)


# the decoder in the browser -------------------------------------------------------------------
@router.get("/api/annotate/{number}/embedding")
async def embedding(number: str, request: Request, ident: auth.Identity = Me) -> Response:
    """The leased image's embedding (float16, 1xCxSxS) for the browser's decoder; sizes in
    headers."""
    st = get_state(request)
    r = round_of(st, number)
    img = leased(r, dict(request.query_params), ident)
    name = f"{ident.name}/embedding"
    st.predicts.acquire(name)
    try:
        data, meta = await anyio.to_thread.run_sync(
            st.sam.embedding_payload, r.model_version, img.key,
            st.image_fn(img.key, img.shard), img.shard)
    finally:
        st.predicts.release(name)
    return Response(data, media_type="application/octet-stream", headers={
        "Cache-Control": "private, max-age=3600",
        "X-Embedding-Shape": ",".join(map(str, meta["shape"])),
        "X-Input-Size": ",".join(map(str, meta["input_size"])),
        "X-Original-Size": ",".join(map(str, meta["original_size"]))})


@router.get("/api/annotate/{number}/decoder")
async def decoder(number: str, request: Request) -> dict:
    """What the browser needs to run this round's decoder (404 when it cannot)."""
    st = get_state(request)
    r = round_of(st, number)
    if not (st.config.browser_decoder and browser_decoder_available()):
        raise ApiError(404, "the browser decoder is not available on this server")
    dec = await anyio.to_thread.run_sync(st.sam.browser_decoder, r.model_version)
    if dec is None:
        raise ApiError(404, "this server decodes with torch; no ONNX graphs to send")
    v = r.model_version
    return {"model_version": v, "img_size": dec.img_size, "low_res": dec.low_res,
            "embedding_shape": dec.embedding_shape, "threshold": dec.threshold,
            "graphs": {k: f"/api/annotate/decoder/{v}/{k}" for k in ("multi", "single")},
            "ort": "/static/vendor/ort/ort.wasm.min.js"}


@router.get("/api/annotate/decoder/{version}/{kind}")
async def decoder_graph(version: str, kind: str, request: Request,
                        ident: auth.Identity = Me) -> Response:
    st = get_state(request)
    if not re.fullmatch(r"v\d{4,}", version) or version not in st.corpus.model_versions("sam"):
        raise ApiError(404, f"no SAM version {version!r}")
    if kind not in ("multi", "single"):
        raise ApiError(400, f"graph {kind!r}: allowed multi, single")
    dec = await anyio.to_thread.run_sync(st.sam.browser_decoder, version)
    if dec is None:
        raise ApiError(404, "this server decodes with torch; no ONNX graphs to send")
    name = f"{ident.name}/graph"
    st.predicts.acquire(name)  # megabytes, hashed before they are sent: rate-limited
    try:
        data = await anyio.to_thread.run_sync(dec.graph, kind)
    finally:
        st.predicts.release(name)
    return Response(data, media_type="application/octet-stream",
                    headers={"Cache-Control": "private, max-age=86400"})
